"""clear_dit.files: atomic writes (the CLI's PNGs, weights, run files, benchmark JSON)."""

from __future__ import annotations

import pytest

from clear_dit.files import atomic_write, check_writable, nearest_existing


def test_a_legal_name_near_the_length_limit_is_written(tmp_path):
    """check_writable accepted it, then the temporary name (14 bytes longer) failed after all the work."""
    path = tmp_path / ("a" * 246 + ".png")  # 250 bytes: within NAME_MAX (255)
    check_writable(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"x")
    assert path.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_overwriting_keeps_a_private_files_mode(tmp_path):
    """os.replace installed the new file with the umask's mode: a 0600 file came back 0644."""
    path = tmp_path / "r.json"
    path.write_text("old")
    path.chmod(0o600)
    with atomic_write(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o600


def test_nearest_existing_names_a_folder_that_cannot_be_searched(tmp_path, deny_searching):
    """Path.exists raised PermissionError (Errno 13 and the path) instead of a line that names the folder."""
    (tmp_path / "locked" / "inner").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    assert nearest_existing(tmp_path / "a" / "b" / "c") == tmp_path / "a"
    assert nearest_existing(tmp_path / "a") == tmp_path / "a"
    deny_searching(tmp_path / "locked")
    locked = tmp_path / "locked"
    with pytest.raises(ValueError, match=f"^{locked / 'inner' / 'new'} cannot be reached .Permission denied.$"):
        nearest_existing(locked / "inner" / "new")
    with pytest.raises(ValueError, match=f"^{locked / 'inner' / 'x.png'}: {locked / 'inner'} cannot be reached"):
        check_writable(locked / "inner" / "x.png")
