"""Self-generated distillation data: the teacher's images, their VAE latents and text embeddings, cached once.

Layout of a data folder (DESIGN.md 1.3: training needs neither the VAE nor the text encoders)::

    info.json                  resolution, latent and text-encoder shapes, VAE scaling, how it was made, how
                               many items the last run was asked for
    manifest.jsonl             one line per finished item: index, prompt, seed, image, shard, row
    images/{index:06d}.png     the image (PNG text chunk: prompt and settings)
    shards/{index:06d}.safetensors  one per written batch, rows stacked, named after its first index:
                               latent_mean, latent_logvar  (n, C, H/8, W/8)  VAE posterior (float32)
                               prompt_embeds               (n, T, D)         T5 sequence embeddings
                               pooled_prompt_embeds        (n, P)            CLIP pooled embedding
    negative.safetensors       prompt_embeds (1, T, D), pooled_prompt_embeds (1, P) of the negative prompt
                               (empty unless true CFG used another): what ``distill --caption-dropout`` swaps in

Crash safety: an item is finished when its manifest line is. Images and shards are written to a temporary
name, fsynced and renamed into place (atomic), and only then are the manifest lines appended and fsynced. A run killed
at any moment therefore leaves complete files, at most one batch lost, and possibly a torn last manifest line
or unreferenced files, which the next run drops before it resumes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from clear_dit.files import atomic_write
from pipelines.loading import default_max_sequence_length

try:
    import fcntl
except ImportError:  # Windows: runs on one folder are not locked against each other
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_FORMAT",
    "IMAGE_SUFFIXES",
    "DataInfo",
    "DistillDataset",
    "generate_dataset",
    "import_images",
    "read_prompts",
]

DATA_FORMAT = "clear-dit-distill-data"
INFO_FILE = "info.json"
MANIFEST_FILE = "manifest.jsonl"
LOCK_FILE = ".lock"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHARD_KEYS = ("latent_mean", "latent_logvar", "prompt_embeds", "pooled_prompt_embeds")
NEGATIVE_FILE = "negative.safetensors"


@dataclass
class DataInfo:
    """What a data folder holds; ``info.json``. The trainer refuses data whose shapes do not fit its model.

    ``settings`` holds how the items were made (model, steps, guidance, seed or source folder); a resumed
    run must use the same. ``requested``: the items (indices ``0 .. requested - 1``) the last make-data run was
    asked for, so that a set it did not finish is told from a whole one (0: not recorded, data of an older
    clear-dit).
    """

    height: int
    width: int
    latent_shape: tuple[int, int, int]
    text_seq_len: int
    text_dim: int
    pooled_dim: int
    vae_scaling_factor: float
    vae_shift_factor: float
    embeds_dtype: str
    settings: dict[str, Any] = field(default_factory=dict)
    requested: int = 0
    format: str = DATA_FORMAT
    version: int = 1

    @classmethod
    def read(cls, folder: Path) -> DataInfo:
        path = folder / INFO_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a clear-dit data folder (no {INFO_FILE}); make one with `clear-dit make-data`"
            )
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"it holds a JSON {type(raw).__name__}, not an object")
            if raw.get("format") != DATA_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, not {DATA_FORMAT!r}")
            raw["latent_shape"] = tuple(raw["latent_shape"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path} is not a valid clear-dit data info file: {err}") from err

    def write(self, folder: Path) -> None:
        _atomic_write_bytes(folder / INFO_FILE, (json.dumps(asdict(self), indent=2) + "\n").encode())

    def shape_summary(self) -> dict[str, Any]:
        """The fields that must agree between data sets used by one training run."""
        return {
            "resolution": [self.height, self.width],
            "latent_shape": list(self.latent_shape),
            "text_seq_len": self.text_seq_len,
            "text_dim": self.text_dim,
            "pooled_dim": self.pooled_dim,
        }

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one item's tensor under each of ``SHARD_KEYS`` (a shard stacks rows of them)."""
        return {
            "latent_mean": self.latent_shape,
            "latent_logvar": self.latent_shape,
            "prompt_embeds": (self.text_seq_len, self.text_dim),
            "pooled_prompt_embeds": (self.pooled_dim,),
        }

    def encoding(self) -> dict[str, Any]:
        return {
            "embeds_dtype": self.embeds_dtype,
            "vae_scaling_factor": self.vae_scaling_factor,
            "vae_shift_factor": self.vae_shift_factor,
        }

    def check_matches(self, other: DataInfo, folder: Path) -> None:
        """Raise unless ``other`` (the settings of this run) describes the same data as ``self`` (on disk): shapes,
        dtype and VAE scaling too, since a resumed run appends to the same set (a set begun on a GPU in bf16 and
        resumed on a CPU in fp32 would mix both)."""
        mine, theirs = ({**info.shape_summary(), **info.encoding(), **info.settings} for info in (self, other))
        diffs = [
            f"{k} {mine.get(k)!r} (on disk) vs {theirs.get(k)!r}"
            for k in sorted(mine | theirs)
            if mine.get(k) != theirs.get(k)
        ]
        length = mine.get("text_seq_len")
        if len(diffs) == 1 and length != theirs.get("text_seq_len"):  # schnell-like models' default became 256
            diffs.append(f"--max-sequence-length {length} resumes it")
        if diffs:
            raise ValueError(
                f"{folder} holds data made with other settings ({'; '.join(diffs)}); use another --out, or --overwrite"
            )


def _read_text(path: Path) -> str:
    """A user's text file: UTF-8, with or without the BOM Notepad writes (it stuck to the first line: a prompt
    file's '# comment' became a prompt), or a one-line error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from None


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file, one per line (blank lines and lines starting with ``#`` skipped)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a prompt file (one prompt per line)")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    # universal newlines, as Python's own file iteration splits: str.splitlines would also cut a prompt at a U+2028
    # or U+0085 pasted from a web page
    prompts = [line.strip() for line in re.split(r"\r\n?|\n", _read_text(path))]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line expected)")
    return prompts


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class _Item:
    index: int
    prompt: str
    seed: int | None = None
    source: str | None = None  # the imported image


def _data_files(folder: Path) -> list[Path]:
    """The files a data set keeps in ``images/`` and ``shards/`` (what a user put in subfolders there is left)."""
    return [f for sub in ("images", "shards") for f in (folder / sub).glob("*") if f.is_file()]


def _made_by_us(folder: Path) -> bool:
    """Whether ``folder``'s info file says clear-dit wrote it (read loosely: a damaged or newer one may be ours)."""
    try:
        raw = json.loads((folder / INFO_FILE).read_text())
    except (ValueError, OSError):
        return False
    return isinstance(raw, dict) and raw.get("format") == DATA_FORMAT


def _lock_folder(folder: Path) -> Any:
    """An exclusive lock on ``folder`` held while the returned file stays open: two runs on one folder both made
    every item, appended both to the manifest, and each deleted the other's unfinished files. ``None`` (no lock)
    where ``fcntl`` does not exist (Windows)."""
    if fcntl is None:
        return None
    handle = open(folder / LOCK_FILE, "a")  # noqa: SIM115 (held open for the writer's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FileExistsError(f"another make-data run is writing {folder}; wait for it or use another --out") from None
    return handle


class _Writer:
    """Appends finished batches to a data folder and knows which items are done (the manifest)."""

    def __init__(self, folder: Path, info: DataInfo, overwrite: bool) -> None:
        self.folder = folder
        self.info = info
        manifest = folder / MANIFEST_FILE
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file, not a data folder")
        if folder.exists() and {p.name for p in folder.iterdir()} - {LOCK_FILE} and not (folder / INFO_FILE).exists():
            # --overwrite discards data this tool made, never a folder of someone else's files
            raise FileExistsError(
                f"{folder} is not empty and holds no clear-dit data (no {INFO_FILE}); use another --out"
            )
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_folder(folder)
        try:
            self._prepare(manifest, overwrite)
        except BaseException:
            self.close()
            raise

    def _prepare(self, manifest: Path, overwrite: bool) -> None:
        folder, info = self.folder, self.info
        if (folder / INFO_FILE).exists():
            if not overwrite:
                DataInfo.read(folder).check_matches(info, folder)
            elif not _made_by_us(folder):  # --overwrite replaces our data (of any version), not another tool's
                raise FileExistsError(
                    f"{folder / INFO_FILE} is not clear-dit's (no 'format': {DATA_FORMAT!r}): --overwrite replaces "
                    "clear-dit data only; delete the folder yourself or use another --out"
                )
        if overwrite:
            manifest.unlink(missing_ok=True)  # first: a kill below then leaves unreferenced files, dropped next run
            for f in _data_files(folder):
                f.unlink()
        info.write(folder)  # first: a folder of ours from then on, which a killed run leaves resumable
        for sub in ("images", "shards"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.entries = _read_manifest(folder, repair=True)
        self._forget_damaged()
        self._drop_unreferenced()

    def _forget_damaged(self) -> None:
        """Items whose shard no longer opens or whose image is gone (a damaged disk, a file deleted by hand) leave
        the manifest, so that this run makes them again: distill would fail on them mid-training."""
        damaged = {e["shard"] for e in self.entries if not (self.folder / e["image"]).is_file()}
        damaged |= set(_shard_problems(self.folder, self.entries, self.info))
        if damaged:
            kept = [e for e in self.entries if e["shard"] not in damaged]
            logger.warning(
                "%s: %d items in damaged or missing files (%s); making them again",
                self.folder,
                len(self.entries) - len(kept),
                ", ".join(sorted(damaged)),
            )
            _atomic_write_bytes(self.folder / MANIFEST_FILE, _manifest_lines(kept).encode())
            self.entries = kept

    def close(self) -> None:
        """Release the folder (its lock)."""
        if self._lock is not None:
            self._lock.close()

    @property
    def done(self) -> dict[int, dict[str, Any]]:
        return {e["index"]: e for e in self.entries}

    def _drop_unreferenced(self) -> None:
        """Files of a batch that never reached the manifest (a killed run): not part of the data set."""
        used = {e["image"] for e in self.entries} | {e["shard"] for e in self.entries}
        for f in _data_files(self.folder):
            if f"{f.parent.name}/{f.name}" not in used:
                f.unlink()

    def write(
        self,
        items: Sequence[_Item],
        images: Sequence[Image.Image],
        latents: tuple[torch.Tensor, torch.Tensor],
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        png_settings: dict[str, Any],
    ) -> None:
        entries = []
        for item, image in zip(items, images, strict=True):
            name = f"images/{item.index:06d}.png"
            meta = PngImagePlugin.PngInfo()
            meta.add_text("parameters", json.dumps({**png_settings, "prompt": item.prompt, "seed": item.seed}))
            png = io.BytesIO()
            image.save(png, format="PNG", pnginfo=meta)
            _atomic_write_bytes(self.folder / name, png.getvalue())  # fsynced: durable before the manifest
            entries.append({"index": item.index, "prompt": item.prompt, "seed": item.seed, "image": name})
            if item.source is not None:
                entries[-1]["source"] = item.source
        shard = f"shards/{items[0].index:06d}.safetensors"
        mean, logvar = latents
        tensors = {
            "latent_mean": mean.float(),
            "latent_logvar": logvar.float(),
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
        }
        data = safetensors_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        _atomic_write_bytes(self.folder / shard, data)
        for sub in ("images", "shards"):  # the renames are durable before the manifest refers to them
            _fsync_dir(self.folder / sub)
        for row, entry in enumerate(entries):
            entry.update(shard=shard, row=row)
        _append_manifest(self.folder / MANIFEST_FILE, entries)
        self.entries.extend(entries)


def _manifest_lines(entries: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)


def _append_manifest(path: Path, entries: list[dict[str, Any]]) -> None:
    """One write of whole lines, flushed and fsynced: after it returns, the items are durable."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(_manifest_lines(entries))
        f.flush()
        os.fsync(f.fileno())


def complete_lines(path: Path, repair: bool = False) -> list[str]:
    """The lines of the text file ``path`` that end in a newline: a torn last line (a write cut by a kill or a full
    disk) is ignored, with a warning, or cut off the file with ``repair``."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        logger.warning("%s ends in a torn line (an interrupted write); ignoring it", path)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(complete))
    # split at the newlines the writer wrote, not str.splitlines' other separators (U+2028, U+0085) that json.dumps
    # leaves in a caption unescaped
    return complete.decode("utf-8").split("\n")[:-1]


def _read_manifest(folder: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The manifest's entries. A torn last line (a write cut by a kill) is ignored, or cut off with ``repair``."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        return []
    entries, lines = [], {}
    for number, line in enumerate(complete_lines(path, repair), start=1):
        try:
            entry = json.loads(line)
            for key in ("index", "prompt", "image", "shard", "row"):
                entry[key]  # noqa: B018 - presence check
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} line {number} is not a valid manifest entry ({err!r}): {line[:80]}") from err
        if entry["index"] in lines:  # training would see the item twice
            raise ValueError(
                f"{path} lists item {entry['index']} twice (lines {lines[entry['index']]} and {number}: two runs "
                "wrote the folder at once?); make the data again with --overwrite"
            )
        lines[entry["index"]] = number
        entries.append(entry)
    return entries


def _encode_text(pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds (n, T, D), pooled (n, P))`` from the pipeline's T5 and CLIP encoders."""
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, max_sequence_length=max_sequence_length
        )
    return prompt_embeds, pooled


def _encode_images(vae: Any, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior ``(mean, logvar)``, each ``(n, C, H/8, W/8)``, of the images as stored (8-bit RGB)."""
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        dist = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.logvar


def _data_info(
    pipe: Any,
    height: int,
    width: int,
    max_sequence_length: int,
    settings: dict[str, Any],
    probe: tuple,
    requested: int,
) -> DataInfo:
    prompt_embeds, pooled = probe
    factor = pipe.vae_scale_factor
    return DataInfo(
        height=height,
        width=width,
        latent_shape=(pipe.vae.config.latent_channels, height // factor, width // factor),
        text_seq_len=prompt_embeds.shape[1],
        text_dim=prompt_embeds.shape[2],
        pooled_dim=pooled.shape[1],
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_shift_factor=float(pipe.vae.config.shift_factor or 0.0),
        embeds_dtype=str(prompt_embeds.dtype).removeprefix("torch."),
        settings=settings,
        requested=requested,
    )


def _check_resolution(pipe: Any, resolution: int) -> None:
    multiple = pipe.vae_scale_factor * 2
    if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple} (VAE x 2x2 packing), got {resolution}")


def _batches(items: list[_Item], batch_size: int) -> Iterator[list[_Item]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _run(
    pipe: Any,
    out: Path,
    items: list[_Item],
    settings: dict[str, Any],
    resolution: int,
    batch_size: int,
    max_sequence_length: int | None,
    overwrite: bool,
    make_images,
    negative_prompt: str = "",
) -> Path:
    """Write the items of ``items`` not yet done; ``make_images(batch, prompt_embeds, pooled, negative)`` draws
    (or loads) their images, ``negative`` being the ``(prompt_embeds, pooled)`` of ``negative_prompt``."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be a positive int, got {batch_size}")
    _check_resolution(pipe, resolution)
    if max_sequence_length is None:
        max_sequence_length = default_max_sequence_length(pipe)
    elif max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be at least 1 (T5 tokens), got {max_sequence_length}")
    probe = _encode_text(pipe, [items[0].prompt], max_sequence_length)
    info = _data_info(pipe, resolution, resolution, max_sequence_length, settings, probe, len(items))
    writer = _Writer(out, info, overwrite)
    try:
        negative = _encode_text(pipe, [negative_prompt], max_sequence_length)
        names = ("prompt_embeds", "pooled_prompt_embeds")
        tensors = {k: v.contiguous().cpu() for k, v in zip(names, negative, strict=True)}
        _atomic_write_bytes(out / NEGATIVE_FILE, safetensors_save(tensors))
        done = writer.done
        for item in items:
            made = done.get(item.index)
            if made is None:
                continue
            # removeprefix: captions were read with Notepad's BOM before they were read as prompt files are
            if (made["prompt"].removeprefix("\ufeff"), made.get("source")) != (item.prompt, item.source):
                was, now = made.get("source") or made["prompt"], item.source or item.prompt
                change = f"was made from {was!r}, not {now!r}"
                if was == now:  # the same image, captioned anew
                    change = f"({was}) was captioned {made['prompt']!r}, now {item.prompt!r}"
                raise ValueError(
                    f"{out}: item {item.index} {change}; "
                    "the prompt list or image folder changed: use another --out, or --overwrite"
                )
        todo = [item for item in items if item.index not in done]
        beyond = len(set(done) - {item.index for item in items})
        if beyond:  # the set is not cut down to what was asked: training would take all of it
            logger.warning(
                "%s holds %d items beyond the %d asked for; they stay in the data set", out, beyond, len(items)
            )
        if len(todo) < len(items):
            logger.info("%s: %d of %d items already done, resuming", out, len(items) - len(todo), len(items))
        png_settings = {k: v for k, v in settings.items() if k != "source"}
        with tqdm(total=len(items), initial=len(items) - len(todo), unit="img", desc="make-data") as bar:
            for batch in _batches(todo, batch_size):
                prompts = [item.prompt for item in batch]
                prompt_embeds, pooled = _encode_text(pipe, prompts, max_sequence_length)
                images = make_images(batch, prompt_embeds, pooled, negative)
                writer.write(batch, images, _encode_images(pipe.vae, images), prompt_embeds, pooled, png_settings)
                bar.update(len(batch))
    finally:
        writer.close()  # the folder's lock: not held on by a traceback that keeps this frame
    return out


def generate_dataset(
    pipe: Any,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    resolution: int = 1024,
    num: int | None = None,
    steps: int = 28,
    guidance: float = 3.5,
    seed: int = 0,
    batch_size: int = 1,
    max_sequence_length: int | None = None,
    model_name: str = "",
    overwrite: bool = False,
    true_cfg_scale: float = 1.0,
    negative_prompt: str = "",
) -> Path:
    """Generate ``num`` teacher images (prompts cycled; item ``i`` uses seed ``seed + i``) into ``out``.

    Resumable: items already in the manifest are skipped, so re-running after an interruption finishes the set.

    Args:
        pipe: a FLUX pipeline (the teacher; not CLEAR-patched).
        prompts: the prompts; item ``i`` uses ``prompts[i % len(prompts)]``.
        resolution: square image size in pixels, a multiple of 16.
        num: number of items (default: one per prompt).
        steps, guidance: the pipeline's ``num_inference_steps`` and ``guidance_scale``.
        true_cfg_scale, negative_prompt: true classifier-free guidance, as in ``FluxPipeline`` (two transformer
            passes per step; the negative prompt, empty by default, is encoded once); 1 disables it.
        max_sequence_length: T5 tokens (default: the tokenizer's limit, at most FLUX's 512; 256 for a
            transformer without guidance embedding, such as FLUX.1-schnell's).
        model_name: recorded in ``info.json``.

    Returns:
        ``out``.
    """
    if not prompts:
        raise ValueError("no prompts given")
    num = len(prompts) if num is None else num
    if num <= 0:
        raise ValueError(f"--num must be a positive int, got {num}")
    if true_cfg_scale < 1:
        raise ValueError(f"true_cfg_scale must be >= 1 (1: no true guidance), got {true_cfg_scale}")
    if negative_prompt and true_cfg_scale == 1:
        raise ValueError("negative_prompt needs true_cfg_scale above 1 (without it nothing uses the negative prompt)")
    items = [_Item(i, prompts[i % len(prompts)], seed + i) for i in range(num)]
    settings = {"source": "generated", "model": model_name, "steps": steps, "guidance": guidance, "seed": seed}
    if true_cfg_scale > 1:  # recorded only when used, so that data made before the option still resumes
        settings |= {"true_cfg_scale": true_cfg_scale, "negative_prompt": negative_prompt}

    def make_images(
        batch: list[_Item], prompt_embeds: torch.Tensor, pooled: torch.Tensor, negative: tuple[torch.Tensor, ...]
    ) -> list[Image.Image]:
        generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]
        cfg = {}
        if true_cfg_scale > 1:
            cfg = dict(
                true_cfg_scale=true_cfg_scale,
                negative_prompt_embeds=negative[0].expand(len(batch), -1, -1),
                negative_pooled_prompt_embeds=negative[1].expand(len(batch), -1),
            )
        return pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            max_sequence_length=prompt_embeds.shape[1],
            output_type="pil",
            **cfg,
        ).images

    args = (settings, resolution, batch_size, max_sequence_length, overwrite, make_images, negative_prompt)
    return _run(pipe, Path(out), items, *args)


def _caption(image_path: Path) -> str:
    txt, js = image_path.with_suffix(".txt"), image_path.with_suffix(".json")
    if txt.is_file():
        caption = _read_text(txt).strip()
    elif js.is_file():
        text = _read_text(js)
        try:
            meta = json.loads(text)
            caption = next(meta[k] for k in ("prompt", "caption", "text") if k in meta)
            if not isinstance(caption, str):
                raise TypeError(f"its caption is a JSON {type(caption).__name__}")
        except (ValueError, StopIteration, TypeError) as err:
            raise ValueError(f"{js} holds no 'prompt', 'caption' or 'text' text field") from err
    else:
        raise FileNotFoundError(f"no caption for {image_path}: expected {txt.name} or {js.name} beside it")
    if not caption:
        raise ValueError(f"empty caption for {image_path}")
    return caption


def _load_square(path: Path, resolution: int) -> Image.Image:
    """Center-crop to a square and resize to ``resolution`` (Lanczos)."""
    try:
        with Image.open(path) as image:
            image = _to_rgb(ImageOps.exif_transpose(image))  # as viewers (and diffusers' load_image) show it
    except (OSError, Image.DecompressionBombError) as err:  # the latter: above Pillow's pixel limit
        raise ValueError(f"cannot read image {path}: {err}") from err
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in 8-bit RGB. 16-bit gray (a PNG's ``I;16`` mode; ``I`` in older Pillow) is scaled to 8 bits:
    Pillow's own conversion clips every level above 255, which turns the image white. Transparent pixels (an alpha
    channel, or a palette's or PNG's transparent colour) are laid on white, as viewers show them: a conversion
    to RGB alone keeps the colour stored under them, often black or leftovers of an edit."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
        image = Image.fromarray(np.round(levels).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def import_images(
    pipe: Any,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resolution: int = 1024,
    batch_size: int = 1,
    max_sequence_length: int | None = None,
    model_name: str = "",
    overwrite: bool = False,
) -> Path:
    """Import a folder of images with captions (``name.txt`` or ``name.json`` beside ``name.png``) into ``out``.

    Images (searched recursively, sorted by path; files and folders whose names start with a dot are skipped) are
    center-cropped to a square of ``resolution`` pixels and encoded with the pipeline's VAE and text encoders (its
    transformer is not used). Resumable like :func:`generate_dataset`.
    """
    src = Path(images)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {src}")
    inside = Path(out).resolve()  # an --out inside --images: its own PNGs are no source images
    files = sorted(
        p
        for p in src.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        # hidden files and folders: macOS' ._name.png resource forks, .ipynb_checkpoints, thumbnail caches
        and not any(part.startswith(".") for part in p.relative_to(src).parts)
        and not p.resolve().is_relative_to(inside)
    )
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {src}")
    items = [_Item(i, _caption(path), source=str(path.relative_to(src))) for i, path in enumerate(files)]
    settings = {"source": "imported", "model": model_name, "images": str(src.resolve())}

    def make_images(batch: list[_Item], *_embeddings: torch.Tensor | tuple) -> list[Image.Image]:
        return [_load_square(src / item.source, resolution) for item in batch]

    return _run(pipe, Path(out), items, settings, resolution, batch_size, max_sequence_length, overwrite, make_images)


def _shard_rows(path: Path, row_shapes: dict[str, tuple[int, ...]]) -> int:
    """The number of rows of the shard at ``path``, from its header (whose offsets safetensors checks against the
    file's length); ValueError naming the file if it is damaged, incomplete or holds rows of other shapes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in SHARD_KEYS}
    except FileNotFoundError:
        raise FileNotFoundError(f"shard file missing: {path}") from None
    except Exception as err:  # safetensors raises several types for a damaged file, a missing key included
        raise ValueError(f"cannot read shard {path} (damaged or incomplete file?): {err}") from None
    for key, shape in row_shapes.items():
        if shapes[key][1:] != tuple(shape):
            raise ValueError(f"{path}: {key} has rows of shape {shapes[key][1:]}, {INFO_FILE} says {tuple(shape)}")
    rows = {shape[0] for shape in shapes.values()}
    if len(rows) > 1:
        raise ValueError(f"{path}: its tensors have different numbers of rows ({sorted(rows)})")
    return rows.pop()


def _shard_problems(folder: Path, entries: list[dict[str, Any]], info: DataInfo) -> dict[str, str]:
    """What is wrong with each shard the manifest ``entries`` use that cannot give them their rows: damaged,
    missing, of other row shapes than ``info``'s, or shorter than a row listed."""
    problems, rows = {}, {}
    for shard in {e["shard"] for e in entries}:
        try:
            rows[shard] = _shard_rows(folder / shard, info.row_shapes())
        except (OSError, ValueError) as err:
            problems[shard] = str(err)
    for e in entries:
        if e["shard"] in rows and e["row"] >= rows[e["shard"]] and e["shard"] not in problems:
            problems[e["shard"]] = (
                f"{folder / e['shard']} has {rows[e['shard']]} rows, {MANIFEST_FILE} lists item {e['index']} as row "
                f"{e['row']}"
            )
    return problems


class DistillDataset(Dataset):
    """The items of a data folder, as tensors; bad or missing files raise errors naming them.

    ``dataset[i]`` is a dict of ``latent_mean``, ``latent_logvar`` ``(C, H/8, W/8)`` float32,
    ``prompt_embeds`` ``(T, D)``, ``pooled_prompt_embeds`` ``(P,)`` and ``index`` (the item's manifest index).

    Args:
        folder: a folder written by :func:`generate_dataset` or :func:`import_images`.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.folder}")
        self.info = DataInfo.read(self.folder)
        self.entries = sorted(_read_manifest(self.folder), key=lambda e: e["index"])
        if not self.entries:
            raise ValueError(f"{self.folder} holds no finished items ({MANIFEST_FILE} is empty or missing)")
        missing = sorted({e["shard"] for e in self.entries if not (self.folder / e["shard"]).is_file()})
        if missing:
            raise FileNotFoundError(f"{self.folder}: shard files missing: {', '.join(missing[:3])}")
        problems = _shard_problems(self.folder, self.entries, self.info)  # now, not when training draws an item
        if problems:
            first = min(problems)
            raise ValueError(f"{problems[first]}; re-run make-data on {self.folder} to make its items again")
        have = {e["index"] for e in self.entries}
        if short := sum(i not in have for i in range(self.info.requested)):
            logger.warning(
                "%s holds %d of the %d items make-data was last asked for (it stopped early); re-run that make-data "
                "command to finish the set (finished items are kept)",
                self.folder,
                self.info.requested - short,
                self.info.requested,
            )

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def prompts(self) -> list[str]:
        return [e["prompt"] for e in self.entries]

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self.entries[i]
        path = self.folder / entry["shard"]
        row = entry["row"]
        try:
            with safe_open(str(path), framework="pt") as f:
                item = {key: f.get_slice(key)[row : row + 1][0] for key in SHARD_KEYS}
        except FileNotFoundError:
            raise FileNotFoundError(f"shard file missing: {path}") from None
        except Exception as err:  # safetensors raises several types for a damaged file
            raise ValueError(f"cannot read row {row} of shard {path} (damaged or incomplete file?): {err}") from err
        item["index"] = entry["index"]
        return item

    def negative(self) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` ``(T, D)`` and ``pooled_prompt_embeds`` ``(P,)`` of the data's negative prompt (the
        empty one unless make-data's true CFG used another): the caption that caption dropout swaps in."""
        path = self.folder / NEGATIVE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.folder} has no {NEGATIVE_FILE} (data made by an older clear-dit): re-run make-data on it "
                "to add it (finished items are kept), or train without --caption-dropout"
            )
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key)[0] for key in ("prompt_embeds", "pooled_prompt_embeds")}
