"""argparse types shared by the benchmark scripts: a bad number is a one-line usage error, not a traceback later."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path


def positive_int(text: str) -> int:
    """An int >= 1 (counts, sizes, steps)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (warm-up rounds)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (learning rates, time budgets)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def json_path(text: str) -> Path:
    """A file to write results to: not a folder, its folder can be made and written (checked before hours of timing)."""
    path = Path(text).expanduser()
    if path.is_symlink() and not path.exists():  # written through: its target's folder must exist
        if not path.resolve().parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a link to {path.readlink()}, whose folder does not exist")
        path = path.resolve()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name, e.g. {Path(text) / 'results.json'}")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot make a folder for {text}: {parent} is a file")
    try:  # a probe that neither truncates the file nor leaves one behind
        if path.exists():
            path.open("a").close()
        else:
            tempfile.TemporaryFile(dir=parent).close()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {err.strerror}") from None
    return path
