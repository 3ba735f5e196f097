"""What a person reads first: a one-sentence headline and "what you asked, what you got", from a
run's summary.json fields, with units and sensible precision. Used by report.html and the CLI."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FASTER", "SLOWER", "asked_and_got", "fmt", "headline", "slower_note", "speedup"]

# A latency median moves a few percent from run to run: within (SLOWER, FASTER) the two are "as fast".
FASTER = 1.05
SLOWER = 0.95


def fmt(value: Any) -> str:
    """A field value for people: 4 significant digits, thousands separators, no float noise."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


def speedup(s: dict[str, Any]) -> float | None:
    """Measured ONNX Runtime speed-up of the compact model (None without export)."""
    dense, compact = s.get("ort_latency_ms_dense"), s.get("ort_latency_ms_compact")
    return dense / compact if dense and compact else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def headline(s: dict[str, Any]) -> str:
    """One sentence: speed, size and accuracy of the compact model against the dense one."""
    parts = []
    x = speedup(s)
    if x is not None:
        if x >= FASTER:
            parts.append(f"{x:.1f}x faster in ONNX Runtime")
        elif x > SLOWER:
            parts.append(f"as fast as the dense model in ONNX Runtime ({x:.2f}x)")
        else:
            parts.append(f"SLOWER than the dense model in ONNX Runtime ({x:.2f}x)")
    if s.get("params_dense") and s.get("params_compact"):
        parts.append(f"{s['params_dense'] / s['params_compact']:.1f}x fewer parameters")
    if s.get("onnx_file_bytes") and s.get("onnx_file_bytes_dense"):
        parts.append(f"{s['onnx_file_bytes_dense'] / s['onnx_file_bytes']:.1f}x smaller ONNX file")
    if s.get("dense_accuracy") is not None and s.get("compact_accuracy") is not None:
        parts.append(f"accuracy {_pct(s['dense_accuracy'])} → {_pct(s['compact_accuracy'])}")
    text = ", ".join(parts)
    return text[:1].upper() + text[1:] if text else "No figures"


def slower_note(s: dict[str, Any]) -> str | None:
    """Plain words when the compact model is not faster than the dense one, with the likely cause."""
    x = speedup(s)
    if x is None or x >= SLOWER:  # noise, not slower (the headline says "as fast")
        return None
    if s.get("granularity") == "weight":
        cause = ("weight granularity removes single weights: the zeros stay in dense kernels, so nothing runs "
                 "faster (use --granularity channel)")
    elif s.get("round_to") == 1:
        cause = ("channel counts that are not multiples of ONNX Runtime's blocked-kernel width fall back to "
                 "slower kernels (use --round-to auto, the default)")
    else:
        cause = ("the layers that shrank are a small share of the run time at this input size, and every op keeps "
                 "a fixed cost; aim at latency itself with --target-speedup")
    return f"The compact model is slower than the dense one ({x:.2f}x). Likely cause: {cause}."


def asked_and_got(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows (what, asked, got) for the figures a user checks first."""
    measure = {"count": "of the gated units", "params": "of the model's parameters",
               "macs": "of the model's MACs", "latency": "of the ONNX Runtime latency"}.get(s.get("target_measure",
                                                                                                  "count"), "")
    got = _pct(s.get("achieved_sparsity"))
    if s.get("sparsity_before_landing") is not None:
        got += f" (the dynamics alone: {_pct(s['sparsity_before_landing'])})"
    rows = [("sparsity", f"{_pct(s.get('target_sparsity'))} {measure}, {s.get('granularity', '')} gates", got),
            ("accuracy", "-", f"{_pct(s.get('dense_accuracy'))} dense → "
                                              f"{_pct(s.get('pruned_accuracy'))} pruned → "
                                              f"{_pct(s.get('compact_accuracy'))} compact")]
    if s.get("perplexity_dense") is not None:
        rows.append(("perplexity (validation)", "-", f"{s['perplexity_dense']:.2f} dense → "
                     f"{s['perplexity_pruned']:.2f} pruned → {s['perplexity_compact']:.2f} compact (loss per token "
                     f"{s['val_loss_dense']:.3f} → {s['val_loss_compact']:.3f})"))
    if s.get("tokens_per_s_compact") is not None:
        rows.append(("tokens/s (ONNX Runtime, CPU)", "-", f"{s['tokens_per_s_dense']:,.0f} dense → "
                     f"{s['tokens_per_s_compact']:,.0f} compact (batch {s.get('latency_batch')}, one forward pass)"))
    if "hf_folder" in s:
        c = s.get("hf_folder_config") or {}
        rows.append(("Hugging Face folder", "-", f"{s['hf_folder']}/: hidden {c.get('hidden_size')}, "
                     f"{c.get('num_attention_heads')} heads over {c.get('num_key_value_heads')} KV, "
                     f"{c.get('intermediate_size')} MLP units" if s["hf_folder"] else
                     f"none: {s.get('hf_folder_note')}"))
    if (t := s.get("tracking")) is not None:
        rows.append(("plan tracking (pruning)", "-", f"median gap {_pct(t['median_gap'])}, worst "
                     f"{100 * t['worst_gap']:+.1f}%, at most {_pct(t['max_flip_fraction'])} of the units flipped "
                     "in one interval"))
    if s.get("distilled"):
        rows.append(("distillation", "-", f"from the dense model, alpha {s.get('distill_alpha')}, "
                                          f"T {s.get('distill_temperature')}"))
    if s.get("params_dense"):
        rows.append(("parameters", "-", f"{fmt(s['params_dense'])} → {fmt(s.get('params_compact'))} non-zero, "
                                        f"{fmt(s.get('params_compact_stored'))} stored"))
    if s.get("onnx_file_bytes") and s.get("onnx_file_bytes_dense"):
        sparse = s.get("onnx_sparse_initializers")
        sizes = f"{s['onnx_file_bytes_dense'] / 1e6:.2f} MB → {s['onnx_file_bytes'] / 1e6:.2f} MB"
        rows.append(("ONNX file", "-", sizes + (f" ({sparse} tensors stored sparse)" if sparse else "")))
    if s.get("macs_dense"):
        ratio = s["macs_dense"] / max(s.get("macs_compact") or 1, 1)
        rows.append(("MACs", "-", f"{fmt(s['macs_dense'])} → {fmt(s.get('macs_compact'))} ({ratio:.2f}x fewer)"))
    x = speedup(s)
    if x is not None:
        asked = "-"
        if s.get("target_measure") == "latency":
            asked = f"{1 / (1 - s['target_sparsity']):.2f}x"
            if s.get("latency_predicted_ms_compact") is not None:
                asked += f" (predicted: {s['latency_predicted_ms_compact']:.3f} ms)"
        rows.append((f"ONNX Runtime latency, batch {s.get('latency_batch', '?')}", asked,
                     f"{s['ort_latency_ms_dense']:.3f} ms → {s['ort_latency_ms_compact']:.3f} ms ({x:.2f}x)"))
        rows.append(("ONNX parity (max |Δ|)", "≤ 1e-5 + 1e-4 × output spread", fmt(s.get("onnx_parity_max_abs_diff"))))
    if s.get("wall_seconds") is not None:
        rows.append(("wall time", "-", f"{s['wall_seconds']:.0f} s"))
    return rows
