"""argparse types shared by the benchmark scripts: a bad number is a one-line usage error, not a traceback later."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from clear_dit.files import check_writable


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
    """A file to write results to (:func:`~clear_dit.files.check_writable`: checked before hours of timing)."""
    try:
        return check_writable(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_json_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """``--json FILE`` (:func:`json_path`) and the ``--overwrite`` that an existing FILE needs: the committed results
    are such files, and a run (a ``--smoke`` one, or one stopped after its first row) would replace them.
    :func:`refuse_existing_json` checks the pair after parsing."""
    parser.add_argument("--json", type=json_path, help=f"{help}; an existing file needs --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")


def refuse_existing_json(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error (before any timing) for an existing ``--json`` file without ``--overwrite``."""
    if args.json is not None and args.json.exists() and not args.overwrite:
        parser.error(f"--json {args.json} exists; pass --overwrite to replace it")
