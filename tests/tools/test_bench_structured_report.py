"""bench_structured's report from earlier JSON runs (no Torch-Pruning needed): the table and the
commands that reproduce it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import _bench_common as common  # noqa: E402
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


def _cell(seed, x, tp_macs, dense_acc=0.98):
    rows = [{"arch": "mnist1d_cnn", "seed": seed, "x": 1, "method": "dense", "acc": dense_acc, "macs": 1.0}]
    rows.append({"arch": "mnist1d_cnn", "seed": seed, "x": x, "method": "hyperflux channel (defaults)", "acc": 0.9,
                 "macs": 0.25})
    rows += [{"arch": "mnist1d_cnn", "seed": seed, "x": x, "method": label, "acc": 0.97, "macs": tp_macs}
             for _, label in bench_structured.RECIPES]
    return rows


def test_baselines_are_reused_only_from_the_same_dense_start_at_the_same_or_no_fewer_macs():
    """--baselines-from: an earlier run's Torch-Pruning rows stand in for a cell only when a rerun would give
    them or they can only favour the baselines: the same dense start (its accuracy equal to the bit), and our
    MACs then equal to ours now, or theirs at least ours now."""
    cache = _cell(0, 4, tp_macs=0.251)
    reused = bench_structured._cached_baselines(cache, "mnist1d_cnn", 0, 4, 0.98, 0.2505)
    assert [r["method"] for r in reused] == [label for _, label in bench_structured.RECIPES]
    assert all(r["reused"] for r in reused)
    assert bench_structured._cached_baselines(cache, "mnist1d_cnn", 0, 4, 0.98, 0.2515) is None  # we now use more
    assert bench_structured._cached_baselines(cache, "mnist1d_cnn", 0, 4, 0.981, 0.25) is None  # another dense start
    assert bench_structured._cached_baselines(cache, "mnist1d_cnn", 1, 4, 0.98, 0.25) is None  # another seed
    assert bench_structured._cached_baselines(cache[:-1], "mnist1d_cnn", 0, 4, 0.98, 0.25) is None  # a recipe missing
    below = _cell(0, 4, tp_macs=0.249)  # bisected below our 0.25 then: reused at exactly 0.25 only
    assert bench_structured._cached_baselines(below, "mnist1d_cnn", 0, 4, 0.98, 0.25) is not None
    assert bench_structured._cached_baselines(below, "mnist1d_cnn", 0, 4, 0.98, 0.2499) is None


def test_lr_note_measures_what_choosing_the_lr_per_seed_on_the_test_set_adds():
    """Best LR per seed: mean 0.985; one LR for the cell: 0.05 (mean 0.98), so the per-seed choice adds 0.5 pt."""
    rows = [{"arch": "mnist1d_cnn", "seed": s, "x": 4, "method": "TP magnitude, one-shot + FT", "acc": max(a.values()),
             "acc_by_lr": a} for s, a in enumerate(({"0.01": 0.98, "0.05": 0.97}, {"0.01": 0.96, "0.05": 0.99}))]
    note = bench_structured.lr_selection_note(rows)
    assert "best of 2 per seed" in note and "over 1 cells" in note and "adds +0.50 pt on average" in note
    assert bench_structured.lr_selection_note([{**r, "acc_by_lr": {}} for r in rows]) == ""  # older rows: no note
    same = [{**r, "acc_by_lr": {"0.01": 0.98, "0.05": 0.97}} for r in rows]  # one LR best on every seed: nothing
    assert "adds +0.00 pt" in bench_structured.lr_selection_note(same)


def test_the_header_names_the_rounding_each_arch_resolved():
    rows = _rows("mnist1d_cnn", [0, 1], 0.98) + _rows("digits_cnn", [0], 0.99)
    assert bench_structured._rounding_note(rows) == ""  # rows from before the field
    for r in rows:
        if r["method"].startswith("hyperflux"):
            r["round_to"] = 8 if r["arch"] == "digits_cnn" or r["seed"] == 0 else 16
            if r["arch"] == "mnist1d_cnn":
                r["min_conv_channels"] = 16  # digits_cnn's rows predate the field: the block was the floor
    assert bench_structured._rounding_note(rows) == (
        " hyperflux-compile's resolved `round_to` (conv floor) per reduction: mnist1d_cnn 8 (16),16 (16); "
        "digits_cnn 8 (8).")


def test_a_folder_of_json_files_reads_as_all_of_them(tmp_path):
    """The published rows are kept one file per arch and seed (docs/data/bench_structured/): a folder given to
    --from-json / --baselines-from stands for every *.json in it, in name order."""
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "b.json").write_text(json.dumps(_rows("digits_cnn", [1], 0.99)))
    (tmp_path / "rows" / "a.json").write_text(json.dumps(_rows("digits_cnn", [0], 0.99)))
    (tmp_path / "rows" / "notes.txt").write_text("not rows")
    extra = tmp_path / "c.json"
    extra.write_text(json.dumps(_rows("mnist1d_cnn", [0], 0.98)))
    rows = common.load_rows(f"{tmp_path / 'rows'},{extra}")
    assert [(r["arch"], r["seed"]) for r in rows if r["x"] == 1] == [("digits_cnn", 0), ("digits_cnn", 1),
                                                                       ("mnist1d_cnn", 0)]
    assert common.load_rows(None) == []
