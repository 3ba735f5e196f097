"""Our language-model default at 2x and 4x fewer parameters, as a Hugging Face folder: issue 25's evidence.

The small pre-trained Llama of tools/bench_lm_recipe.py (GQA 8/2 heads, RMSNorm, SwiGLU; 2.90M parameters;
cached outside the repository) is pruned by ``hyperflux-compile hf:FOLDER --uniform-layers --target params
--target-sparsity s`` (s = 0.5 and 0.75) with the CLI's defaults otherwise (the LM recipe: 0.25 pruning + 2.75
recovery epochs over the offline text set, distillation from the dense model), and once more with
``--distill off``. Printed: validation loss per token and perplexity of the compact model, mean ± std over
the seeds, and whether each run wrote compact_hf/ (uniform layers: always). Torch-Pruning's side of the
comparison, fine-tuned for the same 3 epochs, is tools/bench_lm_tp.py (``--ours`` reads this tool's ``--json``).

Usage: python tools/bench_lm_prune.py [--seeds 0,1,2] [--sparsities 0.5,0.75] [--json FILE] [--from-json FILE]
                                      [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm_recipe import PRETRAIN_EPOCHS, report, run  # noqa: E402

SETTINGS = {"distillation (default)": (), "--distill off": ("--distill", "off")}


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['machine']}; pre-trained {meta['pretrain_epochs']} epochs (dense validation loss "
             f"{rows[0]['val_loss_dense']:.3f}, perplexity {rows[0]['perplexity_dense']:.2f}); "
             f"{rows[0].get('epochs', meta['epochs'])} + {rows[0].get('regrowth_epochs', meta['regrowth_epochs'])} "
             f"epochs per run; seeds {meta['seeds']}", "",
             "| params kept | setting | compact val loss (mean ± std) | perplexity | params | compact_hf/ written |",
             "|---|---|---|---|---|---|"]
    for s in sorted({r["sparsity"] for r in rows}):
        for name, flags in SETTINGS.items():
            rs = [r for r in rows if r["sparsity"] == s and r["flags"] == ["--uniform-layers", *flags]]
            if not rs:
                continue
            loss = [r["val_loss_compact"] for r in rs]
            sd = statistics.stdev(loss) if len(loss) > 1 else 0.0
            lines.append(f"| {1 - s:.2f} | {name} | {statistics.mean(loss):.3f} ± {sd:.3f} | "
                         f"{math.exp(statistics.mean(loss)):.2f} | "
                         f"{statistics.mean(r['params_compact'] for r in rs) / 1e6:.2f}M | "
                         f"{sum(r['compact_hf'] for r in rs)} of {len(rs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sparsities", default="0.5,0.75")
    p.add_argument("--epochs", type=float, default=None, help="default: the LM recipe's (0.25)")
    p.add_argument("--regrowth-epochs", type=float, default=None, help="default: the LM recipe's (2.75)")
    p.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    p.add_argument("--parallel", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None)
    p.add_argument("--write", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    def rows_of(folder: Path, seeds: list[int]) -> list[dict]:
        jobs = [(float(s), flags, seed) for s in args.sparsities.split(",") for flags in SETTINGS.values()
                for seed in seeds]
        with ThreadPoolExecutor(args.parallel) as pool:  # each run is its own process
            return list(pool.map(lambda j: run(folder, "lm", j[2], args, j[0], ("--uniform-layers", *j[1])), jobs))

    return report(args, rows_of, render, "lm-prune")


if __name__ == "__main__":
    raise SystemExit(main())
