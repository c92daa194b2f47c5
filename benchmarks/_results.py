"""What a benchmark's JSON holds besides its measurements: its arguments and the run (date, commit, versions, load),
so that every figure quoted from it can be traced to the code and the machine state that produced it."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from clear_dit.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), so a result file says what it measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def run_meta(**versions: str) -> dict[str, Any]:
    """The run's start: UTC date, commit, torch (and the given) versions, CPU count, load average."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        **versions,
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
    }


def jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """argparse values as JSON takes them (paths as strings)."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


def write_results(path: Path, args: Any, meta: dict[str, Any], **results: Any) -> None:
    """``{"args", "meta", **results}`` to ``path``, atomically (a run stopped while writing leaves the results of
    its last write); the load average at the time of writing joins ``meta``."""
    meta["load_average_end"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"args": jsonable(vars(args)), "meta": meta, **results}, indent=2))
