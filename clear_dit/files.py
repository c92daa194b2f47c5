"""Files written atomically: under a temporary name beside the target, renamed over it once complete; and the
check, before long work, that such a file can be written at all."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the file to; when the block ends it replaces ``path``, or,
    if the block raises, it is removed: ``path`` is never half-written, and an interrupted write leaves it as it
    was. The name (``.NAME.XXXXXXXX.tmp``, hidden, random, NAME cut to 200 bytes) is never one of the user's files;
    a process killed outright (SIGKILL, power loss) inside the block leaves it behind. A replaced file keeps its
    mode. A symbolic link is written through, as ``open(path, "w")`` would: its target is replaced and the link
    stays."""
    path = write_target(path)
    name = os.fsdecode(os.fsencode(path.name)[:200])  # with the 14 added bytes, within NAME_MAX (255)
    tmp = path.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        try:  # a private file stays private
            shutil.copymode(path, tmp)
        except OSError:  # no file there yet
            pass
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_target(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` replaces: ``path`` itself (``~`` expanded), or the target of a symbolic link;
    ``ValueError`` for links that lead back to themselves."""
    path = Path(path).expanduser()
    if not os.path.islink(path):  # not Path.is_symlink: up to Python 3.12 it raises under an unsearchable folder
        return path
    try:
        target = path.resolve(strict=False)
    except RuntimeError:  # a loop, up to Python 3.12
        target = path
    if os.path.islink(target):  # a loop, which Python 3.13 resolves to a link without raising
        raise ValueError(f"{path} is a link that never reaches a file (a loop)")
    return target


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest parent that does: where making the missing folders starts, and
    a file there means ``path`` can never be a folder. ``ValueError`` naming the folder that cannot be searched
    (or is a link loop) on the way."""
    path = Path(path)
    for folder in (path, *path.absolute().parents):
        try:  # not Path.exists, which raises PermissionError under a folder that cannot be searched
            folder.stat()
            return folder
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as err:  # a folder that is a link loop, or that cannot be searched
            raise ValueError(f"{folder} cannot be reached ({err.strerror})") from None
    return folder  # the root, which always exists


def check_writable(path: str | os.PathLike) -> Path:
    """``write_target(path)``, checked now rather than after hours of work that end in writing it: not a folder,
    below a folder that exists or can be made (:func:`atomic_write`'s callers make the missing ones), writable.

    Nothing is created, truncated or left behind. Raises ``ValueError`` with a one-line reason that starts with
    ``path`` as given (callers prefix the option's name).
    """
    target = write_target(path)
    if os.path.islink(Path(path).expanduser()) and not os.path.isdir(target.parent):
        raise ValueError(f"{path} is a link to {target}, whose folder does not exist")
    if os.path.isdir(target):  # False, not PermissionError, under a folder that cannot be searched
        raise ValueError(f"{path} is a folder; name a file (in it)")
    try:
        folder = nearest_existing(target.absolute().parent)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not os.path.isdir(folder):
        raise ValueError(f"{path}: {folder} is a file, not a folder")
    try:  # the temporary file atomic_write will make there
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ValueError(f"{path}: cannot write in {folder} ({err.strerror})") from None
    return target
