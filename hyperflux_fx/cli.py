"""hyperflux-compile: the command users run.

What works today: ``--plan`` loads the model (``model.py``, ``timm:NAME`` or ``torchvision:NAME``),
traces it, inserts gates and prints the gating report. Training, folding and export arrive with
their issues; until then the command refuses to run without ``--plan`` rather than pretend.

Exit codes: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected e.g. 2,3,32,32)") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected positive integers, e.g. 2,3,32,32)")
    return dims


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperflux-compile",
        description="Learn what to prune with Hyperflux and compile a smaller model. "
                    "Available now: --plan (trace, insert gates, print the gating plan).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="model.py (with build_model()), timm:NAME or torchvision:NAME")
    parser.add_argument("--plan", action="store_true", help="print the gating plan and exit without training")
    parser.add_argument("--granularity", choices=("weight", "channel", "hybrid"), default="weight",
                        help="gate granularity: weights, channel groups, or both")
    parser.add_argument("--input-shape", type=_shape, default=None,
                        help="example input shape incl. batch, e.g. 2,3,32,32 (default: from the source)")
    parser.add_argument("--weights", default=None, help="state-dict file to load (torch.load weights_only=True)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier width for timm/torchvision models")
    parser.add_argument("--leaf", action="append", default=[], metavar="QUALNAME",
                        help="keep this submodule opaque when tracing (repeatable)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="do not gate parameters matching this glob (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    return parser


def _fail(message: str, code: int = 2) -> int:
    first = " ".join(str(message).split("\n")[0].split())
    print(f"hyperflux-compile: error: {first}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if not args.quiet else logging.ERROR, format="%(levelname)s %(message)s")
    import hyperflux_fx as hf

    if not args.plan:
        return _fail("only --plan is available in this version (training, folding and export are not built yet); "
                     "run: hyperflux-compile SOURCE --plan")
    try:
        config = hf.GateConfig(granularity=args.granularity, exclude=tuple(args.exclude))
        t0 = time.perf_counter()
        loaded = hf.load_source(args.source, input_shape=args.input_shape, weights=args.weights,
                                num_classes=args.num_classes)
        t1 = time.perf_counter()
        gm = hf.trace(loaded.model, loaded.example_inputs, leaf_modules=tuple(args.leaf))
        t2 = time.perf_counter()
        result = hf.insert_gates(gm, config, example_inputs=loaded.example_inputs, inplace=True)
        t3 = time.perf_counter()
    except (hf.SourceError, hf.TraceError, hf.ExampleInputError, NotImplementedError, ValueError, TypeError) as exc:
        return _fail(str(exc))
    if args.quiet:
        return 0
    report = result.report
    if args.json:
        out = report.to_dict()
        out["source"] = args.source
        out["seconds"] = {"load": t1 - t0, "trace": t2 - t1, "insert_gates": t3 - t2}
        print(json.dumps(out, indent=2))
        return 0
    total = sum(p.numel() for p in loaded.model.parameters())
    print(f"source: {args.source}  example input: {[tuple(x.shape) for x in loaded.example_inputs]}")
    print(f"parameters: {total:,}  gated elements: {report.gated_elements:,} "
          f"({100.0 * report.gated_elements / max(total, 1):.1f}% of all parameters)")
    print(f"time: load {t1 - t0:.2f}s  trace {t2 - t1:.2f}s  insert_gates {t3 - t2:.2f}s")
    print()
    print(report)
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m hyperflux_fx.cli`
    sys.exit(main())
