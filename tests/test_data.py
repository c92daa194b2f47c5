"""Self-generated distillation data: format, resume, crash safety, import, clear errors."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import training.data as data
from training.data import DistillDataset, generate_dataset, import_images

PROMPTS = ["a red circle", "a cat sitting on a sofa", "a cup of coffee"]
SETTINGS = dict(resolution=64, steps=2, batch_size=2, model_name="tiny")


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").iterdir())}


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_pipeline_path):
    """Three items, then resumed to four: the module's reference data set."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_pipeline_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = tmp_path_factory.mktemp("made") / "data"
    generate_dataset(pipe, PROMPTS, out, num=3, **SETTINGS)
    first = shard_bytes(out)
    generate_dataset(pipe, PROMPTS, out, num=4, **SETTINGS)
    return pipe, out, first


def test_format_and_resume_skips_finished_items(made):
    pipe, out, first = made
    info = json.loads((out / "info.json").read_text())
    assert info["height"] == info["width"] == 64
    assert info["latent_shape"] == [16, 8, 8]
    assert (info["text_seq_len"], info["text_dim"], info["pooled_dim"]) == (64, 32, 32)
    assert info["settings"] == {"source": "generated", "model": "tiny", "steps": 2, "guidance": 3.5, "seed": 0}
    # the VAE's own scaling and shift: what training turns the stored latents back into model inputs with
    assert (info["vae_scaling_factor"], info["vae_shift_factor"]) == (
        pipe.vae.config.scaling_factor,
        pipe.vae.config.shift_factor,
    )
    for change in (dict(steps=3), dict(guidance=5.0)):  # a resume with other settings would mix two data sets
        ((name, value),) = change.items()
        with pytest.raises(ValueError, match=rf"{name} .* \(on disk\) vs {value!r}"):
            generate_dataset(pipe, PROMPTS, out, num=5, **{**SETTINGS, **change})
    assert len(DistillDataset(out)) == 4

    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["index"] for e in lines] == [0, 1, 2, 3]
    assert [e["prompt"] for e in lines] == [*PROMPTS, PROMPTS[0]]  # prompts cycle
    assert [(e["shard"], e["row"]) for e in lines] == [
        ("shards/000000.safetensors", 0),
        ("shards/000000.safetensors", 1),
        ("shards/000002.safetensors", 0),  # the first run's last, half-full batch
        ("shards/000003.safetensors", 0),  # the resumed run generated only item 3
    ]
    after = shard_bytes(out)
    assert {k: after[k] for k in first} == first  # finished shards untouched

    with Image.open(out / "images/000001.png") as image:
        assert image.size == (64, 64)
        assert json.loads(image.text["parameters"])["prompt"] == PROMPTS[1]

    ds = DistillDataset(out)
    assert len(ds) == 4 and ds.prompts == [e["prompt"] for e in lines]
    item = ds[3]
    assert item["latent_mean"].shape == item["latent_logvar"].shape == (16, 8, 8)
    assert item["prompt_embeds"].shape == (64, 32) and item["pooled_prompt_embeds"].shape == (32,)
    # Stored embeddings are the pipeline's own encoding of the prompt.
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS[0], prompt_2=None, max_sequence_length=64)
    torch.testing.assert_close(item["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[0], atol=1e-5, rtol=1e-5)


def test_interrupted_write_keeps_data_consistent(made, tmp_path, monkeypatch):
    pipe, reference, _ = made
    out = tmp_path / "data"
    calls = []
    append = data._append_manifest

    def crash_on_second_batch(path, entries):
        calls.append(entries)
        if len(calls) == 2:  # the shard of batch 2 is on disk, its manifest lines are not
            raise KeyboardInterrupt
        append(path, entries)

    monkeypatch.setattr(data, "_append_manifest", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(pipe, PROMPTS, out, num=4, **SETTINGS)
    monkeypatch.setattr(data, "_append_manifest", append)

    assert len(DistillDataset(out)) == 2
    for shard in (out / "shards").iterdir():  # every file under its final name is complete
        assert shard.suffix == ".safetensors"
        with safe_open(str(shard), framework="pt") as f:
            assert set(f.keys()) == set(data.SHARD_KEYS)
    # A kill during the manifest append leaves a torn last line: readers skip it, the next run cuts it off.
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"index": 2, "prompt": "a cu')
    assert len(DistillDataset(out)) == 2
    for temp in ("images/.000002.png.0123abcd.tmp", "shards/.000002.safetensors.0123abcd.tmp"):  # of a SIGKILL
        (out / temp).write_bytes(b"half a file")
    generate_dataset(pipe, PROMPTS, out, num=2, **SETTINGS)  # nothing to make: the unfinished batch's files go
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.safetensors"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]

    generate_dataset(pipe, PROMPTS, out, num=4, **SETTINGS)
    assert len(DistillDataset(out)) == 4
    for i in range(4):  # same items as the reference (batched differently: equal up to 8-bit rounding)
        a, b = (np.asarray(Image.open(folder / f"images/{i:06d}.png"), dtype=int) for folder in (out, reference))
        assert np.abs(a - b).max() <= 1
    assert not list(out.rglob("*.tmp"))


def test_every_file_is_fsynced_before_the_manifest_names_it(made, tmp_path, monkeypatch):
    pipe, _, _ = made
    synced, fsync = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    out = generate_dataset(pipe, PROMPTS, tmp_path / "data", num=2, **SETTINGS)
    written = [re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", Path(p).name) for p in synced]  # each under a temp name
    for f in [*(out / "images").iterdir(), *(out / "shards").iterdir()]:  # fsynced, then renamed
        assert f.name in {m[1] for m in written if m}
    shard = next(i for i, m in enumerate(written) if m and m[1] == "000000.safetensors")
    assert shard < synced.index(str(out / "manifest.jsonl"))


def test_resume_refuses_data_of_another_dtype_or_vae_scaling(made, tmp_path):
    _, reference, _ = made
    on_disk = data.DataInfo.read(reference)
    for change in (dict(embeds_dtype="bfloat16"), dict(vae_scaling_factor=0.5), dict(vae_shift_factor=0.1)):
        ((name, value),) = change.items()
        with pytest.raises(ValueError, match=f"{name} .* \\(on disk\\) vs {value!r}"):
            data._Writer(reference, dataclasses.replace(on_disk, **change), overwrite=False)
    length = on_disk.text_seq_len  # a data set of a default that changed since: the flag that resumes it is named
    with pytest.raises(ValueError, match=f"text_seq_len {length} .*; --max-sequence-length {length} resumes it\\)"):
        data._Writer(reference, dataclasses.replace(on_disk, text_seq_len=length + 1), overwrite=False)
    with pytest.raises(ValueError, match="vae_scaling_factor") as refused:  # the flag alone would not resume it
        data._Writer(reference, dataclasses.replace(on_disk, text_seq_len=length + 1, vae_scaling_factor=0.5), False)
    assert "resumes it" not in str(refused.value)
    assert data.DataInfo.read(reference) == on_disk  # info.json not rewritten


def test_library_refuses_a_negative_prompt_without_true_cfg(made, tmp_path):
    pipe, _, _ = made
    with pytest.raises(ValueError, match="negative_prompt needs true_cfg_scale above 1"):
        generate_dataset(pipe, PROMPTS, tmp_path / "data", num=1, negative_prompt="blurry", **SETTINGS)
    assert not (tmp_path / "data").exists()


def test_info_file_that_is_not_an_object_is_a_clear_error(tmp_path):
    (tmp_path / "info.json").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="info.json is not a valid clear-dit data info file: it holds a JSON list"):
        DistillDataset(tmp_path)


def test_dataset_errors_name_the_file(made, tmp_path):
    pipe, reference, _ = made
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        DistillDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no info.json"):
        DistillDataset(tmp_path / "empty")

    broken = tmp_path / "broken"
    for sub in ("", "images", "shards"):
        (broken / sub).mkdir(exist_ok=True)
    for name in ("info.json", "manifest.jsonl"):
        (broken / name).write_bytes((reference / name).read_bytes())
    for name, blob in shard_bytes(reference).items():
        (broken / "shards" / name).write_bytes(blob)

    (broken / "shards/000003.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="000003.safetensors"):
        DistillDataset(broken)[3]
    (broken / "shards/000003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="000003.safetensors"):
        DistillDataset(broken)

    (broken / "manifest.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="line 1"):
        DistillDataset(broken)

    with pytest.raises(ValueError, match="resolution"):  # resuming into data made at another resolution
        generate_dataset(pipe, PROMPTS, reference, num=4, **{**SETTINGS, "resolution": 32})
    with pytest.raises(ValueError, match="multiple of 16"):
        generate_dataset(pipe, PROMPTS, tmp_path / "odd", num=1, **{**SETTINGS, "resolution": 72})
    with pytest.raises(ValueError, match="the prompt list or image folder changed"):
        generate_dataset(pipe, ["another prompt"], reference, num=4, **SETTINGS)


def test_import_folder_with_captions(made, tmp_path):
    pipe, _, _ = made
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (96, 64), "red").save(src / "a.png")
    (src / "a.txt").write_text("a red picture\n")
    Image.new("RGB", (64, 80), "blue").save(src / "sub" / "b.jpg")
    (src / "sub" / "b.json").write_text(json.dumps({"prompt": "a blue picture"}))
    (src / "._a.png").write_bytes(b"\0\5\x16\7 a macOS resource fork, no image")  # hidden: skipped
    (src / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(src / ".thumbnails" / "a.png")  # no caption: an import of it would stop

    out = import_images(pipe, src, tmp_path / "data", resolution=32)
    ds = DistillDataset(out)
    assert ds.prompts == ["a red picture", "a blue picture"]
    assert ds[1]["latent_mean"].shape == (16, 4, 4)
    assert [e["source"] for e in ds.entries] == ["a.png", "sub/b.jpg"]
    with Image.open(out / "images/000000.png") as image:
        assert image.size == (32, 32) and image.getpixel((16, 16)) == (255, 0, 0)

    Image.new("RGB", (32, 32)).save(src / "c.png")
    with pytest.raises(FileNotFoundError, match="no caption for .*c.png"):
        import_images(pipe, src, tmp_path / "data2", resolution=32)
    (src / "c.txt").write_text("\ufeffa black picture", encoding="utf-8")  # Notepad's BOM is no part of it
    caption = (src / "sub" / "b.json").read_bytes()
    (src / "sub" / "b.json").write_bytes(json.dumps({"prompt": "caf\xe9"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"b.json is not UTF-8 text \(.*\); save it as UTF-8"):
        import_images(pipe, src, tmp_path / "data3", resolution=32)
    assert data._caption(src / "c.png") == "a black picture"
    (src / "sub" / "b.json").write_bytes(caption)

    # resuming matches items by their source image, not their index alone; an --out inside the folder is skipped
    (src / "c.txt").write_text("a dark picture\n")
    inside = src / "data"
    import_images(pipe, src, inside, resolution=32)
    assert [e["source"] for e in DistillDataset(import_images(pipe, src, inside, resolution=32)).entries] == [
        "a.png",
        "c.png",
        "sub/b.jpg",
    ]
    Image.new("RGB", (32, 32), "green").save(src / "0.png")
    (src / "0.txt").write_text("a red picture\n")  # sorts first, with item 0's caption
    with pytest.raises(ValueError, match="item 0 was made from 'a.png', not '0.png'"):
        import_images(pipe, src, inside, resolution=32)

    mine = tmp_path / "mine"  # a folder of the user's own files is no data folder, --overwrite or not
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="holds no clear-dit data .*use another --out"):
        import_images(pipe, src / "sub", mine, resolution=32, overwrite=True)
    assert [p.name for p in mine.rglob("*")] == ["images", "holiday.jpg"]
    assert (mine / "images" / "holiday.jpg").read_bytes() == b"mine"


def test_an_import_captioned_with_notepads_bom_before_resumes(made, tmp_path):
    """Captions were read with their BOM then: the manifest holds '\\ufeffa red picture' for today's caption."""
    pipe, _, _ = made
    src = tmp_path / "images"
    src.mkdir()
    Image.new("RGB", (32, 32), "red").save(src / "a.png")
    (src / "a.txt").write_text("\ufeffa red picture", encoding="utf-8")
    out = import_images(pipe, src, tmp_path / "data", resolution=32)
    manifest = out / "manifest.jsonl"
    entry = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**entry, "prompt": "\ufeff" + entry["prompt"]}) + "\n")
    Image.new("RGB", (32, 32), "blue").save(src / "b.png")
    (src / "b.txt").write_text("a blue picture")
    assert len(DistillDataset(import_images(pipe, src, out, resolution=32))) == 2


def test_import_turns_photos_upright_and_names_recaptioned_and_oversized_images(made, tmp_path, monkeypatch):
    pipe, _, _ = made
    src = tmp_path / "images"
    src.mkdir()
    stored = Image.new("RGB", (64, 32), "blue")
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90 CW to show": shown 32 wide, 64 tall, red on top
    stored.save(src / "a.png", exif=exif)
    (src / "a.txt").write_text("red above blue\n")
    out = import_images(pipe, src, tmp_path / "data", resolution=32)
    with Image.open(out / "images/000000.png") as image:
        assert image.getpixel((16, 2)) == (255, 0, 0) and image.getpixel((16, 29)) == (0, 0, 255)

    (src / "a.txt").write_text("blue above red\n")
    with pytest.raises(ValueError, match="item 0 \\(a.png\\) was captioned 'red above blue', now 'blue above red'"):
        import_images(pipe, src, out, resolution=32)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 64x32 is above twice Pillow's limit: its bomb error
    with pytest.raises(ValueError, match="cannot read image .*a.png: Image size \\(2048 pixels\\) exceeds limit"):
        import_images(pipe, src, tmp_path / "data2", resolution=32)


def test_overwrite_forgets_the_items_before_it_deletes_their_files(made, tmp_path, monkeypatch):
    pipe, _, _ = made
    out = generate_dataset(pipe, PROMPTS, tmp_path / "data", num=2, **SETTINGS)
    unlink = Path.unlink

    def killed_at_the_first_image(path, *args, **kwargs):
        if path.suffix == ".png":
            raise KeyboardInterrupt
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_at_the_first_image)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(pipe, PROMPTS, out, num=2, overwrite=True, **SETTINGS)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert not (out / "manifest.jsonl").exists()  # no manifest line names a deleted file
    generate_dataset(pipe, PROMPTS, out, num=2, **SETTINGS)  # and the next run makes the set again
    assert len(DistillDataset(out)) == 2


def test_json_caption_that_is_not_text_is_refused(made, tmp_path):
    pipe, _, _ = made
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    (tmp_path / "a.json").write_text(json.dumps({"prompt": None}))
    with pytest.raises(ValueError, match="a.json holds no 'prompt', 'caption' or 'text' text field"):
        import_images(pipe, tmp_path, tmp_path / "data", resolution=32)


def test_cli_make_data_and_one_line_errors(tmp_path, tiny_pipeline_path, capsys, deny_searching):
    from app.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle\n\na blue square\n")
    args = ["make-data", "--prompts", str(prompts), "--out", str(tmp_path / "data"), "--resolution", "32"]
    assert main([*args, "--steps", "1"]) == 0
    assert "2 items at 32x32" in capsys.readouterr().out
    assert DistillDataset(tmp_path / "data").prompts == ["a red circle", "a blue square"]

    assert main(["make-data", "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == f"error: prompt file not found: {tmp_path / 'nope.txt'}\n"
    assert main(["make-data", "--prompts", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path} is a folder, not a prompt file (one prompt per line)\n"
    (tmp_path / "afile").write_text("mine")
    assert main([*args[:-2], "--out", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'afile'} is a file, not a data folder\n"
    with pytest.raises(NotADirectoryError, match="afile is a file, not a data folder"):
        data._Writer(tmp_path / "afile", DistillDataset(tmp_path / "data").info, overwrite=True)
    assert (tmp_path / "afile").read_text() == "mine"
    assert main(["distill", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--window", "0"]) == 1
    assert capsys.readouterr().err.startswith("error: --window must be a positive int")

    for extra, message in (  # 0 is refused, not read as "the default"; generation options have no use on imports
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--max-sequence-length", "0"], "--max-sequence-length must be 1 to 512 (FLUX's T5 limit), got 0"),
        (["--resolution", "0"], "--resolution must be a positive multiple of 16"),
    ):
        assert main(["make-data", "--prompts", str(prompts), "--out", str(tmp_path / "bad"), *extra]) != 0
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")
    (tmp_path / "photos").mkdir()
    importing = ["make-data", "--images", str(tmp_path / "photos"), "--out", str(tmp_path / "bad")]
    assert main([*importing, "--num", "1", "--seed", "3"]) != 0
    assert capsys.readouterr().err == "error: --num, --seed applies to generated data (--prompts), not to --images\n"
    assert not (tmp_path / "bad").exists()
    deny_searching(tmp_path / "data")  # last: the data folder is out of reach from here on
    assert main([*args[:-2], "--out", str(tmp_path / "data" / "more")]) == 2
    reason = "cannot be reached (Permission denied)"
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'data' / 'more'} {reason}\n"


def test_sigkill_mid_run_loses_at_most_the_items_in_flight(tmp_path, tiny_pipeline_path):
    """A real ``kill -9`` of ``clear-dit make-data``: what the manifest lists stays readable, and a re-run completes."""
    repo = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "data"
    args = ["make-data", "--prompts", str(prompts), "--out", str(out), "--resolution", "64", "--steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args, "--num", "400"], cwd=repo, env=env, stderr=stderr
        )
    manifest = out / "manifest.jsonl"
    # the progress bar: items done of the total, elapsed < remaining (ETA); tqdm redraws at most every 0.1 s, so
    # the kill waits for a drawn bar with an ETA as well as for two listed items
    eta_bar = re.compile(r"make-data: +\d+%\|.*\| [1-9]\d*/400 \[\d\d:\d\d<\d\d:\d\d")
    deadline = time.monotonic() + 300  # a busy machine loads torch and the model slowly; it stops when ready
    while time.monotonic() < deadline and proc.poll() is None:
        listed = manifest.exists() and len(manifest.read_text().splitlines()) >= 2
        if listed and eta_bar.search((tmp_path / "stderr.txt").read_text()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert eta_bar.search((tmp_path / "stderr.txt").read_text())
    done = DistillDataset(out)
    assert 2 <= len(done) < 400
    for i in range(len(done)):  # every listed item's shard and image are complete
        assert done[i]["latent_mean"].shape == (16, 8, 8)
    for shard in (out / "shards").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            assert list(f.keys())

    from app.cli import main

    finished = len(done)
    assert main([*args, "--num", str(finished + 2)]) == 0
    again = DistillDataset(out)
    assert len(again) == finished + 2
    assert again.prompts == [PROMPTS[i % len(PROMPTS)] for i in range(finished + 2)]


def test_true_cfg_data_is_what_the_pipeline_draws_with_it(made, tmp_path):
    pipe, _, _ = made
    settings = SETTINGS | dict(batch_size=2, true_cfg_scale=3.0, negative_prompt="a blurry photo")
    out = generate_dataset(pipe, PROMPTS[:2], tmp_path / "cfg", **settings)
    info = json.loads((out / "info.json").read_text())
    assert info["settings"]["true_cfg_scale"] == 3.0 and info["settings"]["negative_prompt"] == "a blurry photo"
    expected = pipe(
        PROMPTS[:2],
        negative_prompt=["a blurry photo"] * 2,
        true_cfg_scale=3.0,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        max_sequence_length=64,
    ).images
    plain = generate_dataset(pipe, PROMPTS[:2], tmp_path / "plain", **SETTINGS)
    for i, reference in enumerate(expected):
        with Image.open(out / f"images/{i:06d}.png") as image:
            assert np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1
        with Image.open(plain / f"images/{i:06d}.png") as image, Image.open(out / f"images/{i:06d}.png") as guided:
            assert not np.array_equal(np.asarray(image), np.asarray(guided))  # the guidance did something
    with pytest.raises(ValueError, match="true_cfg_scale must be >= 1"):
        generate_dataset(pipe, PROMPTS, tmp_path / "bad", **SETTINGS, true_cfg_scale=0.5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--true-cfg", "0.5"], "error: --true-cfg must be >= 1 (1: off), got 0.5\n"),
        (["--negative-prompt", "blurry"], "error: --negative-prompt needs --true-cfg above 1\n"),
    ],
)
def test_cli_true_cfg_errors(tmp_path, capsys, extra, message):
    from app.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["make-data", "--prompts", str(prompts), "--out", str(tmp_path / "data"), *extra]) == 2
    assert capsys.readouterr().err == message
    assert not (tmp_path / "data").exists()


def test_every_item_holds_the_latents_of_its_image_and_the_embeddings_of_its_prompt(made):
    """Each item against its own PNG through the VAE ([-1, 1] pixels) and its prompt through the text encoders,
    rows after the first included (item 1 is the second row of its shard)."""
    pipe, out, _ = made
    ds = DistillDataset(out)
    assert [e["row"] for e in ds.entries] == [0, 1, 0, 0]
    for i, entry in enumerate(ds.entries):
        pixels = np.asarray(Image.open(out / entry["image"]).convert("RGB"), dtype=np.float32) / 255 * 2 - 1
        with torch.no_grad():
            mean = pipe.vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]).latent_dist.mean[0]
            embeds, pooled, _ = pipe.encode_prompt(entry["prompt"], None, max_sequence_length=ds.info.text_seq_len)
        torch.testing.assert_close(ds[i]["latent_mean"], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ds[i]["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ds[i]["pooled_prompt_embeds"], pooled[0], atol=1e-5, rtol=1e-5)


def test_items_use_their_seed_and_guidance(made, tmp_path):
    """--seed S and --guidance G reach the pipeline (item i drawn with seed S + i) and are recorded per item."""
    pipe, _, _ = made
    out = generate_dataset(pipe, PROMPTS[:2], tmp_path / "d", seed=5, guidance=1.0, **SETTINGS)
    expected = pipe(
        PROMPTS[:2],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=64,
        generator=[torch.Generator().manual_seed(5 + i) for i in range(2)],
    ).images
    assert [e["seed"] for e in DistillDataset(out).entries] == [5, 6]
    for i, reference in enumerate(expected):
        with Image.open(out / f"images/{i:06d}.png") as image:
            assert np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1


def test_logvar_is_the_posteriors_and_latents_are_float32(made, tmp_path, monkeypatch):
    pipe, out, _ = made
    ds = DistillDataset(out)
    for i, entry in enumerate(ds.entries):
        pixels = np.asarray(Image.open(out / entry["image"]).convert("RGB"), dtype=np.float32) / 255 * 2 - 1
        with torch.no_grad():
            dist = pipe.vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]).latent_dist
        torch.testing.assert_close(ds[i]["latent_logvar"], dist.logvar[0], atol=1e-5, rtol=1e-5)
    encode = data._encode_images  # a bf16 VAE (as on a GPU): the stored posterior is float32 all the same
    monkeypatch.setattr(data, "_encode_images", lambda vae, images: tuple(t.bfloat16() for t in encode(vae, images)))
    item = DistillDataset(generate_dataset(pipe, PROMPTS[:1], tmp_path / "bf16", **SETTINGS))[0]
    assert item["latent_mean"].dtype == item["latent_logvar"].dtype == torch.float32


def test_negative_file_holds_the_negative_prompt(made, tmp_path):
    pipe, _, _ = made
    settings = SETTINGS | dict(true_cfg_scale=2.0, negative_prompt="a blurry photo")
    negative = DistillDataset(generate_dataset(pipe, PROMPTS[:1], tmp_path / "cfg", **settings)).negative()
    embeds, pooled, _ = pipe.encode_prompt("a blurry photo", None, max_sequence_length=64)
    torch.testing.assert_close(negative["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(negative["pooled_prompt_embeds"], pooled[0], atol=1e-5, rtol=1e-5)


def test_import_crops_the_center_of_a_wide_image(made, tmp_path):
    pipe, _, _ = made
    src = tmp_path / "images"
    src.mkdir()
    wide = Image.new("RGB", (96, 64), "red")
    wide.paste((0, 255, 0), (0, 0, 16, 64))  # green left margin, blue right margin: outside the center square
    wide.paste((0, 0, 255), (80, 0, 96, 64))
    wide.save(src / "a.png")
    (src / "a.txt").write_text("red\n")
    out = import_images(pipe, src, tmp_path / "data", resolution=32)
    with Image.open(out / "images/000000.png") as image:
        pixels = np.asarray(image, dtype=int)
    assert np.abs(pixels - np.array([255, 0, 0])).max() <= 2


def test_a_downscaled_import_averages_fine_detail_instead_of_sampling_it(tmp_path):
    """A nearest-pixel resize of a 1-px checkerboard is pure black or white (aliasing); Lanczos gives its mean."""
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(tmp_path / "board.png")
    pixels = np.asarray(data._load_square(tmp_path / "board.png", 32), dtype=int)
    assert pixels.shape == (32, 32, 3) and np.abs(pixels[4:-4, 4:-4] - 127.5).max() < 8


def test_png_records_the_items_own_seed(made, tmp_path):
    pipe, _, _ = made
    out = generate_dataset(pipe, PROMPTS[:2], tmp_path / "d", seed=5, **SETTINGS)
    for i in range(2):
        with Image.open(out / f"images/{i:06d}.png") as image:
            assert json.loads(image.text["parameters"])["seed"] == 5 + i


def test_a_prompt_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("# my prompts\r\na red circle\r\n".encode("utf-8-sig"))  # Notepad's "UTF-8 with BOM"
    assert data.read_prompts(path) == ["a red circle"]


def test_a_prompt_keeps_the_line_separators_python_does_not_split_files_at(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red\u2028circle\r\na blue\x85square\ra green\x0ctriangle\n", encoding="utf-8", newline="")
    assert data.read_prompts(path) == ["a red\u2028circle", "a blue\x85square", "a green\x0ctriangle"]


def test_captions_with_unicode_line_separators_read_back_and_resume(made, tmp_path):
    """json.dumps leaves U+2028 and U+0085 unescaped: the manifest must split at newlines only."""
    pipe, _, _ = made
    src = tmp_path / "images"
    src.mkdir()
    captions = {"a": "a red\u2028picture", "b": "a blue\x85picture"}
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (32, 32), colour).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(captions[name], encoding="utf-8")
    out = import_images(pipe, src, tmp_path / "data", resolution=32)
    assert DistillDataset(out).prompts == [captions["a"], captions["b"]]
    Image.new("RGB", (32, 32), "green").save(src / "c.png")
    (src / "c.txt").write_text("a green picture")
    assert DistillDataset(import_images(pipe, src, out, resolution=32)).prompts == [
        *captions.values(),
        "a green picture",
    ]


def test_overwrite_never_deletes_a_folder_of_someone_elses_files(made, tmp_path):
    """Another tool's info.json passed for ours under --overwrite: images/ and the info file were deleted."""
    pipe, _, _ = made
    mine = tmp_path / "project"
    (mine / "images").mkdir(parents=True)
    (mine / "info.json").write_text('{"name": "my project"}')
    (mine / "images" / "holiday.png").write_bytes(b"mine")
    with pytest.raises(
        FileExistsError, match="info.json is not clear-dit's .*: --overwrite replaces clear-dit data only"
    ):
        generate_dataset(pipe, PROMPTS, mine, num=1, overwrite=True, **SETTINGS)
    assert (mine / "images" / "holiday.png").read_bytes() == b"mine"
    assert json.loads((mine / "info.json").read_text()) == {"name": "my project"}


def test_overwrite_replaces_our_data_of_another_version(made, tmp_path):
    """An info.json of ours with a field this version does not know (a newer clear-dit's) is still ours to replace."""
    pipe, _, _ = made
    out = generate_dataset(pipe, PROMPTS[:1], tmp_path / "d", **SETTINGS)
    info = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps({**info, "captioner": "a newer field"}))
    with pytest.raises(ValueError):  # a resume must understand it
        generate_dataset(pipe, PROMPTS[:1], out, **SETTINGS)
    assert len(DistillDataset(generate_dataset(pipe, PROMPTS[:2], out, overwrite=True, **SETTINGS))) == 2


def test_overwrite_and_resume_leave_subfolders_a_user_put_there(made, tmp_path):
    pipe, _, _ = made
    out = generate_dataset(pipe, PROMPTS[:1], tmp_path / "d", **SETTINGS)
    (out / "images" / "picked").mkdir()
    (out / "images" / "picked" / "best.png").write_bytes(b"mine")
    generate_dataset(pipe, PROMPTS[:1], out, num=2, **SETTINGS)  # a resume
    generate_dataset(pipe, PROMPTS[:1], out, overwrite=True, **SETTINGS)
    assert (out / "images" / "picked" / "best.png").read_bytes() == b"mine" and len(DistillDataset(out)) == 1


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_writes(made, tmp_path):
    """Two runs on one folder both made every item and appended both to the manifest (training saw each twice)."""
    pipe, _, _ = made
    out = tmp_path / "d"
    first = data._Writer(out, data.DataInfo.read(made[1]), overwrite=False)  # a run that is writing
    with pytest.raises(FileExistsError, match=f"another make-data run is writing {re.escape(str(out))}"):
        generate_dataset(pipe, PROMPTS[:1], out, **SETTINGS)
    first.close()
    assert len(DistillDataset(generate_dataset(pipe, PROMPTS[:1], tmp_path / "d2", **SETTINGS))) == 1


def test_a_failed_run_does_not_keep_the_folder_locked(made, tmp_path):
    """The lock lived as long as the writer, which a kept traceback (sys.last_exc in a REPL or notebook) kept alive:
    the corrected run in the same process was refused as 'another make-data run'."""
    pipe, _, _ = made
    out = generate_dataset(pipe, PROMPTS[:1], tmp_path / "d", **SETTINGS)
    with pytest.raises(ValueError, match="the prompt list or image folder changed") as kept:
        generate_dataset(pipe, ["another prompt"], out, **SETTINGS)
    assert kept.value.__traceback__ is not None  # the failed run's frames are still referenced
    with pytest.raises(ValueError, match="holds data made with other settings") as kept_too:  # refused while opening
        generate_dataset(pipe, PROMPTS[:1], out, **{**SETTINGS, "steps": 3})
    assert kept_too.value.__traceback__ is not None
    assert len(DistillDataset(generate_dataset(pipe, PROMPTS[:2], out, **SETTINGS))) == 2


def test_a_manifest_listing_an_item_twice_is_refused(made, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    for name in ("info.json", "manifest.jsonl"):
        (out / name).write_bytes((made[1] / name).read_bytes())
    with open(out / "manifest.jsonl", "a") as f:
        f.write((made[1] / "manifest.jsonl").read_text().splitlines()[1] + "\n")
    with pytest.raises(ValueError, match=r"lists item 1 twice \(lines 2 and 5: two runs wrote the folder at once\?\)"):
        DistillDataset(out)


def test_asking_for_fewer_items_than_the_folder_holds_says_so(made, tmp_path, caplog):
    pipe, out, _ = made
    with caplog.at_level("WARNING", logger="training.data"):
        generate_dataset(pipe, PROMPTS, out, num=2, **SETTINGS)
    assert f"{out} holds 2 items beyond the 2 asked for; they stay in the data set" in caplog.text
    assert len(DistillDataset(out)) == 4


def test_where_fcntl_is_missing_runs_are_not_locked(made, tmp_path, monkeypatch):
    """Windows has no fcntl: make-data (and distill, which imports this module) run there, unlocked."""
    monkeypatch.setattr(data, "fcntl", None)
    out = generate_dataset(made[0], PROMPTS[:1], tmp_path / "d", **SETTINGS)
    assert len(DistillDataset(out)) == 1 and not (out / data.LOCK_FILE).exists()


def test_a_resume_makes_the_items_of_damaged_files_again(made, tmp_path, caplog):
    """A truncated shard (a damaged disk) or a deleted image: the resume reported every item done, and distill failed
    on them mid-training."""
    pipe, reference, _ = made
    out = generate_dataset(pipe, PROMPTS, tmp_path / "d", num=4, **SETTINGS)
    shard = out / "shards" / "000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    (out / "images" / "000000.png").unlink()
    with caplog.at_level("WARNING", logger="training.data"):
        generate_dataset(pipe, PROMPTS, out, num=4, **SETTINGS)
    assert "4 items in damaged or missing files (shards/000000.safetensors, shards/000002.safetensors)" in caplog.text
    dataset = DistillDataset(out)
    assert sorted(e["index"] for e in dataset.entries) == [0, 1, 2, 3]
    for i in range(4):  # every item readable again, and the same as the reference set's
        assert dataset[i]["latent_mean"].shape == (16, 8, 8)
        a, b = (np.asarray(Image.open(folder / f"images/{i:06d}.png"), dtype=int) for folder in (out, reference))
        assert np.abs(a - b).max() <= 1


def test_prompt_lines_are_stripped_and_blank_or_indented_comment_lines_skipped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red circle  \n   \n\t# indented comment\na blue square\t\n")
    assert data.read_prompts(path) == ["a red circle", "a blue square"]
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts.txt is not UTF-8 text \(.*\); save it as UTF-8"):
        data.read_prompts(path)


def test_a_folder_left_holding_only_its_lock_file_is_reused(made, tmp_path):
    pipe = made[0]
    out = tmp_path / "d"
    out.mkdir()
    (out / data.LOCK_FILE).touch()  # what `rm -r d/*` leaves of a data set: the glob skips the dotfile
    assert len(DistillDataset(generate_dataset(pipe, PROMPTS[:1], out, **SETTINGS))) == 1


def test_the_folders_are_fsynced_before_the_manifest_names_their_files(made, tmp_path, monkeypatch):
    pipe = made[0]
    synced, fsync = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    out = generate_dataset(pipe, PROMPTS[:1], tmp_path / "data", **SETTINGS)
    manifest = synced.index(str(out / "manifest.jsonl"))
    for sub in ("images", "shards"):  # the renames into place are durable first
        assert str(out / sub) in synced[:manifest], sub


def test_reading_a_manifest_with_a_torn_line_leaves_the_file_alone(made, tmp_path):
    pipe = made[0]
    out = generate_dataset(pipe, PROMPTS[:1], tmp_path / "d", **SETTINGS)
    with open(out / "manifest.jsonl", "a") as f:  # a make-data run mid-append (or killed there)
        f.write('{"index": 1, "prompt": "a ca')
    before = (out / "manifest.jsonl").read_bytes()
    assert len(DistillDataset(out)) == 1
    assert (out / "manifest.jsonl").read_bytes() == before  # readers never write; only the next writer repairs


def test_a_manifest_line_without_its_row_is_refused_when_opened(made, tmp_path):
    pipe = made[0]
    out = generate_dataset(pipe, PROMPTS[:1], tmp_path / "d", **SETTINGS)
    entry = json.loads((out / "manifest.jsonl").read_text())
    del entry["row"]
    (out / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a valid manifest entry"):
        DistillDataset(out)


def test_items_are_read_in_index_order_after_a_resume_remade_some(made, tmp_path):
    pipe = made[0]
    out = generate_dataset(pipe, PROMPTS, tmp_path / "d", num=4, **SETTINGS)  # shards 000000 (0, 1), 000002 (2, 3)
    (out / "images" / "000000.png").unlink()
    generate_dataset(pipe, PROMPTS, out, num=4, **SETTINGS)  # remakes items 0 and 1: listed after 2 and 3
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [2, 3, 0, 1]
    ds = DistillDataset(out)
    assert [ds[i]["index"] for i in range(4)] == [0, 1, 2, 3]
    assert ds.prompts == [*PROMPTS, PROMPTS[0]]


def test_a_row_of_another_shape_than_info_says_is_refused(made, tmp_path):
    pipe = made[0]
    out = generate_dataset(pipe, PROMPTS[:1], tmp_path / "d", **SETTINGS)
    shard = out / "shards" / "000000.safetensors"
    tensors = load_file(shard)
    tensors["latent_mean"] = tensors["latent_mean"][:, :, :4].contiguous()
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"latent_mean has rows of shape \(16, 4, 8\), info.json says \(16, 8, 8\)"):
        DistillDataset(out)  # when the trainer starts, not when it first draws the item


def test_a_damaged_shard_is_refused_when_the_dataset_opens(made, tmp_path):
    """A shard cut short (a copy interrupted) or a manifest row past a shard's end: the trainer failed when it first
    drew the item, possibly hours in, after run.json had made the same command refuse to start again."""
    pipe = made[0]
    out = generate_dataset(pipe, PROMPTS, tmp_path / "d", num=4, **SETTINGS)
    good = out / "shards/000000.safetensors"
    shard = out / "shards/000002.safetensors"  # the items 2 and 3
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-100])
    with pytest.raises(ValueError, match=r"cannot read shard .*000002.safetensors \(damaged or incomplete file\?\).*"
                       r"re-run make-data on"):  # fmt: skip
        DistillDataset(out)
    shard.write_bytes(good.read_bytes())  # intact, but 2 rows: a manifest of another batch size listing a row 2
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    lines[3]["row"] = 2
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=r"000002.safetensors has 2 rows, manifest.jsonl lists item 3 as row 2"):
        DistillDataset(out)
    shard.write_bytes(blob)
    lines[3]["row"] = 1
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert len(DistillDataset(out)) == 4


def test_a_resume_makes_the_items_of_a_shard_too_short_for_its_rows_again(made, tmp_path, caplog):
    pipe, reference, _ = made
    out = generate_dataset(pipe, PROMPTS, tmp_path / "d", num=4, **SETTINGS)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    lines[3]["row"] = 2  # past the end of its 2-row shard
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level("WARNING", logger="training.data"):
        generate_dataset(pipe, PROMPTS, out, num=4, **SETTINGS)
    assert "2 items in damaged or missing files (shards/000002.safetensors)" in caplog.text
    assert [dataset["latent_mean"].shape for dataset in DistillDataset(out)] == [(16, 8, 8)] * 4
    for i in (2, 3):  # made again, as the reference set made them
        a, b = (np.asarray(Image.open(folder / f"images/{i:06d}.png"), dtype=int) for folder in (out, reference))
        assert np.abs(a - b).max() <= 1


def test_a_shard_whose_tensors_disagree_on_their_rows_is_refused(made, tmp_path):
    out = generate_dataset(made[0], PROMPTS, tmp_path / "d", num=4, **SETTINGS)
    shard = out / "shards/000002.safetensors"
    tensors = load_file(shard)
    tensors["prompt_embeds"] = tensors["prompt_embeds"][:1].contiguous()
    save_file(tensors, shard)
    with pytest.raises(
        ValueError, match=r"000002.safetensors: its tensors have different numbers of rows \(\[1, 2\]\)"
    ):
        DistillDataset(out)


def test_a_resume_makes_the_items_of_a_deleted_shard_again(made, tmp_path, caplog):
    out = generate_dataset(made[0], PROMPTS, tmp_path / "d", num=4, **SETTINGS)
    (out / "shards/000002.safetensors").unlink()
    with caplog.at_level("WARNING", logger="training.data"):
        generate_dataset(made[0], PROMPTS, out, num=4, **SETTINGS)
    assert "2 items in damaged or missing files (shards/000002.safetensors)" in caplog.text
    assert len(DistillDataset(out)) == 4


def test_16_bit_gray_images_import_as_their_gray_levels(made, tmp_path):
    """Pillow opens a 16-bit gray PNG as mode I;16, whose convert("RGB") clips every level above 255: a mid-gray scan
    was stored (image, latents) almost all white. Older Pillow opened it as mode I."""
    pipe, _, _ = made
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(src / "a.png")
    (src / "a.txt").write_text("a gray square")
    out = import_images(pipe, src, tmp_path / "data", resolution=32)
    with Image.open(out / "images/000000.png") as image:
        assert image.getpixel((16, 16)) == (128, 128, 128)
    wide = Image.fromarray(np.array([[0, 257, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I" and np.asarray(data._to_rgb(wide))[0, :, 0].tolist() == [0, 1, 255, 255]


def test_transparent_pixels_import_as_white_not_the_colour_hidden_under_them(made, tmp_path):
    """convert("RGB") kept the colour stored under transparent pixels: a cut-out on black, or an edit's leftovers."""
    pipe, _, _ = made
    src = tmp_path / "images"
    src.mkdir()
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # opaque blue on the left
    rgba.save(src / "a.png")
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 255, 0, 0, 0, 0])  # index 0 green, index 1 black
    palette.paste(0, (0, 0, 16, 32))
    palette.save(src / "b.png", transparency=1)  # black (index 1) is the transparent colour
    half = Image.new("LA", (32, 32), (0, 128))  # half-transparent black
    half.save(src / "c.png")
    for name in "abc":
        (src / f"{name}.txt").write_text(f"picture {name}")
    out = import_images(pipe, src, tmp_path / "data", resolution=32)
    seen = []
    for i in range(3):
        with Image.open(out / f"images/{i:06d}.png") as image:
            seen.append((image.getpixel((4, 16)), image.getpixel((28, 16))))
    assert seen[0] == ((0, 0, 255), (255, 255, 255))
    assert seen[1] == ((0, 255, 0), (255, 255, 255))
    assert seen[2][0] == seen[2][1] and abs(seen[2][0][0] - 127) <= 1  # black over white at alpha 128


def test_a_set_make_data_did_not_finish_is_named_when_opened(made, tmp_path, monkeypatch, caplog):
    pipe, _, _ = made
    encode, calls = data._encode_images, []

    def killed_in_the_second_batch(vae, images):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(vae, images)

    monkeypatch.setattr(data, "_encode_images", killed_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(pipe, PROMPTS, tmp_path / "part", num=6, **SETTINGS)
    with caplog.at_level("WARNING", logger="training.data"):
        assert len(DistillDataset(tmp_path / "part")) == 2
    assert "part holds 2 of the 6 items make-data was last asked for (it stopped early); re-run" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.data"):
        generate_dataset(pipe, PROMPTS, tmp_path / "part", num=3, **SETTINGS)  # asked for fewer: a whole set
        assert len(DistillDataset(tmp_path / "part")) == 3
    assert "stopped early" not in caplog.text


def test_a_folder_of_an_older_clear_dit_opens_and_records_the_count_when_resumed(made, tmp_path, caplog):
    """Its info.json has no 'requested': no warning (nothing to compare with), and a resume writes it."""
    pipe, out, _ = made
    folder = tmp_path / "old"
    shutil.copytree(out, folder)
    info = json.loads((folder / "info.json").read_text())
    del info["requested"]
    (folder / "info.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="training.data"):
        assert len(DistillDataset(folder)) == 4
        generate_dataset(pipe, PROMPTS, folder, num=5, **SETTINGS)
        assert len(DistillDataset(folder)) == 5
    assert "stopped early" not in caplog.text
    assert json.loads((folder / "info.json").read_text())["requested"] == 5


def test_a_run_killed_while_making_its_folders_resumes(made, tmp_path, monkeypatch):
    """info.json is written before the subfolders: a kill between them left a folder the next run refused as not
    clear-dit's."""
    pipe, _, _ = made
    mkdir = Path.mkdir

    def killed_at_shards(self, *args, **kwargs):
        if self.name == "shards":
            raise KeyboardInterrupt
        return mkdir(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", killed_at_shards)
        with pytest.raises(KeyboardInterrupt):
            generate_dataset(pipe, PROMPTS[:1], tmp_path / "data", **SETTINGS)
    assert len(DistillDataset(generate_dataset(pipe, PROMPTS[:1], tmp_path / "data", **SETTINGS))) == 1


def test_one_item_beyond_the_asked_number_is_reported(made, tmp_path, caplog):
    pipe, _, _ = made
    generate_dataset(pipe, PROMPTS, tmp_path / "data", num=2, **SETTINGS)
    with caplog.at_level("WARNING", logger="training.data"):
        generate_dataset(pipe, PROMPTS, tmp_path / "data", num=1, **SETTINGS)
    assert f"{tmp_path / 'data'} holds 1 items beyond the 1 asked for; they stay in the data set" in caplog.text


def test_the_library_refuses_a_number_of_items_below_one(made, tmp_path):
    with pytest.raises(ValueError, match="--num must be a positive int, got 0"):
        generate_dataset(made[0], PROMPTS[:1], tmp_path / "d", num=0, **SETTINGS)
    assert not (tmp_path / "d").exists()
