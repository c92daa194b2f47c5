"""A complete, tiny, randomly initialised FLUX pipeline, built offline and deterministically.

It has every part of a real FLUX.1 pipeline, at toy sizes: a ``FluxTransformer2DModel`` (2 heads x 64
channels, 1 double + 2 single blocks, 16 latent channels packed 2x2 into 64), an ``AutoencoderKL`` with 16
latent channels and a scale factor of 8 (so image sizes are multiples of 16, as for FLUX), a CLIP and a T5
text encoder whose tokenizers are trained here with ``tokenizers`` on a small built-in corpus, and FLUX.1's
flow-matching scheduler. Its images are noise, but every code path (patching, weights, CLI, training) runs
on it in seconds on a CPU without network access.

The pipeline is built once, saved with ``save_pretrained`` into a cache folder, and from then on loaded with
``FluxPipeline.from_pretrained``, the very code a user runs on real weights. The cache folder is
``$CLEAR_DIT_CACHE/tiny-flux-v1`` (default ``~/.cache/clear-dit/tiny-flux-v1``); bump :data:`TINY_NAME`
whenever the recipe below changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: builders replacing a damaged cache are not serialized
    fcntl = None

logger = logging.getLogger(__name__)

TINY_NAME = "tiny-flux-v1"
CACHE_ENV = "CLEAR_DIT_CACHE"
SEED = 0

#: T5 tokenizer length of the tiny model; pass it as the pipeline's ``max_sequence_length``.
T5_MAX_LENGTH = 64
#: CLIP tokenizer length, as in FLUX.1.
CLIP_MAX_LENGTH = 77

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
CHAR_SCORE = -20.0  # Unigram log-probability of a single character of the tiny T5 tokenizer
WORD_SCORE = -1.0  # ... and of a whole word of a domain corpus: above any split of it into learnt pieces

# Sizes of the tiny text encoders: pooled CLIP output -> pooled_projection_dim, T5 -> joint_attention_dim.
CLIP_DIM = 32
T5_DIM = 32

#: The transformer's config. head_dim 64 is the smallest real CLEAR kernels are written for; the RoPE axes
#: (text/id, row, column) sum to it, as FLUX.1's (16, 56, 56) sum to 128.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=2,
    joint_attention_dim=T5_DIM,
    pooled_projection_dim=CLIP_DIM,
    guidance_embeds=True,
    axes_dims_rope=(16, 24, 24),
)

#: Four resolution levels -> VAE scale factor 2**3 = 8; 16 latent channels; FLUX.1's latent statistics.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

#: FLUX.1-dev's scheduler config.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

_SUBJECTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "an astronaut riding a horse",
    "a cat sitting on a sofa",
    "a dog running on the beach",
    "a bowl of fruit",
    "a lighthouse on a cliff",
    "a small wooden house",
    "a portrait of an old man",
    "a bicycle leaning against a wall",
    "a city street at night",
    "a mountain lake",
    "a field of sunflowers",
    "a robot reading a book",
    "a cup of coffee",
]
_SETTINGS = [
    "on a blue background",
    "at sunset",
    "in the snow",
    "on the moon",
    "under a starry sky",
    "in a forest",
    "with dramatic lighting",
    "in the style of a watercolor painting",
]
_EXTRA = [
    "The quick brown fox jumps over the lazy dog.",
    "A PHOTO OF 1 2 3 4 5 6 7 8 9 0 Objects, highly detailed, 8k, 35mm, f/1.8!",
    "Close-up: a red apple & a yellow banana (studio photo) - sharp focus; soft shadows?",
    "Zebra, quartz, jazz, vivid, waxy, Kiwi, Yak, Queen, Xylophone, #hashtag @home 100% $5 ~ * + = < > [ ] { } |",
]


def tiny_corpus() -> list[str]:
    """The fixed corpus the tiny tokenizers are trained on."""
    lines = [f"{subject} {setting}" for subject in _SUBJECTS for setting in _SETTINGS]
    lines += [line[0].upper() + line[1:] + "." for line in lines[::3]]
    return lines + _EXTRA


def cache_root() -> Path:
    """Folder that holds clear-dit's cached artefacts: ``$CLEAR_DIT_CACHE`` or ``~/.cache/clear-dit``."""
    root = os.environ.get(CACHE_ENV)
    return _expand(root, f"${CACHE_ENV}") if root else _expand("~/.cache/clear-dit", "the default cache")


def _expand(folder: str | os.PathLike, what: str) -> Path:
    """``folder`` with ``~`` expanded; a one-line ``OSError`` where there is no such home folder."""
    try:
        return Path(folder).expanduser()
    except RuntimeError as err:  # '~nosuchuser/...', or no home folder at all
        raise OSError(f"cannot find the folder {folder} of {what} ({err}): set {CACHE_ENV} to a writable one") from None


def _manifest(path: Path) -> str:
    """What ``.complete`` holds: every file of the saved pipeline with its size and SHA-256 (5.6 MB: milliseconds),
    so that damage shows, a changed byte included."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name != ".complete")
    lines = [
        f"{f.relative_to(path).as_posix()} {f.stat().st_size} {hashlib.sha256(f.read_bytes()).hexdigest()}"
        for f in files
    ]
    return "".join(line + "\n" for line in [TINY_NAME, *lines])


def _is_complete(path: Path) -> bool:
    """A finished build that nothing has deleted or cut short since (else it is built again)."""
    try:
        return (path / ".complete").read_text() == _manifest(path)
    except (OSError, UnicodeDecodeError):  # the latter: a .complete damaged into bytes that are no text
        return False


def _fault(path: Path) -> str:
    """Why the folder at ``path`` is not a complete build, for the warning that it is replaced."""
    try:
        manifest = (path / ".complete").read_text()
    except (OSError, UnicodeDecodeError):
        return "is incomplete (a build was interrupted)"
    lines = manifest.splitlines()
    if lines[:1] == [TINY_NAME]:  # one of ours: it names the recipe first
        if len(lines) == 1:  # what earlier builds wrote: the name alone
            return "was built by an older clear-dit that kept no list of its files"
        if all(len(line.split()) == 2 for line in lines[1:]):  # then names and sizes
            return "was built by an older clear-dit that kept no checksums of its files"
    return "is damaged (a file was deleted or changed since it was built)"


#: Age after which a temporary build folder is a killed build's leftover (a build takes seconds).
STALE_BUILD_S = 3600


def tiny_pipeline_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the saved tiny pipeline (``cache_dir or cache_root()`` / ``tiny-flux-v1``); built if missing.

    The build happens in a temporary folder next to the target, which is renamed into place when complete,
    so concurrent builders never see a half-written pipeline: the first rename wins, and a later builder, which
    finds that folder complete under the lock, drops its own.
    """
    root = _expand(cache_dir, "cache_dir") if cache_dir is not None else cache_root()
    path = root / TINY_NAME
    if _is_complete(path):
        return path
    if path.is_symlink() or (path.exists() and not path.is_dir()):  # neither can be replaced by a rename
        what = "a link to a folder that is no complete build" if path.is_symlink() else "not a folder"
        raise OSError(
            f"the tiny model's cache folder {path} is {what}: remove it, or set {CACHE_ENV} to another folder"
        )
    try:  # a missing home folder, another user's shared cache, a read-only mount
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{TINY_NAME}.tmp-*"):  # builds killed before their cleanup; a live one is seconds old
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                    shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}.tmp-", dir=root))
    except OSError as err:
        raise OSError(
            f"cannot write to the tiny model's cache folder {root} ({err.strerror}): set {CACHE_ENV} to a writable "
            "folder"
        ) from None
    try:
        logger.info("building the tiny FLUX pipeline in %s", path)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            _save_in_a_fresh_process(tmp)
        else:
            save_tiny_pipeline(tmp)
        _check_loads(tmp)
        (tmp / ".complete").write_text(_manifest(tmp))
        # mkdtemp's 0700 (and safetensors' 0600 files, whatever the umask) would keep a shared cache from its other
        # users: the modes new folders and files get
        mode = (tmp / "transformer").stat().st_mode & 0o777
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(mode & 0o666)
        tmp.chmod(mode)
        with _replacing(root):
            if _is_complete(path):  # checked again under the lock: never delete another builder's finished folder
                logger.info("another process built %s first; using it", path)
                return path
            if path.exists():
                logger.warning("the tiny pipeline in %s %s: replacing it", path, _fault(path))
                shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextlib.contextmanager
def _replacing(root: Path) -> Iterator[None]:
    """One builder at a time between its check of the cache folder and its rename into place: two builders that
    both found it damaged deleted each other's finished folder (one already loading it) otherwise."""
    if fcntl is None:
        yield
        return
    with open(root / f".{TINY_NAME}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_tiny_pipeline(folder: Path) -> None:
    """Build the tiny pipeline and ``save_pretrained`` it into the existing, empty ``folder``."""
    pipe = build_tiny_pipeline(folder / "_tokenizers")
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizers")


def _save_in_a_fresh_process(folder: Path) -> None:
    """:func:`save_tiny_pipeline` in a new interpreter: in a process of a torch.distributed group (a torchrun
    rank), transformers' ``save_pretrained`` writes nothing on ranks other than 0, so a build there lacked its
    text encoders."""
    code = (
        "import sys; from pathlib import Path; from pipelines.tiny import save_tiny_pipeline as s; s(Path(sys.argv[1]))"
    )
    package_root = str(Path(__file__).resolve().parents[1])  # importable as it is here, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise OSError(f"building the tiny pipeline in a separate process failed: {last}")


def _check_loads(folder: Path) -> None:
    """Load the new build once before it becomes the cache: a build that does not load must never count as one."""
    from diffusers import FluxPipeline

    try:
        FluxPipeline.from_pretrained(folder)
    except Exception as err:  # diffusers and transformers raise many types for a missing or broken file
        raise OSError(f"the tiny pipeline just built does not load ({type(err).__name__}: {err})") from err


def load_tiny_pipeline(torch_dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """The tiny FLUX pipeline, loaded with ``FluxPipeline.from_pretrained`` from its cache (built on first use)."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_pipeline_path(cache_dir), dtype=torch_dtype)


def train_clip_tokenizer(folder: Path, corpus: list[str] | None = None):
    """Train a byte-level BPE on ``corpus`` (default :func:`tiny_corpus`) with CLIP's normalizer and pre-tokenizer.

    Writes ``vocab.json``/``merges.txt`` into ``folder`` and returns ``CLIPTokenizer.from_pretrained(folder)``.
    Every byte is in the vocabulary both inside a word and at a word's end (``</w>``), as in CLIP's own vocab,
    so no text maps to the unknown token.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    suffix = "</w>"
    tok = Tokenizer(models.BPE(unk_token=CLIP_EOS, continuing_subword_prefix="", end_of_word_suffix=suffix))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # The word-end symbols are listed up front so that their ids, which break ties between equally frequent
    # pairs, do not depend on the trainer's hash-map order: this keeps the merges identical from build to build.
    word_ends = [a + suffix for a in alphabet]
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=[CLIP_BOS, CLIP_EOS, *word_ends],
        initial_alphabet=alphabet,
        end_of_word_suffix=suffix,
        show_progress=False,
    )
    tok.train_from_iterator(corpus or tiny_corpus(), trainer)

    folder.mkdir(parents=True, exist_ok=True)
    model = json.loads(tok.to_str())["model"]
    vocab, merges = model["vocab"], [" ".join(pair) for pair in model["merges"]]
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    assert list(ordered.values()) == list(range(len(ordered))), "CLIP vocab ids must be contiguous"
    (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_MAX_LENGTH)


def train_t5_tokenizer(folder: Path, corpus: list[str] | None = None):
    """Train a SentencePiece-style Unigram tokenizer on ``corpus`` (default :func:`tiny_corpus`) with T5's
    pre-tokenizer. A ``corpus`` given explicitly (a narrow domain) also gets every one of its words as one
    piece: the Unigram trainer keeps almost no piece longer than 3 characters on a corpus that small.

    Writes ``tokenizer.json`` into ``folder`` (``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``</s>`` appended to every
    sequence) and returns ``T5TokenizerFast`` loaded from it, with no sentinel tokens.
    """
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=T5_SPECIAL,
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or tiny_corpus(), trainer)
    # Make every build identical: the trainer's float sums vary in their last bits from run to run (round them),
    # and it scores the characters it had to add in hash-map order (give all single characters one low score,
    # so they only fill gaps between learnt pieces); equal scores are then ordered by piece.
    model = json.loads(tok.to_str())["model"]
    special, pieces = model["vocab"][: len(T5_SPECIAL)], model["vocab"][len(T5_SPECIAL) :]
    assert [piece for piece, _ in special] == T5_SPECIAL
    pieces = [(p, CHAR_SCORE if len(p) == 1 and p != "▁" else round(score, 6)) for p, score in pieces]
    if corpus is not None:
        known = {p for p, _ in pieces}
        words = {"▁" + word.strip(string.punctuation) for line in corpus for word in line.split()}
        pieces += [(w, WORD_SCORE) for w in sorted(words - known) if len(w) > 1]
        pieces = [(p, WORD_SCORE) if p in words else (p, score) for p, score in pieces]
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    tok.model = models.Unigram([tuple(ps) for ps in special] + pieces, unk_id=model["unk_id"], byte_fallback=False)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": T5_MAX_LENGTH, "extra_ids": 0, "tokenizer_class": "T5Tokenizer"})
    )
    return T5TokenizerFast.from_pretrained(folder)


def build_tiny_pipeline(work_dir: str | os.PathLike, corpus: list[str] | None = None, t5_config: dict | None = None):
    """Build the tiny pipeline in memory (tokenizer files are written to ``work_dir``); fp32, on CPU.

    ``corpus`` (default :func:`tiny_corpus`) is the text the tokenizers are trained on: a model trained on a
    narrow domain (the fidelity benchmark's world) gets one token per word of it. ``t5_config`` overrides
    settings of the T5 encoder's ``T5Config`` (a ``d_model`` other than :data:`T5_DIM` needs a transformer
    with that ``joint_attention_dim``: the pipeline's own is built for :data:`T5_DIM`).

    Deterministic: every randomly initialised part is seeded with :data:`SEED`; the caller's RNG state is kept.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    work_dir = Path(work_dir)
    tokenizer = train_clip_tokenizer(work_dir / "tokenizer", corpus)
    tokenizer_2 = train_t5_tokenizer(work_dir / "tokenizer_2", corpus)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=CLIP_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=CLIP_MAX_LENGTH,
                projection_dim=CLIP_DIM,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(SEED + 1)
        t5_settings = dict(
            vocab_size=len(tokenizer_2),
            d_model=T5_DIM,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
        text_encoder_2 = T5EncoderModel(T5Config(**(t5_settings | (t5_config or {}))))
        torch.manual_seed(SEED + 2)
        transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
        torch.manual_seed(SEED + 3)
        vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


__all__ = [
    "CACHE_ENV",
    "T5_MAX_LENGTH",
    "TINY_NAME",
    "build_tiny_pipeline",
    "cache_root",
    "load_tiny_pipeline",
    "tiny_corpus",
    "tiny_pipeline_path",
]
