"""The attention benchmark runs end to end at tiny sizes and writes well-formed JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attention_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "attention.py"),
            "--smoke",
            "--threads",
            "1",
            "--memory",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(x) = full / backend" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["grid"], r["window_size"]) for r in rows] == [([8, 8], 2), ([8, 8], 4), ([16, 16], 2), ([16, 16], 4)]
    for row in rows:
        assert row["seq"] == row["text_len"] + row["grid"][0] * row["grid"][1]
        assert 0 < row["density"] <= 1 and abs(row["ideal_speedup"] * row["density"] - 1) < 1e-9
        assert row["full_ms"] > 0
        assert set(row["backends"]) == {"tiled", "dense"}
        for entry in row["backends"].values():
            assert entry["ms"] > 0 and abs(entry["speedup"] - row["full_ms"] / entry["ms"]) < 1e-6 * entry["speedup"]
            # the tiny sizes still allocate (tiles, strips, the dense mask): a real, positive measurement
            assert entry["peak_extra_bytes"] > 0
            assert entry["peak_extra_vs_qkv"] == entry["peak_extra_bytes"] / row["qkv_bytes"]
