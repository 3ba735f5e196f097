"""The self-contained HTML report of a hyperflux-compile run: figures (matplotlib, embedded PNG) and
the gating and folding reports as tables."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from hyperflux_fx.report.summary import asked_and_got, fmt, headline, slower_note
from hyperflux_fx.train.scheduler import equilibrium_points

__all__ = ["SECTIONS", "figures", "render_report"]


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


SECTIONS = ("What you got", "How it converged", "Where it cut, and why", "What came back")


def figures(history: list[Any], summary: dict[str, Any], fold_groups: list[dict[str, Any]],
            law: dict[str, float] | None, timeline: dict[str, Any] | None = None,
            flux: tuple[Any, dict[str, Any]] | None = None) -> list[tuple[str, str, str]]:
    """(section, title, base64 PNG) for each figure the run has data for, in the order of :data:`SECTIONS`
    (``history``: the run's interval records, read by name; ``timeline``: the unit timeline and ``flux``
    its flux histograms, train/timeline.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got, converged, cut, back = ([] for _ in SECTIONS)
    if summary.get("ort_latency_ms_dense") and summary.get("ort_latency_ms_compact"):
        got.append(_latency_figure(plt, summary))
    if any(g["deleted"] > 0 for g in fold_groups):  # only where something was deleted
        got.append(_fold_figure(plt, fold_groups))
    if history:
        converged += [_density_figure(plt, history, summary.get("target_measure", "count")),
                      _loss_figure(plt, history), _pressure_figure(plt, history)]
        converged += _law_figure(plt, history, law)
        cut += _layer_figure(plt, history) + _flux_figure(plt, history) + _flux_pressure_figure(plt, history)
        if flux and flux[1]:
            cut += _flux_distribution_figure(plt, flux[0], flux[1], history)
        back.append(_flips_figure(plt, history))
    units = {name: rows for name, rows in (timeline or {}).items() if getattr(rows, "ndim", 0) == 2 and len(rows)}
    if units:
        cut.append(_heatmap_figure(plt, units))
        back.append(_raster_figure(plt, units))
    if (summary.get("sensitivity") or {}).get("groups"):
        cut.append(_sensitivity_figure(plt, summary["sensitivity"]))
    return [(section, title, png) for section, figs in zip(SECTIONS, (got, converged, cut, back), strict=True)
            for title, png in figs]


def _latency_figure(plt: Any, summary: dict[str, Any]) -> tuple[str, str]:
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    ax.bar(["dense", "compact"], [summary["ort_latency_ms_dense"], summary["ort_latency_ms_compact"]],
           color=["#999", "#2a7"])
    ax.set_ylabel("ms (ONNX Runtime, median)")
    ax.set_title("Dense vs compact latency")
    return "Dense vs compact latency", _png(fig)


KEPT_LABELS = {"count": "kept fraction of the gated units", "params": "kept fraction of the parameters",
               "macs": "kept fraction of the MACs", "latency": "predicted latency / dense"}


def _density_figure(plt: Any, history: list[Any], measure: str) -> tuple[str, str]:
    """The kept fraction against the plan, and below it on the same steps what the model learned: the
    validation metric per interval and, with distillation, the distillation term's share of the loss."""
    x = [r["step"] for r in history]
    fig, (ax, low) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(x, [r["measured_density"] for r in history], label="measured (what the controller steers)", lw=2)
    rounded = [(r["step"], r.get("measured_density_rounded")) for r in history
               if r.get("measured_density_rounded") is not None]
    if rounded and any(abs(v - r["measured_density"]) > 1e-9 for (_, v), r in zip(rounded, history, strict=False)):
        ax.plot(*zip(*rounded, strict=True), lw=0.8, alpha=0.6, label="with the fold's rounding to blocks")
    planned = [(r["step"], r["planned"]) for r in history if r.get("planned") is not None]
    if planned:
        ax.plot(*zip(*planned, strict=True), "--", label="planned R(e) (pruning phase)")
    ax.axhline(history[-1]["target_density"], color="k", lw=0.8, ls=":", label="target")
    ax.set_yscale("log")
    ax.set_ylabel(KEPT_LABELS.get(measure, "density"))
    ax.legend(fontsize=7)
    ax.set_title("Density trajectory vs plan, and what the model learned")
    val = [(r["step"], r["val_metric"]) for r in history if r.get("val_metric") is not None]
    if val:
        low.plot(*zip(*val, strict=True), "o-", ms=3, color="#2a7", label="validation metric")
    low.plot(x, [r["train_metric"] for r in history], lw=0.8, color="#999", label="train metric")
    low.set_ylabel("metric")
    low.set_xlabel("step")
    share = [(r["step"], r["distill_share"]) for r in history if r.get("distill_share") is not None]
    if share:
        twin = low.twinx()
        twin.plot(*zip(*share, strict=True), ":", color="#a52", label="distillation share of the loss")
        twin.set_ylabel("distillation share", color="#a52")
        twin.set_ylim(0, 1)
        twin.legend(fontsize=7, loc="lower right")
    low.legend(fontsize=7, loc="lower left")
    return "Density trajectory vs planned, validation and distillation", _png(fig)


def _loss_figure(plt: Any, history: list[Any]) -> tuple[str, str]:
    """The loss per interval: training (the blend, with distillation its task part too) and validation
    (per target element: per token for a language model), on the steps of the density trajectory."""
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    x = [r["step"] for r in history]
    ax.plot(x, [r["train_loss"] for r in history], lw=0.8, color="#999", label="train loss")
    task = [(r["step"], r["train_task_loss"]) for r in history if r.get("train_task_loss") is not None]
    if task:
        ax.plot(*zip(*task, strict=True), ":", color="#555", label="train task loss (without distillation)")
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", ms=3, color="#27a", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title("Loss per interval")
    return "Loss per interval (train and validation)", _png(fig)


def _sensitivity_figure(plt: Any, sens: dict[str, Any]) -> tuple[str, str]:
    """Per group, the loss growth as its lowest-flow units close (25/50/75%) against the fraction the run
    kept: did the dynamics keep what matters (train/sensitivity.py)?"""
    groups = sens["groups"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(groups))
    for k, style in zip(groups[0]["loss_delta"], (":", "-", "--", "-."), strict=False):  # the fractions measured
        left.plot(x, [g["loss_delta"].get(k, float("nan")) for g in groups], style, marker="o", ms=3,
                  label=f"{float(k):.0%} lowest-flow units closed")
    left.set_xticks(list(x), [g["name"] for g in groups], rotation=90, fontsize=5)
    left.set_ylabel("loss growth")
    left.legend(fontsize=6)
    left.set_title("Sensitivity per group" + (" (capped)" if sens.get("capped") else ""), fontsize=9)
    right.scatter([g["kept"] for g in groups], [g["loss_delta"].get("0.5", float("nan")) for g in groups], s=12)
    right.set_xlabel("kept fraction (the run)")
    right.set_ylabel("loss growth at 50% closed")
    rho = sens.get("spearman")
    right.set_title("rank correlation " + ("-" if rho is None else f"{rho:+.2f}"), fontsize=9)
    fig.tight_layout()
    return "Per-group sensitivity against what the run kept", _png(fig)


def _pressure_figure(plt: Any, history: list[Any]) -> tuple[str, str]:
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.step([r["step"] for r in history], [r["gamma"] for r in history], where="post")
    ax.set_xlabel("step")
    ax.set_ylabel("gamma")
    ax.set_title("Pressure over time")
    return "Pressure over time", _png(fig)


def _flips_figure(plt: Any, history: list[Any]) -> tuple[str, str]:
    x = [r["step"] for r in history]
    width = max(1, (x[-1] - x[0]) / max(len(x), 1) * 0.4)
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.bar(x, [r["regrown"] for r in history], width=width, label="pruned -> active (regrowth)")
    ax.bar(x, [-r["pruned"] for r in history], width=width, label="active -> pruned")
    ax.set_xlabel("step")
    ax.set_ylabel("flips per interval")
    ax.legend()
    ax.set_title("Regrowth and pruning flips")
    return "Regrowth / prune flips over time", _png(fig)


def _layer_figure(plt: Any, history: list[Any]) -> list[tuple[str, str]]:
    layers = history[-1].get("layers", {})
    if not layers:
        return []
    names = list(layers)
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.18 * len(names) + 1)))
    ax.barh(range(len(names)), [layers[n]["density"] for n in names])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("final density")
    ax.set_title("Per-layer density")
    return [("Per-layer density", _png(fig))]


def _law_figure(plt: Any, history: list[Any], law: dict[str, float] | None) -> list[tuple[str, str]]:
    """The law over the run's equilibria (pressures held), only when one was fitted."""
    if not law:
        return []
    pts = equilibrium_points([(r["gamma"], r["measured_density"]) for r in history if r["phase"] == "prune"])
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    ax.loglog(*zip(*pts, strict=True), "o", ms=4, label="equilibria (pressure held)")
    gs = sorted(p[0] for p in pts)
    grid = [gs[0] * (gs[-1] / gs[0]) ** (i / 50) for i in range(51)] if gs[-1] > gs[0] else gs
    ax.loglog(grid, [law["c"] * math.exp(-(law["a0"] * math.log(g) + law["a1"] * math.log(g) ** 2))
                     for g in grid], "-", label=f"fit: R²={law['r2']:.2f}")
    ax.set_xlabel("gamma")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("Density vs pressure")
    return [("Density vs pressure (log-log) with the fitted law", _png(fig))]


def _flux_figure(plt: Any, history: list[Any]) -> list[tuple[str, str]]:
    """Mean flux (−dL/dm) of the survivors and of the pruned units per interval, beside the pressure in
    effect: flux holds a unit open where it outweighs the pressure (HYPERFLUX.md), pruned units sit below."""
    rows = [r for r in history if r.get("flux_survivors_mean") is not None]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    x = [r["interval"] for r in rows]
    ax.plot(x, [r["flux_survivors_mean"] for r in rows], label="survivors", color="#2a7")
    ax.plot(x, [r["flux_pruned_mean"] if r.get("flux_pruned_mean") is not None else float("nan") for r in rows],
            label="pruned", color="#c33")
    ax.set_xlabel("interval")
    ax.set_ylabel("mean flux")
    other = ax.twinx()
    other.plot(x, [r["gamma"] for r in rows], color="#888", linestyle="--", label="pressure (gamma)")
    other.set_ylabel("gamma", color="#888")
    ax.legend(loc="upper left", fontsize=7)
    return [("Flux of survivors and pruned units, with the pressure", _png(fig))]


def _pruning_intervals(history: list[Any]) -> list[int]:
    """Positions in ``history`` of three pruning-phase intervals with pressure: the first, the middle, the last."""
    idx = [i for i, r in enumerate(history) if r.get("phase") == "prune" and (r.get("gamma") or 0) > 0]
    if not idx:
        return []
    return list(dict.fromkeys([idx[0], idx[len(idx) // 2], idx[-1]]))


def _flux_distribution_figure(plt: Any, edges: Any, hists: dict[str, Any], history: list[Any]
                              ) -> list[tuple[str, str]]:
    """The flux of every gated unit over an interval, survivors against pruned units, at the first, middle
    and last pruning interval with pressure (all gates pooled; signed-log bins, a decade each)."""
    import numpy as np

    picks = [i for i in _pruning_intervals(history) if all(i < len(h) for h in hists.values())]
    if not picks:
        return []
    labels = [f"<-{edges[-1]:.0e}"] + [f"{e:.0e}" for e in edges]  # bin k holds values just below edges[k]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.0), squeeze=False, sharey=True)
    for ax, i in zip(axes[0], picks, strict=True):
        counts = sum(np.asarray(h[i], dtype=float) for h in hists.values())
        x = np.arange(counts.shape[1])
        for row, name, colour in ((0, "survivors", "#2a7"), (1, "pruned", "#c33")):
            total = counts[row].sum()
            if total:
                ax.step(x, counts[row] / total, where="mid", color=colour, label=f"{name} ({int(total)})")
        ax.set_title(f"interval {history[i]['interval']} (gamma {history[i]['gamma']:.3g})", fontsize=8)
        ticks = x[::4]
        ax.set_xticks(ticks, [labels[k] for k in ticks], rotation=60, fontsize=6)
        ax.set_xlabel("flux (signed, a decade per bin)", fontsize=7)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("share of the units")
    return [("Flux distribution of survivors and pruned units", _png(fig))]


def _flux_pressure_figure(plt: Any, history: list[Any], top: int = 6) -> list[tuple[str, str]]:
    """Per layer (the ``top`` with most units), the mean flux of its survivors and of its pruned units per
    interval against the pressure on it (gamma times its scale): flux holds a unit where it outweighs the
    pressure, so rising pressure should leave survivors with larger flux and push the rest below."""
    layers = history[-1].get("layers") or {}
    names = sorted(layers, key=lambda n: -layers[n]["units"])[:top]
    rows = [r for r in history if r.get("layers")]
    if not names or not any(r["layers"].get(n, {}).get("flux_survivors_mean") is not None
                            for r in rows for n in names):
        return []
    fig, axes = plt.subplots(len(names), 1, figsize=(6.4, 1.5 * len(names) + 0.6), squeeze=False, sharex=True)
    x = [r["interval"] for r in rows]
    for ax, name in zip(axes[:, 0], names, strict=True):
        per = [r["layers"].get(name, {}) for r in rows]
        for key, label, colour in (("flux_survivors_mean", "survivors", "#2a7"),
                                   ("flux_pruned_mean", "pruned", "#c33")):
            ax.plot(x, [p.get(key) if p.get(key) is not None else float("nan") for p in per], color=colour,
                    label=label)
        size = max((abs(p.get(k)) for p in per for k in ("flux_survivors_mean", "flux_pruned_mean")
                    if p.get(k) is not None), default=1.0)
        ax.set_yscale("symlog", linthresh=max(size * 1e-3, 1e-30))  # three decades of this layer's flux, then linear
        ax.set_ylabel(name[:18], fontsize=7)
        other = ax.twinx()
        pressure = [(r.get("gamma") or 0.0) * (p.get("pressure_scale") or 1.0) for r, p in zip(rows, per, strict=True)]
        other.plot(x, pressure, color="#888", ls="--", lw=1)
        other.set_ylabel("pressure", fontsize=7, color="#888")
    axes[0, 0].legend(fontsize=6, loc="upper left")
    axes[0, 0].set_title("Mean flux per layer (solid) against the pressure on it (dashed: gamma x scale)",
                         fontsize=8)
    axes[-1, 0].set_xlabel("interval")
    return [("Flux against pressure, per layer", _png(fig))]


def _heatmap_figure(plt: Any, units: dict[str, Any]) -> tuple[str, str]:
    """Groups x intervals, the kept fraction of each group's units (the macroscopic picture per group)."""
    import numpy as np

    names = list(units)
    grid = np.stack([units[n].mean(axis=1) for n in names])
    fig, ax = plt.subplots(figsize=(6.4, max(2.2, 0.22 * len(names) + 1.2)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                      extent=(0.5, grid.shape[1] + 0.5, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), [n[:28] for n in names], fontsize=7)
    ax.set_xlabel("interval")
    fig.colorbar(image, ax=ax, label="kept fraction")
    return "Kept fraction per group and interval", _png(fig)


def _raster_figure(plt: Any, units: dict[str, Any], top: int = 5) -> tuple[str, str]:
    """Unit by unit, kept (dark) or pruned (light) per interval, for the ``top`` groups with the most
    flips: where units left, and which came back."""
    import numpy as np

    def flips(rows: Any) -> int:
        return int((rows[1:] != rows[:-1]).sum())

    names = sorted(units, key=lambda n: -flips(units[n]))[:top]
    fig, axes = plt.subplots(len(names), 1, figsize=(6.4, 1.3 * len(names) + 0.6), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], names, strict=True):
        rows = np.asarray(units[name], dtype=float)
        ax.imshow(rows.T, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest",
                  extent=(0.5, rows.shape[0] + 0.5, rows.shape[1] - 0.5, -0.5))
        ax.set_ylabel(f"{name[:20]}\n({flips(units[name])} flips)", fontsize=7)
        ax.set_yticks([])
    axes[-1, 0].set_xlabel("interval")
    return f"Unit events of the {len(names)} most active groups (dark: kept)", _png(fig)


def _fold_figure(plt: Any, fold_groups: list[dict[str, Any]]) -> tuple[str, str]:
    groups = [g for g in fold_groups if g["before"] > 0][:60]
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.18 * len(groups) + 1)))
    ax.barh(range(len(groups)), [g["before"] for g in groups], color="#ccc", label="before")
    ax.barh(range(len(groups)), [g["after"] for g in groups], label="after fold")
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([g["name"][:40] for g in groups], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("channels / units")
    ax.legend()
    ax.set_title("Surviving channels per group")
    return "Surviving channels per layer", _png(fig)


def _details(title: str, body: str) -> str:
    """A long table folded under its title (opened by a click)."""
    return f"<details><summary><h2 style='display:inline'>{html.escape(title)}</h2></summary>{body}</details>"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f"<tr><td colspan='{len(headers)}'>(none)</td></tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(summary: dict[str, Any], history: list[Any], gate_report: dict[str, Any],
                  fold_report: dict[str, Any] | None, law: dict[str, float] | None,
                  timeline: dict[str, Any] | None = None, flux: tuple[Any, dict[str, Any]] | None = None) -> str:
    """The whole report as one HTML string: the headline, the figures by the question they answer
    (:data:`SECTIONS`), then the tables, the long ones folded."""
    figs = figures(history, summary, (fold_report or {}).get("groups", []), law, timeline, flux)
    fig_html = "".join(
        f"<h2>{html.escape(section)}</h2>" + "".join(
            f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'/>"
            f"<figcaption>{html.escape(t)}</figcaption></figure>" for sec, t, b in figs if sec == section)
        for section in SECTIONS if any(sec == section for sec, _, _ in figs))
    summary_rows = [[k, fmt(v)] for k, v in summary.items()]
    gated_rows = [[g["name"], "x".join(map(str, g["shape"])), g["numel"], g["level"]] for g in gate_report["gated"]]
    group_rows = [[g["name"], g["size"], "yes" if g["gated"] else "no", "; ".join(g["blocked"])[:200]]
                  for g in gate_report.get("channel_groups", [])]
    skipped_rows = [[s["name"], s["kind"], s["reason"][:200]] for s in gate_report["skipped"]]
    fold_rows = [[g["name"], g["before"], g["after"], g["closed"], g["deleted"], g["reason"][:200]]
                 for g in (fold_report or {}).get("groups", [])]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
             "figure{display:inline-block;margin:0.5em;vertical-align:top}figcaption{font-size:12px;color:#555}"
             "img{max-width:520px;border:1px solid #eee}.headline{font-size:1.3em;font-weight:bold}"
             ".warning{color:#a00;font-weight:bold}")
    warning = slower_note(summary)
    sections = [
        f"<h1>hyperflux-compile: {html.escape(str(summary.get('source', '')))}</h1>",
        f"<p class='headline'>{html.escape(headline(summary))}.</p>",
        f"<p class='warning'>{html.escape(warning)}</p>" if warning else "",
        "<h2>What you asked, what you got</h2>",
        _table(["", "asked", "got"], [list(row) for row in asked_and_got(summary)]),
        f"<p>{html.escape(str(summary.get('law_note', '')))}</p>" if summary.get("law_note") else "",
        (f"<p class='warning'>MAC counts may be incomplete: {html.escape(str(summary['macs_note']))}</p>"
         if summary.get("macs_note") else ""),
        fig_html or "<p>(no figures)</p>",
    ]
    if gated_rows:  # weight/hybrid granularity
        sections += ["<h2>Gated tensors</h2>", _table(["tensor", "shape", "elements", "level"], gated_rows)]
    if group_rows:
        sections += ["<h2>Channel groups</h2>", _table(["group", "size", "gated", "why not"], group_rows)]
    if fold_report is not None:
        sections += ["<h2>Folding</h2>",
                     _table(["group", "before", "after", "closed", "deleted", "note"], fold_rows)]
    sections += [_details(f"Skipped parameters and ops ({len(skipped_rows)})",
                          _table(["name", "kind", "reason"], skipped_rows)),
                 _details(f"All summary fields ({len(summary_rows)})", _table(["field", "value"], summary_rows))]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hyperflux report</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
