"""tools/bench_structured.py on a tiny budget (only where the [bench] extra, Torch-Pruning, is installed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_structured  # noqa: E402


def test_bench_structured_prunes_every_method_to_hyperfluxs_macs(tmp_path):
    out = tmp_path / "rows.json"
    bench_structured.main(["--quick", "--json", str(out)])
    rows = json.loads(out.read_text())
    methods = [r["method"] for r in rows]
    assert methods[0] == "dense" and methods[1].startswith("hyperflux") and len(methods) == 6
    assert sum(m.startswith("TP ") for m in methods) == 4 and bench_structured.KD_LABEL in methods
    ours = rows[1]
    assert ours["macs"] == pytest.approx(0.25, rel=0.03)  # asked for 4x fewer MACs: the landing hits them
    for r in rows[1:]:
        assert r["macs"] == pytest.approx(ours["macs"], abs=0.05)  # equal work, up to whole channels
        assert 0.0 <= r["acc"] <= 1.0 and r["speedup"] > 0 and r["params"] < rows[0]["params"]
        assert len(r["widths"]) == len(rows[0]["widths"]) and r["widths"] != rows[0]["widths"]
