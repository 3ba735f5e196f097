"""``hyperflux-compile report RUN_DIR``: render report.html again from what a run left on disk, without
training: a finished run (``OUT``) or an interrupted one (``OUT.partial``), from its metrics.jsonl,
timeline.npz, summary.json and the gating/fold reports the run saved (``reports.json``). An interrupted
run is rendered with what exists, and the page says where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hyperflux_fx.report.html import render_report
from hyperflux_fx.report.outdir import atomic_write_text
from hyperflux_fx.train.recorder import METRICS_FILE, IntervalRecord
from hyperflux_fx.train.timeline import timeline_and_flux

__all__ = ["REPORTS_FILE", "RunFiles", "find_run", "rerender", "save_reports"]

REPORTS_FILE = "reports.json"  # the gating report (written before training) and the fold report (after it)


def save_reports(run_dir: Path, **reports: dict[str, Any]) -> None:
    """Add ``reports`` (e.g. ``gates=...``, ``fold=...``) to the run's reports.json."""
    path = run_dir / REPORTS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_text(path, json.dumps({**saved, **reports}, default=str))


class RunFiles:
    """What a run directory holds, read leniently (an interrupted run lacks the later files)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.finished = not run_dir.name.endswith(".partial")
        self.summary: dict[str, Any] = self._json("summary.json") or {}
        reports = self._json(REPORTS_FILE) or {}
        self.gates: dict[str, Any] = reports.get("gates") or {"gated": [], "skipped": [], "channel_groups": []}
        self.fold: dict[str, Any] | None = reports.get("fold")
        metrics = run_dir / METRICS_FILE
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        self.history = [IntervalRecord.from_dict(json.loads(line)) for line in lines if line.strip()]
        self.timeline, self.flux = timeline_and_flux(run_dir)

    def _json(self, name: str) -> dict[str, Any] | None:
        path = self.dir / name
        return json.loads(path.read_text()) if path.exists() else None

    def where_it_stopped(self) -> str | None:
        """None for a finished run; else a sentence on what exists."""
        if self.finished and self.summary:
            return None
        if not self.history:
            return "The run stopped before its first scheduler interval: no record to show."
        last = self.history[-1]
        return (f"Interrupted run: it stopped after interval {last.interval} (epoch {last.epoch}, "
                f"{last.phase} phase), before the fold and export; continue it with --resume. The figures show the "
                "intervals recorded so far.")


def find_run(path: str | Path) -> Path:
    """``path`` if it holds a run, else ``path.partial`` (an interrupted run), else FileNotFoundError."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".partial")):
        if (candidate / METRICS_FILE).exists() or (candidate / "summary.json").exists():
            return candidate
    raise FileNotFoundError(f"{path}: no run there (no metrics.jsonl or summary.json in it or in "
                            f"{path.name}.partial)")


def rerender(path: str | Path) -> tuple[Path, str | None]:
    """Write report.html of the run at ``path`` again; (the page's path, where the run stopped or None)."""
    files = RunFiles(find_run(path))
    stopped = files.where_it_stopped()
    summary = dict(files.summary)
    if stopped:
        summary["law_note"] = stopped  # shown under the asked/got table
    page = render_report(summary, files.history, files.gates, files.fold, summary.get("law"), files.timeline,
                         files.flux)
    out = files.dir / "report.html"
    atomic_write_text(out, page)
    return out, stopped
