"""bench_structured's report from earlier JSON runs (no Torch-Pruning needed): the table and the
commands that reproduce it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_structured  # noqa: E402


def _rows(arch, seeds, acc):
    return [{"arch": arch, "seed": s, "x": x, "method": m, "macs": 1 / x, "speedup": float(x), "params": 100 // x,
             "acc": acc + 0.001 * s} for s in seeds for x, m in ((1, "dense"), (4, "hyperflux channel (defaults)"))]


def test_from_json_writes_the_table_and_one_command_per_arch_when_seeds_differ(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_rows("mnist1d_cnn", [0, 1, 2, 3], 0.98)))
    b.write_text(json.dumps(_rows("digits_cnn", [0, 1], 0.99)))
    md = tmp_path / "B.md"
    bench_structured.main(["--from-json", f"{a},{b}", "--write", str(md)])
    text = md.read_text()
    assert "| mnist1d_cnn | 4x | hyperflux channel (defaults) | 0.2500 | 4.00x | 25 | 98.15 ± 0.13 |" in text
    assert "seeds mnist1d_cnn 0,1,2,3, digits_cnn 0,1;" in text
    assert "--archs mnist1d_cnn --seeds 0,1,2,3 --json mnist1d_cnn.json" in text
    assert "--archs digits_cnn --seeds 0,1 --json digits_cnn.json" in text
    assert f"--from-json mnist1d_cnn.json,digits_cnn.json --write {md}" in text


def test_one_command_when_every_arch_ran_the_same_seeds(tmp_path):
    rows = _rows("mnist1d_cnn", [0, 1], 0.98) + _rows("digits_cnn", [0, 1], 0.99)
    args = type("Args", (), {"write": "docs/BENCHMARKS.md"})()
    assert bench_structured._commands(rows, args) == (
        "`python tools/bench_structured.py --archs mnist1d_cnn,digits_cnn --seeds 0,1 --write docs/BENCHMARKS.md`")
