"""CLEAR checkpoints: the published format loads unchanged; our own files configure themselves."""

import huggingface_hub.constants
import pytest
import torch
from dit_models import TINY_SD35_CONFIG, tiny_sd3_transformer
from flux_models import flux_inputs, run, tiny_flux_transformer
from safetensors import safe_open
from safetensors.torch import save_file

import clear_dit
from clear_dit.weights import is_clear_key

ATTN = ("to_q", "to_k", "to_v")


def official_tensors(model, down_factor: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A checkpoint written the way the published clear_local_*.safetensors are: names, shapes, no metadata."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    names = [
        f"transformer_blocks.{i}.attn.{p}.{kind}"
        for i in range(len(model.transformer_blocks))
        for p in (*ATTN, "to_out.0")
        for kind in ("weight", "bias")
    ] + [
        f"single_transformer_blocks.{i}.attn.{p}.{kind}"
        for i in range(len(model.single_transformer_blocks))
        for p in ATTN
        for kind in ("weight", "bias")
    ]
    tensors = {name: torch.randn(sd[name].shape, generator=g) * 0.1 for name in names}
    if down_factor > 1:
        d = down_factor
        blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
        blocks += [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]
        for block in blocks:
            tensors[f"{block}.attn.processor.spatial_weight"] = torch.rand((1, 1, 1, d, 1, d, 1), generator=g)
    return tensors


@pytest.fixture()
def model(tmp_path):
    return tiny_flux_transformer(tmp_path / "transformer")


@pytest.mark.parametrize(
    ("filename", "radius", "down"), [("clear_local_8.safetensors", 8, 1), ("clear_local_2_down_2.safetensors", 2, 2)]
)
def test_official_files_load_unchanged(model, tmp_path, filename, radius, down):
    tensors = official_tensors(model, down)
    path = tmp_path / filename
    save_file(tensors, str(path))
    handle = clear_dit.load_weights(model, path)
    assert (handle.window_size, handle.down_factor) == (radius, down)
    state = model.state_dict()
    for name, value in tensors.items():
        torch.testing.assert_close(state[name], value, atol=0, rtol=0)
    assert set(clear_dit.clear_state_dict(model)) == set(tensors)
    # the same model built by hand: patched with the file name's radius and down factor, the tensors copied in
    # under their published names by torch's own load_state_dict (the pooling weights too)
    reference = tiny_flux_transformer(tmp_path / "reference")
    clear_dit.patch(reference, window_size=radius, down_factor=down)
    missing, unexpected = reference.load_state_dict(tensors, strict=False)
    assert not unexpected and not set(tensors) & set(missing)
    inputs = flux_inputs((12, 10))
    out = run(model, inputs)
    torch.testing.assert_close(out, run(reference, inputs), atol=0, rtol=0)
    if down > 1:  # and the pooling weights are used: uniform ones give another output
        with torch.no_grad():
            for name, value in clear_dit.clear_state_dict(reference).items():
                if name.endswith("spatial_weight"):
                    value.fill_(1 / down**2)
        assert (run(reference, inputs) - out).abs().max() > 1e-4


def test_radius_argument_for_files_without_metadata_or_published_name(model, tmp_path):
    path = tmp_path / "my_weights.safetensors"
    save_file(official_tensors(model, 1), str(path))
    with pytest.raises(ValueError, match=r"has no CLEAR metadata .* pass window_size \(clear-dit: --window\)"):
        clear_dit.load_weights(model, path)
    assert clear_dit.load_weights(model, path, window_size=3).window_size == 3


def test_a_radius_other_than_the_files_is_used_and_said(model, tmp_path, caplog):
    path = tmp_path / "clear_local_2.safetensors"  # its name says radius 2
    save_file(official_tensors(model, 1), str(path))
    with caplog.at_level("WARNING", logger="clear_dit.weights"):
        assert clear_dit.read_weights(path, window_size=2).window_size == 2
        assert not caplog.text
        assert clear_dit.read_weights(path, window_size=5).window_size == 5
    assert "clear_local_2.safetensors was made for window_size 2; using it with window_size 5 as asked" in caplog.text


def test_save_load_round_trip_with_metadata(model, tmp_path):
    inputs = flux_inputs((4, 6), text_len=3)
    clear_dit.patch(model, window_size=3, down_factor=2, backend="dense")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if clear_dit.weights.is_clear_key(name):
                param.add_(torch.randn_like(param) * 0.05)
    expected = run(model, inputs)
    path = clear_dit.save_weights(model, tmp_path / "run" / "student.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["window_size"] == "3" and meta["down_factor"] == "2"
    assert meta["base_model"] == meta["model_class"] == "FluxTransformer2DModel"  # no base model named
    named = clear_dit.save_weights(model, tmp_path / "named.safetensors", base_model="black-forest-labs/FLUX.1-dev")
    with safe_open(str(named), framework="pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev" and meta["model_class"] == "FluxTransformer2DModel"

    fresh = tiny_flux_transformer(tmp_path / "fresh")
    handle = clear_dit.load_weights(fresh, path, backend="dense")
    assert handle.config["window_size"] == 3 and handle.config["down_factor"] == 2
    torch.testing.assert_close(run(fresh, inputs), expected, atol=0, rtol=0)


def test_metadata_wins_over_the_file_name_and_only_the_file_name_is_read(model, tmp_path):
    clear_dit.patch(model, window_size=3, down_factor=2)
    renamed = clear_dit.save_weights(model, tmp_path / "clear_local_8.safetensors")  # e.g. copied as "the r8 run"
    assert clear_dit.weights.read_weights_config(renamed) == (3, 2)
    assert clear_dit.load_weights(model, renamed).config["window_size"] == 3
    folder = tmp_path / "clear_local_16_runs"  # a folder's name says nothing about the files in it
    folder.mkdir()
    save_file(official_tensors(model, 1), str(folder / "converted.safetensors"))
    with pytest.raises(ValueError, match=r"has no CLEAR metadata .* pass window_size"):
        clear_dit.read_weights(folder / "converted.safetensors")


def test_files_of_either_down_factor_load_into_a_patched_model(model, tmp_path):
    plain = tmp_path / "clear_local_2.safetensors"
    save_file(official_tensors(model, 1), str(plain))
    pooled = tmp_path / "clear_local_2_down_2.safetensors"
    save_file(official_tensors(model, 2), str(pooled))
    assert clear_dit.load_weights(model, pooled).down_factor == 2
    assert clear_dit.load_weights(model, plain).down_factor == 1  # its own down factor, not the patch's
    assert not any("spatial_weight" in name for name in model.state_dict())
    assert clear_dit.load_weights(model, pooled).down_factor == 2
    # a down factor asked for wins over the file's, and a plain file says it was made for 1 (a list of missing
    # spatial_weight keys did not)
    message = r"clear_local_2.safetensors holds no pooling weights \(spatial_weight\): it was made for down_factor 1, "
    with pytest.raises(ValueError, match=message + r"not 2 \(clear-dit: --down 1\)$"):
        clear_dit.load_weights(model, plain, down_factor=2)


def test_save_refuses_unpatched_models_and_existing_files(model, tmp_path):
    with pytest.raises(ValueError, match="needs a CLEAR-patched model"):
        clear_dit.save_weights(model, tmp_path / "w.safetensors")
    clear_dit.patch(model, window_size=2)
    path = clear_dit.save_weights(model, tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        clear_dit.save_weights(model, path)
    assert path.read_bytes() == before
    clear_dit.save_weights(model, path, overwrite=True)
    (tmp_path / "out").mkdir()
    for overwrite in (False, True):  # it said "exists; pass overwrite=True", then failed renaming onto the folder
        with pytest.raises(IsADirectoryError, match=r"out is a folder: name the weights file, e.g. .*out/clear"):
            clear_dit.save_weights(model, tmp_path / "out", overwrite=overwrite)


def test_a_save_touches_no_other_file_and_a_failed_one_leaves_the_old_file(model, tmp_path, monkeypatch):
    """The temporary file had a fixed name (a user's w.safetensors.tmp was replaced and renamed away) and stayed
    behind when the save failed."""
    clear_dit.patch(model, window_size=2)
    mine = tmp_path / "w.safetensors.tmp"
    mine.write_text("my notes")
    path = clear_dit.save_weights(model, tmp_path / "w.safetensors")
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"torn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clear_dit.weights, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        clear_dit.save_weights(model, path, overwrite=True)
    assert path.read_bytes() == before and mine.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer", "w.safetensors", "w.safetensors.tmp"]


def test_mismatched_files_fail_naming_the_keys(model, tmp_path):
    tensors = official_tensors(model, 1)
    reference = run(model, flux_inputs((4, 4)))

    missing = dict(tensors)
    del missing["single_transformer_blocks.1.attn.to_k.weight"]
    save_file(missing, str(tmp_path / "clear_local_4.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: single_transformer_blocks\.1\.attn\.to_k\.weight"):
        clear_dit.load_weights(model, tmp_path / "clear_local_4.safetensors")

    extra = {**tensors, "transformer_blocks.0.attn.add_q_proj.weight": torch.zeros(32, 32)}
    save_file(extra, str(tmp_path / "clear_local_5.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected: transformer_blocks\.0\.attn\.add_q_proj\.weight"):
        clear_dit.load_weights(model, tmp_path / "clear_local_5.safetensors")

    wrong = {**tensors, "transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 16)}
    save_file(wrong, str(tmp_path / "clear_local_6.safetensors"))
    with pytest.raises(ValueError, match=r"wrong shape: transformer_blocks\.0\.attn\.to_q\.weight \(32, 16\)"):
        clear_dit.load_weights(model, tmp_path / "clear_local_6.safetensors")

    pooled = official_tensors(model, 2)
    save_file(pooled, str(tmp_path / "pooled.safetensors"))
    with pytest.raises(ValueError, match="holds pooling weights .* pass down_factor"):
        clear_dit.load_weights(model, tmp_path / "pooled.safetensors", window_size=4)

    # a failed load leaves the model as it was
    assert clear_dit.patch_handle(model) is None
    torch.testing.assert_close(run(model, flux_inputs((4, 4))), reference, atol=0, rtol=0)


def test_home_paths_are_expanded_alike_when_saving_and_loading(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    clear_dit.patch(model, window_size=2)
    path = clear_dit.save_weights(model, "~/w/clear_local_2.safetensors")
    assert path == tmp_path / "home" / "w" / "clear_local_2.safetensors" and path.is_file()
    assert clear_dit.read_weights("~/w/clear_local_2.safetensors").window_size == 2


def test_missing_files_and_unreachable_hub(model, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="CLEAR weights file not found: .*nope.safetensors"):
        clear_dit.load_weights(model, tmp_path / "nope.safetensors")
    for relative in ("./runs/clear_local_2.safetensors", "../runs/clear_local_2.safetensors"):  # not hub ids
        with pytest.raises(FileNotFoundError, match="CLEAR weights file not found"):
            clear_dit.load_weights(model, relative)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        clear_dit.load_weights(model, tmp_path / "garbage.safetensors", window_size=4)
    torch.save({}, tmp_path / "clear_local_2.pt")
    with pytest.raises(ValueError, match=r"clear_local_2.pt is not a readable safetensors file: .*; CLEAR weights are "
                                         r"\.safetensors files \(convert a \.pt/\.bin state dict"):  # fmt: skip
        clear_dit.load_weights(model, tmp_path / "clear_local_2.pt")
    monkeypatch.chdir(tmp_path)
    for name in ("clear_local_2.safetensors", "runs/clear_local_2.safetensors"):  # no owner/repo/file: no hub id
        with pytest.raises(FileNotFoundError, match=f"CLEAR weights file not found: {name}"):
            clear_dit.read_weights(name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = r"Huage001/CLEAR/clear_local_16.safetensors is no local file, and fetching 'clear_local_16.safetensors' from"
    with pytest.raises(ValueError, match=hub + " hub repo Huage001/CLEAR failed"):
        clear_dit.load_weights(model, "Huage001/CLEAR/clear_local_16.safetensors")


def test_radius_and_down_factor_of_zero_or_bad_metadata_are_refused(model, tmp_path, caplog):
    """0 is not "not given" (the file's own values were used after a warning that said 0 was)."""
    path = tmp_path / "clear_local_2.safetensors"
    save_file(official_tensors(model, 1), str(path))
    for kwargs, message in [
        (dict(window_size=0), "window_size must be a positive int .*, got 0"),
        (dict(window_size=-3), "window_size must be a positive int .*, got -3"),
        (dict(window_size=2.5), "window_size must be a positive int .*, got 2.5"),
        (dict(down_factor=0), "down_factor must be a positive int .*, got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            clear_dit.read_weights(path, **kwargs)
    assert "as asked" not in caplog.text
    save_file(official_tensors(model, 1), str(path), metadata={"window_size": "4.0"})
    with pytest.raises(ValueError, match=r"clear_local_2.safetensors: its metadata window_size='4.0' is not a posi"):
        clear_dit.read_weights(path)
    zero = tmp_path / "clear_local_8_down_0.safetensors"  # `or` read the name's 0 as "not given": d = 1
    save_file(official_tensors(model, 1), str(zero))
    with pytest.raises(ValueError, match=r"^clear_local_8_down_0.safetensors: its name gives down_factor 0; pass a "):
        clear_dit.read_weights(zero)
    assert clear_dit.read_weights(zero, down_factor=1).down_factor == 1
    save_file(official_tensors(model, 1), str(tmp_path / "clear_local_0.safetensors"))
    with pytest.raises(ValueError, match=r"^clear_local_0.safetensors: its name gives window_size 0; pass a window"):
        clear_dit.read_weights(tmp_path / "clear_local_0.safetensors")


def test_read_weights_config_reads_the_header_alone(model, tmp_path, monkeypatch):
    """The CLI checks a file before loading the model: reading its tensors there would cost a whole read."""
    clear_dit.patch(model, window_size=3, down_factor=2)
    path = clear_dit.save_weights(model, tmp_path / "w.safetensors")
    opened = []

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)
            opened.append(self)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            if name == "get_tensor":
                raise AssertionError("a header-only read loaded a tensor")
            return getattr(self.file, name)

    monkeypatch.setattr(clear_dit.weights, "safe_open", HeaderOnly)
    assert clear_dit.weights.read_weights_config(path) == (3, 2) and opened


def test_weights_refused_on_fused_qkv_projections(model, tmp_path):
    """Attention runs the fused to_qkv copies: weights loaded into to_q/to_k/to_v would change nothing."""
    path = tmp_path / "clear_local_2.safetensors"
    save_file(official_tensors(model, 1), str(path))
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match=r"cannot load CLEAR weights of a model with fused QKV projections .* unfuse"):
        clear_dit.load_weights(model, path)
    assert clear_dit.patch_handle(model) is None  # refused before patching
    with clear_dit.patch(model, window_size=2):
        with pytest.raises(ValueError, match="cannot save CLEAR weights of a model with fused QKV projections"):
            clear_dit.save_weights(model, tmp_path / "saved.safetensors")
    model.unfuse_qkv_projections()
    assert clear_dit.load_weights(model, path).window_size == 2


def test_weights_built_in_memory_and_header_only_reads(model, tmp_path):
    """ClearWeights from a state dict in memory (its constructor before shapes existed) loads as before; a
    header-only read checks a model but is refused where weights are loaded, highres included, before any stage."""
    from pipelines.highres import resolve_clear_settings

    tensors = official_tensors(model, 1)
    in_memory = clear_dit.ClearWeights(tensors=tensors, window_size=2, down_factor=1, name="student")
    assert in_memory.shapes == {k: tuple(v.shape) for k, v in tensors.items()}
    clear_dit.apply_weights(model, in_memory)
    torch.testing.assert_close(clear_dit.clear_state_dict(model), tensors, atol=0, rtol=0)
    clear_dit.unpatch(model)

    save_file(tensors, str(tmp_path / "clear_local_2.safetensors"))
    header = clear_dit.read_weights(tmp_path / "clear_local_2.safetensors", tensors=False)
    assert header.tensors == {} and header.shapes == in_memory.shapes
    clear_dit.weights.check_weights(model, header)
    for load in (lambda: clear_dit.apply_weights(model, header), lambda: resolve_clear_settings(None, None, header)):
        with pytest.raises(
            ValueError, match=r"clear_local_2.safetensors was read without its tensors \(tensors=False\)"
        ):
            load()
    assert clear_dit.patch_handle(model) is None


@pytest.mark.parametrize("key", ["window_size", "down_factor"])
def test_a_metadata_value_of_zero_is_refused_naming_the_file(model, tmp_path, key):
    """Not a fallback to the file name's radius (clear_local_2)."""
    path = tmp_path / "clear_local_2.safetensors"
    save_file(official_tensors(model, 1), str(path), metadata={key: "0"})
    with pytest.raises(ValueError, match=f"its metadata {key}='0' is not a positive whole number"):
        clear_dit.read_weights(path)


@pytest.mark.parametrize("value", ["\u00b2", "1" * 5000])
def test_metadata_digits_python_cannot_read_as_a_radius_name_the_file(model, tmp_path, value):
    """str.isdigit takes superscripts, and int() refuses 5000 digits: both said neither the file nor the key."""
    path = tmp_path / "clear_local_2.safetensors"
    save_file(official_tensors(model, 1), str(path), metadata={"window_size": value})
    with pytest.raises(ValueError, match=r"clear_local_2.safetensors: its metadata window_size=.* is not a positive"):
        clear_dit.read_weights(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_a_file_of_integer_tensors_is_refused_from_its_header(model, tmp_path, dtype):
    """Loading converts to the model's dtype: a quantized or foreign file with the right names and shapes became
    meaningless weights without a word."""
    path = tmp_path / "clear_local_2.safetensors"
    save_file({k: v.to(dtype) for k, v in official_tensors(model, 1).items()}, str(path))
    for tensors in (True, False):
        with pytest.raises(ValueError, match=r"clear_local_2.safetensors holds tensors that are not floating point: "):
            clear_dit.read_weights(path, tensors=tensors)
    with pytest.raises(ValueError, match="not floating point"):
        clear_dit.load_weights(model, path)
    assert clear_dit.patch_handle(model) is None


@pytest.mark.parametrize(
    "dtype, bad",
    [(torch.float32, float("nan")), (torch.float32, float("-inf")), (torch.bfloat16, float("inf"))]
    + [(torch.float8_e4m3fn, float("nan"))],  # no inf in float8_e4m3fn: a cast saturates it
)
def test_a_file_holding_nan_or_inf_is_refused_naming_a_tensor(model, tmp_path, dtype, bad):
    """A diverged run's weights loaded without a word, and every image came out black."""
    path = tmp_path / "clear_local_2.safetensors"
    tensors = {k: v.to(dtype) for k, v in official_tensors(model, 1).items()}
    name = sorted(tensors)[1]
    tensors[name].view(-1)[3] = bad
    save_file(tensors, str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"clear_local_2.safetensors holds NaN or infinite values .*: {name}$"):
        clear_dit.load_weights(model, path)
    assert clear_dit.patch_handle(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tensors[name].view(-1)[3] = 0.5
    save_file(tensors, str(path))
    assert clear_dit.read_weights(path).tensors[name].float().isfinite().all()  # float8 read without error


def test_a_model_clear_dit_cannot_patch_is_refused_before_the_file_is_read(tmp_path):
    """A hub file (gigabytes for FLUX) was downloaded before the model was refused."""
    with pytest.raises(ValueError, match="clear_dit cannot patch Linear"):
        clear_dit.load_weights(torch.nn.Linear(2, 2), tmp_path / "missing.safetensors")


def test_a_float32_file_loads_into_a_bf16_model_in_place_in_bf16(tmp_path):
    """A published fp32 file in a bf16 pipeline: its projections stay bf16 and stay the parameters that optimizers,
    LoRA layers and offload hooks hold."""
    model = tiny_flux_transformer(tmp_path / "t").to(torch.bfloat16)
    tensors = {k: torch.randn_like(v.float()) * 0.1 for k, v in model.state_dict().items() if is_clear_key(k)}
    save_file(tensors, str(tmp_path / "clear_local_2.safetensors"))
    storage = {k: p.data_ptr() for k, p in model.named_parameters()}
    clear_dit.load_weights(model, tmp_path / "clear_local_2.safetensors")
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        assert params[name].dtype == torch.bfloat16 and params[name].data_ptr() == storage[name], name
        torch.testing.assert_close(params[name], value.to(torch.bfloat16), atol=0, rtol=0)


def test_sd35_files_hold_and_load_the_image_only_attn2_projections(tmp_path):
    """Without attn2 a d=1 SD3.5 file loads without error, its image-only attention left as the teacher's."""
    source = tiny_sd3_transformer(tmp_path / "a", TINY_SD35_CONFIG)
    clear_dit.patch(source, window_size=2)
    with torch.no_grad():
        for value in clear_dit.clear_state_dict(source).values():
            value.add_(0.25)
    path = clear_dit.save_weights(source, tmp_path / "sd35.safetensors")
    attn2 = {f"transformer_blocks.0.attn2.{p}.weight" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert attn2 <= set(clear_dit.read_weights(path).tensors)
    target = tiny_sd3_transformer(tmp_path / "b", TINY_SD35_CONFIG)
    clear_dit.load_weights(target, path)
    for key in attn2:
        torch.testing.assert_close(target.state_dict()[key], source.state_dict()[key], atol=0, rtol=0)
