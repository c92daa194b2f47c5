"""Files written atomically: under a temporary name beside the target, renamed over it once complete."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the file to; when the block ends it replaces ``path``, or,
    if the block raises, it is removed: ``path`` is never half-written, and an interrupted write leaves it as it
    was. The name (``.NAME.XXXXXXXX.tmp``, hidden, random) is never one of the user's files; a process killed
    outright (SIGKILL, power loss) inside the block leaves it behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
