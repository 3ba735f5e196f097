"""The headline and the asked/got rows people read first (report.html and the CLI)."""

from __future__ import annotations

from hyperflux_fx.report.summary import asked_and_got, fmt, headline, slower_note

BASE = {"granularity": "channel", "target_measure": "count", "target_sparsity": 0.5, "achieved_sparsity": 0.5,
        "sparsity_before_landing": 0.48, "dense_accuracy": 0.978, "pruned_accuracy": 0.976,
        "compact_accuracy": 0.975, "params_dense": 1_000_000, "params_compact": 250_000,
        "params_compact_stored": 250_000, "macs_dense": 4_000_000, "macs_compact": 1_000_000,
        "ort_latency_ms_dense": 2.3, "ort_latency_ms_compact": 1.0, "latency_batch": 2,
        "onnx_parity_max_abs_diff": 1.2e-6, "wall_seconds": 36.04275880899999}


def test_headline_says_speed_size_and_accuracy():
    assert headline(BASE) == "2.3x faster in ONNX Runtime, 4.0x fewer parameters, accuracy 97.8% → 97.5%"
    sized = {**BASE, "onnx_file_bytes_dense": 4_000_000, "onnx_file_bytes": 1_000_000}
    assert "4.0x fewer parameters, 4.0x smaller ONNX file, accuracy" in headline(sized)
    assert slower_note(BASE) is None


def test_a_slower_compact_model_is_said_in_plain_words():
    slow = {**BASE, "ort_latency_ms_compact": 3.0}
    assert headline(slow).startswith("SLOWER than the dense model in ONNX Runtime (0.77x)")
    assert "round-to auto" in slower_note({**slow, "round_to": 1})  # odd widths: the blocked kernels
    assert "--target-speedup" in slower_note({**slow, "round_to": 16})  # whole blocks: fixed per-op costs
    weight = {**slow, "granularity": "weight", "params_compact_stored": 1_000_000}
    assert "zeros stay in dense kernels" in slower_note(weight)
    same = {**BASE, "ort_latency_ms_compact": 2.25}  # within 5%: noise, not slower
    assert headline(same).startswith("As fast as the dense model") and slower_note(same) is None


def test_asked_and_got_rows_have_units_and_no_float_noise():
    rows = {what: (asked, got) for what, asked, got in asked_and_got(BASE)}
    assert rows["sparsity"] == ("50.0% of the gated units, channel gates", "50.0% (the dynamics alone: 48.0%)")
    assert rows["MACs"][1] == "4,000,000 → 1,000,000 (4.00x fewer)"
    latency = {**BASE, "target_measure": "latency", "target_sparsity": 0.5, "latency_predicted_ms_compact": 1.1}
    rows = {what: (asked, got) for what, asked, got in asked_and_got(latency)}
    assert rows["sparsity"][0].startswith("50.0% of the ONNX Runtime latency")
    assert rows["ONNX Runtime latency, batch 2"] == ("2.00x (predicted: 1.100 ms)", "2.300 ms → 1.000 ms (2.30x)")
    assert rows["ONNX Runtime latency, batch 2"][1] == "2.300 ms → 1.000 ms (2.30x)"
    assert rows["wall time"][1] == "36 s"
    assert fmt(0.43440999999688756) == "0.4344" and fmt(1234567) == "1,234,567" and fmt(None) == "-"
    no_export = {k: v for k, v in BASE.items() if not k.startswith("ort_")}
    assert "ONNX Runtime latency, batch 2" not in {r[0] for r in asked_and_got(no_export)}
    assert headline(no_export).startswith("4.0x fewer parameters")
