"""clear_dit.files: atomic writes (the CLI's PNGs, weights, run files, benchmark JSON)."""

from __future__ import annotations

from clear_dit.files import atomic_write, check_writable


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
