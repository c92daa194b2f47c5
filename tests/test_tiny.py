"""The built-in tiny FLUX pipeline: offline build, save/load round trip, determinism, tokenizers, loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import tiny
from pipelines.loading import default_max_sequence_length, load_pipeline

COMPONENTS = {
    "scheduler": "FlowMatchEulerDiscreteScheduler",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "T5EncoderModel",
    "tokenizer": "CLIPTokenizer",
    "tokenizer_2": "T5Tokenizer",
    "transformer": "FluxTransformer2DModel",
    "vae": "AutoencoderKL",
}


def _generate(pipe, seed=0, height=64, width=64, prompt="a red circle on a blue background"):
    out = pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=default_max_sequence_length(pipe),
        output_type="pil",
    )
    return out.images[0]


def test_saved_layout(tiny_pipeline_path, tiny_cache_dir):
    assert tiny_pipeline_path == tiny_cache_dir / tiny.TINY_NAME
    index = json.loads((tiny_pipeline_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name, cls in COMPONENTS.items():
        assert index[name][1] == cls, name
        assert (tiny_pipeline_path / name).is_dir(), name
    assert not list(tiny_cache_dir.glob(".*tmp*")), "temporary build folders must not be left behind"


def test_configs_match_flux_structure(tiny_pipe):
    t = tiny_pipe.transformer.config
    assert t.attention_head_dim >= 64 and sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.in_channels == 64 and t.num_layers >= 1 and t.num_single_layers >= 1
    assert t.joint_attention_dim == tiny_pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == tiny_pipe.text_encoder.config.hidden_size
    assert tiny_pipe.vae.config.latent_channels == 16 and tiny_pipe.vae_scale_factor == 8
    assert tiny_pipe.scheduler.config.use_dynamic_shifting
    assert default_max_sequence_length(tiny_pipe) == tiny.T5_MAX_LENGTH


def test_round_trip_equals_fresh_build(tiny_pipe, tmp_path):
    """from_pretrained gives back exactly what a new build makes: the build is deterministic and lossless, and
    the caller's random state is left as it was."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    fresh = tiny.build_tiny_pipeline(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        loaded, built = getattr(tiny_pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert loaded.keys() == built.keys(), name
        for key in loaded:
            torch.testing.assert_close(loaded[key], built[key], rtol=0, atol=0, msg=f"{name}.{key}")
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(tiny_pipe, name).get_vocab() == getattr(fresh, name).get_vocab(), name


def test_t5_config_overrides_win_over_the_defaults(tmp_path):
    pipe = tiny.build_tiny_pipeline(tmp_path, t5_config={"num_layers": 1, "d_ff": 48})
    assert (pipe.text_encoder_2.config.num_layers, pipe.text_encoder_2.config.d_ff) == (1, 48)


def test_clip_tokenizer(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert tok.model_max_length == 77
    ids = tok("A Zebra jumps over 3 quartz boxes!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # byte-level: every character has a token
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra jumps over 3 quartz boxes !"
    padded = tok("a red circle", padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 77)


def test_t5_tokenizer(tiny_pipe):
    tok = tiny_pipe.tokenizer_2
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == tiny.T5_MAX_LENGTH
    ids = tok("a red circle on a blue background").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle on a blue background"
    padded = tok("a red circle", padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 64) and padded.input_ids[0, -1] == tok.pad_token_id


def test_generation_is_deterministic_and_sized(tiny_pipe):
    first, again, other = _generate(tiny_pipe, 0), _generate(tiny_pipe, 0), _generate(tiny_pipe, 1)
    assert first.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert _generate(tiny_pipe, height=64, width=128).size == (128, 64)


def test_cached_folder_is_reused(tiny_pipeline_path, tiny_cache_dir, monkeypatch):
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda *a: pytest.fail("rebuilt a cached pipeline"))
    assert tiny.tiny_pipeline_path(tiny_cache_dir) == tiny_pipeline_path
    assert tiny.tiny_pipeline_path() == tiny_pipeline_path  # CLEAR_DIT_CACHE points at the session cache


@pytest.mark.parametrize(
    ("complete", "fault"),
    [
        (None, "is incomplete (a build was interrupted)"),
        (tiny.TINY_NAME + "\n", "was built by an older clear-dit that kept no list of its files"),
        (
            tiny.TINY_NAME + "\nmodel_index.json 2\n",
            "was built by an older clear-dit that kept no checksums of its files",
        ),
        ("", "is damaged (a file was deleted or changed since it was built)"),  # not "older": all() of nothing
        ("model_index.json 2\n", "is damaged (a file was deleted or changed since it was built)"),
        (b"\xff\xfe", "is incomplete (a build was interrupted)"),  # no text: it failed every run with a decode error
    ],
)
def test_a_half_written_cache_folder_is_built_again(tiny_pipeline_path, tmp_path, monkeypatch, caplog, complete, fault):
    """An interrupted build left model_index.json without the rest (and without .complete); an earlier version's
    .complete held the name alone, so damage to its files did not show."""
    target = tmp_path / tiny.TINY_NAME
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    if isinstance(complete, bytes):
        (target / ".complete").write_bytes(complete)
    elif complete is not None:
        (target / ".complete").write_text(complete)

    class Copy:
        def save_pretrained(self, folder):
            shutil.copytree(tiny_pipeline_path, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda work_dir: (work_dir.mkdir(), Copy())[1])
    assert tiny.tiny_pipeline_path(tmp_path) == target
    assert (target / "transformer").is_dir() and (target / ".complete").is_file()
    assert f"the tiny pipeline in {target} {fault}: replacing it" in caplog.text


def _copy_instead_of_building(monkeypatch, source):
    class Copy:
        def save_pretrained(self, folder):
            shutil.copytree(source, folder, dirs_exist_ok=True)
            for weights in Path(folder).rglob("*.safetensors"):
                weights.chmod(0o600)  # as safetensors writes them

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda work_dir: (work_dir.mkdir(), Copy())[1])


@pytest.mark.parametrize("damage", ["deleted", "cut short", "tokenizer deleted"])
def test_a_damaged_cache_is_built_again(tiny_pipeline_path, tmp_path, monkeypatch, caplog, damage):
    """Each damage failed every later run with an error about a missing .bin, or (without the T5 tokenizer's
    tokenizer.json) loaded a 4-token tokenizer that turned every prompt into unknown tokens."""
    target = tmp_path / tiny.TINY_NAME
    shutil.copytree(tiny_pipeline_path, target)
    weights = target / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "deleted":
        weights.unlink()
    elif damage == "cut short":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (target / "tokenizer_2" / "tokenizer.json").unlink()
    _copy_instead_of_building(monkeypatch, tiny_pipeline_path)
    assert tiny.tiny_pipeline_path(tmp_path) == target
    assert f"the tiny pipeline in {target} is damaged (a file was deleted or changed since it was built)" in caplog.text
    pipe = tiny.load_tiny_pipeline(cache_dir=tmp_path)
    assert len(pipe.tokenizer_2) == len(tiny.load_tiny_pipeline().tokenizer_2) > 100


def test_a_changed_file_of_the_same_size_is_built_again(tiny_pipeline_path, tmp_path, monkeypatch, caplog):
    """Sizes alone let a cache with NaN weights through: every image came out black, exit code 0."""
    target = tmp_path / tiny.TINY_NAME
    shutil.copytree(tiny_pipeline_path, target)
    weights = target / "transformer" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-4096] + b"\xff\xff\xff\x7f" * 1024)  # NaN floats, same size
    _copy_instead_of_building(monkeypatch, tiny_pipeline_path)
    assert tiny.tiny_pipeline_path(tmp_path) == target
    assert weights.read_bytes() == good and f"the tiny pipeline in {target} is damaged" in caplog.text


def test_a_cache_folder_that_cannot_be_made_names_the_variable_to_set(tmp_path):
    (tmp_path / "file").write_text("")
    message = r"cannot write to the tiny model's cache folder .*/file/cache \(Not a directory\): set "
    with pytest.raises(OSError, match=message + f"{tiny.CACHE_ENV} to a writable folder"):
        tiny.tiny_pipeline_path(tmp_path / "file" / "cache")


def test_a_build_that_does_not_load_never_becomes_the_cache(tiny_pipeline_path, tmp_path, monkeypatch):
    def broken(folder):  # what a torchrun rank other than 0 saved: no text encoder weights
        shutil.copytree(tiny_pipeline_path, folder, dirs_exist_ok=True)
        (folder / "text_encoder" / "model.safetensors").unlink()

    monkeypatch.setattr(tiny, "save_tiny_pipeline", broken)
    with pytest.raises(OSError, match="the tiny pipeline just built does not load"):
        tiny.tiny_pipeline_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_in_a_fresh_process_names_its_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"separate process failed: NotADirectoryError: .*file"):
        tiny._save_in_a_fresh_process(tmp_path / "file" / "build")


def test_a_cache_folder_that_cannot_be_written_names_the_variable_to_set(tmp_path, monkeypatch):
    """Another user's shared cache, a read-only mount: the build's temporary folder cannot be made there."""

    def refused(**kwargs):
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    monkeypatch.setattr(tiny.tempfile, "mkdtemp", refused)
    message = f"cannot write to the tiny model's cache folder {tmp_path} \\(Permission denied\\): set {tiny.CACHE_ENV}"
    with pytest.raises(OSError, match=message):
        tiny.tiny_pipeline_path(tmp_path)


def _build_on_rank_1(cache: str) -> bool:
    """Rank 1 of a gloo group builds the cache (rank 0 waits): transformers saves files on rank 0 only."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        tiny.load_tiny_pipeline(cache_dir=cache)
    dist.barrier()
    return True


def test_a_build_in_a_distributed_process_other_than_rank_0_is_whole(tmp_path):
    """`torchrun ... generate --parallel` on a fresh cache: rank 1's build had empty text encoder folders, was
    marked complete, and failed that run and every later one until the cache was deleted by hand."""
    from pipelines.parallel import launch_local

    results = launch_local(_build_on_rank_1, 2, (str(tmp_path),), timeout_s=300, group_timeout_s=240)
    assert all(r.exitcode == 0 for r in results), [r.error for r in results]
    folder = tmp_path / tiny.TINY_NAME
    assert (folder / "text_encoder" / "model.safetensors").is_file() and tiny._is_complete(folder)
    assert len(tiny.load_tiny_pipeline(cache_dir=tmp_path).tokenizer_2) > 100


def test_a_cache_under_home_is_expanded_and_takes_the_mode_of_new_folders(tiny_pipeline_path, tmp_path, monkeypatch):
    """Not mkdtemp's 0700 (other users of a shared cache could not read it), nor a sticky /tmp-like root's 0777."""
    import os

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o1777)
    umask = os.umask(0o022)
    os.umask(umask)
    _copy_instead_of_building(monkeypatch, tiny_pipeline_path)
    assert tiny.tiny_pipeline_path("~/cache") == tmp_path / "cache" / tiny.TINY_NAME
    assert not (tmp_path / "~").exists()
    folder = tmp_path / "cache" / tiny.TINY_NAME
    assert folder.stat().st_mode & 0o7777 == 0o777 & ~umask
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"  # safetensors writes 0600 files
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_tiny_model_loads_in_the_dtype_asked_for():
    assert load_pipeline("tiny", torch_dtype=torch.bfloat16).transformer.dtype == torch.bfloat16


def test_losing_a_build_race_is_fine(tiny_pipeline_path, tmp_path, monkeypatch):
    """Another process renames its finished build into place first: ours is dropped, theirs is used."""
    target = tmp_path / tiny.TINY_NAME

    class Racer:
        def save_pretrained(self, folder):
            shutil.copytree(tiny_pipeline_path, folder, dirs_exist_ok=True)
            shutil.copytree(tiny_pipeline_path, target)  # the other process wins meanwhile

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda work_dir: (work_dir.mkdir(), Racer())[1])
    assert tiny.tiny_pipeline_path(tmp_path) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{tiny.TINY_NAME}.lock", tiny.TINY_NAME]


def test_a_second_replacer_of_a_damaged_cache_never_deletes_the_first_ones_build(
    tiny_pipeline_path, tmp_path, monkeypatch
):
    """Two builders both found the folder damaged; the first renamed its build into place (and loaded it), then
    the second deleted that build and put its own there."""
    target = tmp_path / tiny.TINY_NAME
    shutil.copytree(tiny_pipeline_path, target)
    (target / "model_index.json").unlink()
    _copy_instead_of_building(monkeypatch, tiny_pipeline_path)
    fault, replaced = tiny._fault, []

    def other_builder_replaces_it_now(path):  # between our "damaged" and our rmtree, as far as a lock lets it
        import fcntl

        with open(tmp_path / f".{tiny.TINY_NAME}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # we hold it: the other builder waits until ours is in place
                return fault(path)
            shutil.rmtree(path)
            shutil.copytree(tiny_pipeline_path, path)
            replaced.append(path.stat().st_ino)
        return fault(path)

    monkeypatch.setattr(tiny, "_fault", other_builder_replaces_it_now)
    assert tiny.tiny_pipeline_path(tmp_path) == target and tiny._is_complete(target)
    assert replaced in ([], [target.stat().st_ino])


@pytest.mark.parametrize("kind", ["file", "link"])
def test_something_else_in_the_cache_folders_place_is_named(tiny_pipeline_path, tmp_path, monkeypatch, kind):
    """A rename cannot replace either: a raw 'Not a directory: .tiny-flux-v1.tmp-x -> ...' after a build, every run."""
    target = tmp_path / tiny.TINY_NAME
    if kind == "file":
        target.write_text("mine")
    else:
        shutil.copytree(tiny_pipeline_path, tmp_path / "elsewhere")
        (tmp_path / "elsewhere" / "model_index.json").unlink()
        target.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda *a: pytest.fail("built before the refusal"))
    what = "not a folder" if kind == "file" else "a link to a folder that is no complete build"
    with pytest.raises(OSError, match=f"cache folder {target} is {what}: remove it, or set {tiny.CACHE_ENV} to an"):
        tiny.tiny_pipeline_path(tmp_path)
    assert kind == "link" or target.read_text() == "mine"


def test_a_cache_under_an_unknown_users_home_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(tiny.CACHE_ENV, "~nosuchuser-clear-dit/cache")
    message = rf"cannot find the folder ~nosuchuser-clear-dit/cache of \${tiny.CACHE_ENV} \(.*\): set {tiny.CACHE_ENV}"
    with pytest.raises(OSError, match=message):
        tiny.tiny_pipeline_path()


def test_a_killed_builds_temporary_folder_is_removed_by_the_next_build(tmp_path, tiny_pipeline_path, monkeypatch):
    import os
    import time

    stale, live = tmp_path / f".{tiny.TINY_NAME}.tmp-killed", tmp_path / f".{tiny.TINY_NAME}.tmp-running"
    for folder in (stale, live):
        (folder / "transformer").mkdir(parents=True)
    old = time.time() - tiny.STALE_BUILD_S - 60
    os.utime(stale, (old, old))

    class Copy:
        def save_pretrained(self, folder):
            shutil.copytree(tiny_pipeline_path, folder, dirs_exist_ok=True)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda work_dir: (work_dir.mkdir(), Copy())[1])
    assert tiny.tiny_pipeline_path(tmp_path) == tmp_path / tiny.TINY_NAME
    assert not stale.exists() and live.exists()  # another process may still be building in the fresh one


def test_load_pipeline_tiny_and_local_folder(tiny_pipeline_path):
    assert load_pipeline("tiny").transformer.config.attention_head_dim == 64
    pipe = load_pipeline(str(tiny_pipeline_path), torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_pipeline(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="model folder not found: no/such/folder"):  # a path, not a hub id
        load_pipeline("no/such/folder")
    unet = tmp_path / "sd15"  # a UNet pipeline: its model_index.json names no transformer at all
    unet.mkdir()
    (unet / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]}')
    with pytest.raises(ValueError, match="its model_index.json names no transformer class"):
        load_pipeline(str(unet))
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ValueError, match="'someone/no-such-model'.*hub"):  # HF_HUB_OFFLINE=1 (conftest)
        load_pipeline("someone/no-such-model")
    with pytest.raises(ValueError, match=r"could not load model 'my model': it is no local folder"):  # no valid id
        load_pipeline("my model")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model.safetensors' is a file, not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path / "model.safetensors"))
    (tmp_path / "list" / "model_index.json").parent.mkdir()
    (tmp_path / "list" / "model_index.json").write_text("[]")
    with pytest.raises(ValueError, match=r"list': its model_index.json names no transformer class"):
        load_pipeline(str(tmp_path / "list"))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"text_encoder_2": [None, None], "tokenizer_2": [None, None]}, r"gives text_encoder_2, tokenizer_2 as no \["),
        ({"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler", "x"]}, r"gives scheduler as no \[library"),
        ({"transformer": "FluxTransformer2DModel"}, r"its model_index.json names no transformer class"),
    ],
)
def test_odd_model_index_entries_are_one_line_naming_the_model(tiny_pipeline_path, tmp_path, entries, message):
    """A pipeline saved without its T5 encoder gave diffusers' 'expected [...] but only {...} were passed'; odd entries
    gave 'too many values to unpack', or 'a FluxPipeline with a l'."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_path, folder)
    index = json.loads((folder / "model_index.json").read_text()) | entries
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"^'{folder}': .*{message}"):
        load_pipeline(str(folder))


def test_an_incomplete_pipeline_folder_names_what_it_lacks(tiny_pipeline_path, tmp_path, capsys):
    """diffusers' own error named the pipeline folder ("no file named config.json found in directory ...")."""
    from app.cli import main

    partial = tmp_path / "partial"
    shutil.copytree(tiny_pipeline_path, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ValueError, match=r"incomplete pipeline folder: its model_index.json lists vae, which has no"):
        load_pipeline(str(partial))
    shutil.rmtree(partial / "scheduler")
    args = ["generate", "--prompt", "x", "--model", str(partial), "--out", str(tmp_path / "x.png")]
    assert main(args) == 1
    assert capsys.readouterr().err.endswith("lists scheduler, vae, which have no folder there\n")
    for name in ("tokenizer", "tokenizer_2"):  # transformers makes up an empty tokenizer without its folder
        lacking = tmp_path / name
        shutil.copytree(tiny_pipeline_path, lacking)
        shutil.rmtree(lacking / name)
        with pytest.raises(ValueError, match=rf"lists {name}, which has no folder there"):
            load_pipeline(str(lacking))
    (partial / "scheduler").write_text("a file where the folder should be")
    with pytest.raises(ValueError, match=r"lists scheduler, vae, which have no folder there"):
        load_pipeline(str(partial))
    # optional components left out ([null, null] in model_index.json) are no folders in a complete one, and an entry
    # FluxPipeline does not take is no folder diffusers needs (it warns and loads the rest)
    extra = tmp_path / "extra"
    shutil.copytree(tiny_pipeline_path, extra)
    index = json.loads((extra / "model_index.json").read_text())
    (extra / "model_index.json").write_text(json.dumps(index | {"safety_checker": ["diffusers", "Foo"]}))
    assert load_pipeline(str(extra)).image_encoder is None


def test_files_name_a_model_folder_by_its_name_not_its_path(tmp_path):
    from pipelines.loading import published_model_name

    (tmp_path / "my-flux").mkdir()
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert published_model_name(str(tmp_path / "my-flux")) == "my-flux"
    assert published_model_name(str(snapshot)) == "black-forest-labs/FLUX.1-schnell"
    assert published_model_name("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"  # a hub id
    assert published_model_name("tiny") == "tiny"
    (tmp_path / "flux-dev").symlink_to(snapshot)  # a link to a snapshot: the repo id, not the link's name
    assert published_model_name(str(tmp_path / "flux-dev")) == "black-forest-labs/FLUX.1-schnell"
    elsewhere = tmp_path / "work" / "snapshots" / "v2"  # a snapshots folder outside the hub cache: its own name
    elsewhere.mkdir(parents=True)
    assert published_model_name(str(elsewhere)) == "v2"


def test_a_missing_folder_under_home_is_a_missing_folder_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model folder not found: ~/nope"):
        load_pipeline("~/nope")


def test_a_model_folder_under_home_loads(tiny_pipeline_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_pipeline_path, tmp_path / "flux")
    assert load_pipeline("~/flux").transformer.config.attention_head_dim == 64


def test_the_sequence_length_is_the_tokenizers_limit_at_most_512():
    from types import SimpleNamespace

    def pipe(limit):
        return SimpleNamespace(tokenizer_2=SimpleNamespace(model_max_length=limit))

    assert default_max_sequence_length(pipe(64)) == 64
    assert default_max_sequence_length(pipe(int(1e30))) == 512  # transformers' "no limit" of a tokenizer saved so
    schnell = SimpleNamespace(tokenizer_2=SimpleNamespace(model_max_length=512),
                              transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=False)))  # fmt: skip
    assert default_max_sequence_length(schnell) == 256  # FLUX.1-schnell: no guidance embedding, 256 T5 tokens


def test_load_pipeline_refuses_folders_of_other_pipelines(tiny_pipeline_path, tmp_path, capsys, monkeypatch):
    """diffusers loads an SD3 or FLUX Control folder's components into a FluxPipeline, which then fails mid-run."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from app.cli import main

    other = tmp_path / "sd3"
    shutil.copytree(tiny_pipeline_path, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"transformer": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(ValueError, match="is a FluxPipeline with a SD3Transformer2DModel; this runs FLUX.1 text-to"):
        load_pipeline(str(other))

    control = tmp_path / "control"
    shutil.copytree(tiny_pipeline_path, control)
    (control / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxControlPipeline"}))
    shutil.rmtree(control / "transformer")
    config = tiny.TRANSFORMER_CONFIG | {"in_channels": 128, "out_channels": 64}  # latents + control image latents
    FluxTransformer2DModel(**config).save_pretrained(control / "transformer")
    with monkeypatch.context() as patched:  # refused from the config files, before any component loads
        patched.setattr(FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the components"))
        with pytest.raises(ValueError, match="FluxControlPipeline whose transformer takes 128 input channels, not 4 x"):
            load_pipeline(str(control))
    plain = tmp_path / "plain"  # a config that leaves in_channels to its class's default (64): read from the model
    shutil.copytree(tiny_pipeline_path, plain)
    config = json.loads((plain / "transformer" / "config.json").read_text())
    del config["in_channels"]
    (plain / "transformer" / "config.json").write_text(json.dumps(config))
    assert load_pipeline(str(plain)).transformer.config.in_channels == 64
    args = ["generate", "--prompt", "x", "--model", str(control), "--out", str(tmp_path / "x.png")]
    assert main([*args, "--height", "32", "--width", "32", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "takes 128 input channels" in err and "Traceback" not in err and not (tmp_path / "x.png").exists()

    import huggingface_hub

    hub = tmp_path / "hub"  # a hub cache as huggingface_hub lays it out, read offline (conftest)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    (hub / "models--me--lora" / "snapshots" / "c0ffee").mkdir(parents=True)  # a repo of single files
    (hub / "models--me--lora" / "snapshots" / "c0ffee" / "lora.safetensors").write_bytes(b"x")
    (hub / "models--me--lora" / "refs").mkdir()
    (hub / "models--me--lora" / "refs" / "main").write_text("c0ffee")
    with pytest.raises(ValueError, match=r"^'me/lora' on the hub is not a diffusers pipeline \(it has no model_"):
        load_pipeline("me/lora")
    for repo, folder in (("me--control", control), ("me--flux", tiny_pipeline_path)):
        (hub / f"models--{repo}" / "refs").mkdir(parents=True)
        (hub / f"models--{repo}" / "refs" / "main").write_text("c0ffee")
        shutil.copytree(folder, hub / f"models--{repo}" / "snapshots" / "c0ffee")
    with monkeypatch.context() as patched:  # a hub id is refused from its config files, before the weights download
        patched.setattr(FluxPipeline, "download", lambda *a, **k: pytest.fail("downloaded the whole pipeline"))
        with pytest.raises(ValueError, match="'me/control' is a FluxControlPipeline whose transformer takes 128"):
            load_pipeline("me/control")
    assert load_pipeline("me/flux").transformer.config.in_channels == 64  # then a FLUX.1 one downloads and loads


def test_a_group_writable_umask_gives_a_group_writable_cache(tiny_pipeline_path, tmp_path, monkeypatch):
    import os
    import shutil
    from pathlib import Path

    from pipelines import tiny

    class Copy:
        def save_pretrained(self, folder):
            for src in sorted(tiny_pipeline_path.rglob("*")):  # folders and files as new ones (the umask's modes)
                dst = Path(folder) / src.relative_to(tiny_pipeline_path)
                dst.mkdir(exist_ok=True) if src.is_dir() else shutil.copyfile(src, dst)
            for weights in Path(folder).rglob("*.safetensors"):
                weights.chmod(0o600)  # as safetensors writes them

    monkeypatch.setattr(tiny, "build_tiny_pipeline", lambda work_dir: (work_dir.mkdir(), Copy())[1])
    umask = os.umask(0o002)
    try:
        folder = tiny.tiny_pipeline_path(tmp_path)
    finally:
        os.umask(umask)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o664


def test_the_t5_tokenizer_is_the_same_in_every_process(tmp_path):
    """Within one process every build agrees; the trainer's float sums and hash-map order vary between processes."""
    import os

    code = "import sys, pathlib, pipelines.tiny as t; t.train_t5_tokenizer(pathlib.Path(sys.argv[1]))"
    files = []
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], env=env, check=True, capture_output=True)
        files.append((tmp_path / seed / "tokenizer.json").read_bytes())
    assert files[0] == files[1] == files[2]


def test_an_empty_cache_variable_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv(tiny.CACHE_ENV, "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny.cache_root() == tmp_path / ".cache" / "clear-dit"


def test_the_cache_variable_expands_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(tiny.CACHE_ENV, "~/tiny-cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny.cache_root() == tmp_path / "tiny-cache"


def test_a_cache_folder_whose_parents_are_missing_is_made(tiny_pipeline_path, tmp_path, monkeypatch):
    _copy_instead_of_building(monkeypatch, tiny_pipeline_path)
    root = tmp_path / "no" / "such" / "cache"
    assert tiny.tiny_pipeline_path(root) == root / tiny.TINY_NAME
    assert tiny._is_complete(root / tiny.TINY_NAME)


def test_the_manifest_starts_with_the_recipe_name(tiny_pipeline_path):
    lines = (tiny_pipeline_path / ".complete").read_text().splitlines()
    assert lines[0] == tiny.TINY_NAME and all(len(line.split()) == 3 for line in lines[1:])


def test_the_fresh_build_process_imports_this_package(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, env, **kwargs):
        seen["path"] = env["PYTHONPATH"].split(os.pathsep)[0]
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tiny.subprocess, "run", run)
    tiny._save_in_a_fresh_process(tmp_path)
    assert (Path(seen["path"]) / "pipelines" / "tiny.py").resolve() == Path(tiny.__file__).resolve()
