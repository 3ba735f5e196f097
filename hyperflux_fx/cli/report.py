"""Stage 6, the report: summary.json, report.html and the closing table; and `hyperflux-compile report
RUN_DIR`, which renders report.html again from what a run left."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hyperflux_fx.cli.args import Parser
from hyperflux_fx.cli.job import Job, fail, say
from hyperflux_fx.passes import PassResult
from hyperflux_fx.report.html import render_report
from hyperflux_fx.report.outdir import OutputLocked, RunLock, atomic_write_text
from hyperflux_fx.report.rerender import rerender
from hyperflux_fx.report.summary import asked_and_got, headline, slower_note
from hyperflux_fx.train.loop import TrainResult
from hyperflux_fx.train.timeline import timeline_and_flux


def report_command(argv: list[str]) -> int:
    """``hyperflux-compile report RUN_DIR``: report.html again from what the run left (report/rerender.py)."""
    p = Parser(prog="hyperflux-compile report", description="Render report.html again from a finished run "
                "(--out) or an interrupted one (--out.partial), without training.")
    p.add_argument("run_dir", help="the run's --out (its .partial is used when the run was interrupted)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    out = Path(args.run_dir.removesuffix(".partial"))
    try:
        with RunLock(out):
            page, stopped = rerender(args.run_dir)
    except OutputLocked as exc:
        return fail(str(exc))
    except (FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    print(f"{page}" + (f"  ({stopped})" if stopped else ""))
    return 0


def report_stage(job: Job, summary: dict[str, Any], result: TrainResult, gated: PassResult,
                  folded: PassResult) -> None:
    """[5/5] summary.json and report.html; OUT.partial becomes OUT."""
    say(job.args, "[5/5] report")
    law = result.law.to_dict() if result.law is not None else None
    summary["law"], summary["law_note"] = law, result.law_note
    atomic_write_text(job.partial / "summary.json", json.dumps(summary, indent=2, default=float))
    lines, flux = timeline_and_flux(job.partial)
    page = render_report(summary, result.history, gated.report.to_dict(), folded.report.to_dict(), law, lines, flux)
    atomic_write_text(job.partial / "report.html", page)
    if job.out.exists():
        shutil.rmtree(job.out)
    os.replace(job.partial, job.out)
    if not job.args.quiet:
        _print_summary(summary, job.out)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    rows = asked_and_got(summary)
    width = max(len(what) for what, _, _ in rows)
    print(f"\n  {headline(summary)}.")
    if (warning := slower_note(summary)) is not None:
        print(f"  WARNING: {warning}")
    print()
    for what, asked, got in rows:
        print(f"  {what:<{width}}  {got}" + (f"   (asked: {asked})" if asked != "-" else ""))
    for note in ("law_note", "macs_note"):
        if summary.get(note):
            print(f"  {summary[note]}")
    hf_folder = f"{summary['hf_folder']}/, " if summary.get("hf_folder") else ""
    print(f"\n  written to {out}/ (compact.onnx, compact.pt, {hf_folder}summary.json, metrics.jsonl, report.html, "
          "run.log)")
