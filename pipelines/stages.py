"""Stage sizes of high-resolution generation: parsing and checks, importable without torch or diffusers.

The CLI runs these before it loads anything, so a bad ``--stages`` fails in a fraction of a second.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BASE_ATTENTIONS",
    "FLOAT32_MAX",
    "MAX_SIDE",
    "OUTPUT_TYPES",
    "TIME_SHIFT_RANGE",
    "check_highres_inputs",
    "parse_stages",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
BASE_ATTENTIONS = ("full", "clear")
TIME_SHIFT_RANGE = (1e-6, 1e6)
#: The largest stage side in pixels (8x an 8K image's): a larger one failed only after the base stage ran.
MAX_SIDE = 65536
#: The largest float32: guidance scales (and the CLI's float options) become float32 tensors, and beyond it overflow.
FLOAT32_MAX = 3.4028234663852886e38


class _Brief(reprlib.Repr):
    """``repr`` cut short for one-line messages; an int too long for Python to print is named by its size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlong = self.maxstring = self.maxother = 40

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # more digits than sys.get_int_max_str_digits() allows to print
            return f"<{'a negative' if x < 0 else 'an'} int of {x.bit_length()} bits>"


def brief(value: Any) -> str:
    """``repr(value)`` for a one-line error message: long numbers, strings and sequences shortened with ``...``."""
    return _Brief().repr(value)


def parse_stages(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,2048x1536"`` -> ``[(1024, 1024), (2048, 1536)]`` as ``(width, height)`` pairs."""
    stages = []
    for part in text.split(","):
        try:
            width, height = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"stage size {brief(part.strip())} is not WIDTHxHEIGHT (e.g. 1024x1024)") from None
        stages.append((width, height))
    return stages


def _real(value: object) -> bool:
    """A real number: Python's, numpy's or a 0-d tensor's of an int or float dtype; not a bool, complex number,
    string or date."""
    kind = str(getattr(value, "dtype", ""))
    if isinstance(value, (bool, str, bytes)) or (kind and "float" not in kind and "int" not in kind):
        return False
    return isinstance(value, numbers.Real) or (getattr(value, "ndim", None) == 0 and hasattr(value, "__float__"))


def _positive_finite(value: object) -> bool:
    """Positive and finite as the float it is used as (an int of 400 digits is not finite, 1/10**400 is 0.0)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return False
    return math.isfinite(number) and number > 0


def check_highres_inputs(
    stages: Sequence[tuple[int, int]],
    strengths: Sequence[float],
    ntk_factor: float = 1.0,
    base_attention: str = "full",
    down_factor: int = 1,
    output_type: str = "pil",
    unit: int = 16,
    time_shift: float | None = None,
    guidance_scale: float = 3.5,
    true_cfg_scale: float = 1.0,
) -> None:
    """Raise a one-line ValueError for settings :class:`HighResFluxPipeline` cannot run (no model needed).

    ``stages`` are ``(width, height)``; ``strengths`` one per upscale stage; ``unit`` the pixels per image token.
    """
    for name, scale in (("guidance_scale", guidance_scale), ("true_cfg_scale", true_cfg_scale)):
        # a nan scale ran every stage into nan (black) images; one beyond float32 failed as a tensor, mid-run
        if not _real(scale) or not (scale == 0 or _positive_finite(scale)) or scale > FLOAT32_MAX:
            raise ValueError(f"{name} must be >= 0 and finite (at most {FLOAT32_MAX:.3g}), got {brief(scale)}")
    if not stages:
        raise ValueError("stages is empty; give at least one (width, height)")
    if base_attention not in BASE_ATTENTIONS:
        raise ValueError(f"base_attention must be one of {BASE_ATTENTIONS}, got {base_attention!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if not _real(ntk_factor) or not _positive_finite(ntk_factor):
        raise ValueError(f"ntk_factor must be > 0 and finite, got {brief(ntk_factor)}")
    # the scheduler shifts sigmas as shift*s / (1 + (shift-1)*s) in float32: 0, below ~1e-7 or above ~3e38 that is
    # 0/0 or inf/inf at s = 1 and the images come out NaN (black); beyond this range every sigma is ~0 or ~1 anyway
    if time_shift is not None and not (_real(time_shift) and TIME_SHIFT_RANGE[0] <= time_shift <= TIME_SHIFT_RANGE[1]):
        low, high = TIME_SHIFT_RANGE
        raise ValueError(
            f"time_shift must be in [{low:g}, {high:g}] (None: the scheduler's dynamic shift), got {brief(time_shift)}"
        )
    for i, strength in enumerate(strengths, start=1):
        if not _real(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength of stage {i} must be in (0, 1], got {brief(strength)}")
    for i, (width, height) in enumerate(stages):
        clear = i > 0 or base_attention == "clear"
        multiple = unit * (down_factor if clear else 1)
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or width % multiple or height % multiple:
            why = f"{unit}*d, CLEAR down factor d={down_factor}" if multiple > unit else f"{unit} px per image token"
            raise ValueError(
                f"stage {i} size {brief(width)}x{brief(height)} must be positive multiples of {multiple} ({why}) in "
                f"both sides, at most {MAX_SIDE}"
            )
        if i > 0:
            prev_w, prev_h = stages[i - 1]
            if width < prev_w or height < prev_h or width * height == prev_w * prev_h:
                raise ValueError(
                    f"stage sizes must increase: stage {i} ({brief(width)}x{brief(height)}) is not larger than "
                    f"stage {i - 1} ({brief(prev_w)}x{brief(prev_h)}) in one side and no smaller in the other"
                )
