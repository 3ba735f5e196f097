"""Stage 2, the dense model: train it (unless --weights) and measure it; it is the teacher later."""

from __future__ import annotations

import torch

from hyperflux_fx.cli.args import recipe_fields
from hyperflux_fx.cli.job import Job, say
from hyperflux_fx.train.dense import train_dense
from hyperflux_fx.train.evaluate import evaluate


def dense_stage(job: Job) -> float:
    """[1/5] the dense model: --weights, the interrupted run's, trained here, or random init."""
    args, model = job.args, job.loaded.model
    dense_file = job.partial / "dense.pt"
    if args.weights:
        note = f"loaded from {args.weights}"
    elif args.resume and dense_file.exists():
        model.load_state_dict(torch.load(dense_file, map_location="cpu", weights_only=True))
        note = "loaded from the interrupted run"
    elif args.dense_epochs > 0:
        say(args, f"[1/5] dense training: {args.dense_epochs} epochs")
        train_dense(model, job.train_loader, epochs=args.dense_epochs, lr=args.lr, seed=args.seed, device=job.device,
                    loss_fn=job.loaded.loss_fn, progress=not args.quiet, **recipe_fields(args, dense=True))
        model.cpu()
        torch.save(model.state_dict(), dense_file)
        note = f"trained {args.dense_epochs} epochs"
    elif job.loaded.pretrained:
        note = f"the trained weights of {args.source}"
    else:
        note = "random init (--dense-epochs 0)"
    acc = evaluate(model.to(job.device), job.val_loader)
    model.cpu()
    say(args, f"      dense model ({note}): val accuracy {acc:.4f}")
    return acc
