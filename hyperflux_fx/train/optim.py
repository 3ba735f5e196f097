"""What train() and train_dense() share: device and AMP resolution, the weight optimiser (weight
decay on conv/linear weights only), autocast, the fp16 GradScaler, the cosine schedule, progress bars."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from hyperflux_fx.ir import ChannelGate, gates
from hyperflux_fx.ops import call_spec, is_weight_module, slot_value

__all__ = ["FlowAdam", "amp_dtype", "autocast", "clip_gradients", "cosine", "decayed", "flow_optimizer",
           "grad_scaler", "progress_bar", "resolve_device", "warmup_cosine", "weight_optimizer"]


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
    return device


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting ("auto", "bf16", "fp16", "off") on ``device``."""
    if spec not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {spec!r}")
    if spec == "off":
        return None
    if device.type != "cuda":
        if spec == "fp16":
            raise ValueError("amp='fp16' needs CUDA; use amp='bf16' or 'off' on CPU")
        return torch.bfloat16 if spec == "bf16" else None
    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if spec == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """torch.autocast for ``dtype``, or a no-op without AMP."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 AMP (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def decayed(model: nn.Module) -> set[int]:
    """ids of the parameters that get weight decay: conv and linear weights (gated or not), whether a
    module holds them or a graph passes them to a conv/linear function (a torch.export capture)."""
    out: set[int] = set()
    weight_names = {g.target for g in gates(model)} | _functional_weights(model)
    for name, p in model.named_parameters():
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if name in weight_names or (attr == "weight" and is_weight_module(owner)):
            out.add(id(p))
    return out


def _functional_weights(model: nn.Module) -> set[str]:
    """Names of the parameters a graph passes straight to a conv or linear function as its weight."""
    graph = getattr(model, "graph", None)
    names: set[str] = set()
    for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
        spec = call_spec(node)
        if spec is None or spec.kind not in ("conv", "conv_transpose", "linear"):
            continue
        for slot in spec.slots:
            value = slot_value(node, slot)
            if isinstance(value, torch.fx.Node) and value.op == "get_attr":
                names.add(str(value.target))
    return names


def weight_optimizer(model: nn.Module, params: list[nn.Parameter], *, lr: float, momentum: float,
                     weight_decay: float, optimizer: str = "sgd",
                     betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or AdamW (with ``betas``) over ``params`` of ``model``, with weight decay
    on its conv/linear weights only."""
    decay = decayed(model)
    groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if optimizer != "sgd":
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


class FlowAdam(torch.optim.Optimizer):
    """Adam for flow parameters whose ``shared`` groups normalise by one second moment, the running mean
    square of all the group's gradients, in place of one per element (groups without it are plain Adam).

    Per element, Adam divides each flow's mean flux by its own RMS, so every flow whose flux is consistent
    moves by about one LR per step, whatever its size: against the decoupled pressure (``gamma * scale`` LRs
    per step) a unit then survives by the consistency of its flux, not its magnitude, and any group whose
    ``gamma * scale`` exceeds 1 drains whatever its units are worth. Shared, a unit moves by its mean flux
    over the group's RMS: the pressure is again a threshold on the flux's magnitude, as the paper's
    coupled pressure is (a unit rises when its flux outweighs the pressure), with gamma still in proportion."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                 ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "shared": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - the Optimizer signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            if group["shared"]:
                grads = [p.grad.float() for p in params]
                mean_sq = torch.stack([(g * g).sum() for g in grads]).sum() / sum(g.numel() for g in grads)
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), device=p.device) if group["shared"] else torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                if group["shared"]:
                    state["exp_avg_sq"].lerp_(mean_sq, 1 - beta2)
                else:
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                t = state["step"]
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt().add_(group["eps"])
                p.sub_(state["exp_avg"] / denom, alpha=group["lr"] / (1 - beta1 ** t))


def flow_optimizer(model: nn.Module, *, lr: float, normalization: str) -> torch.optim.Optimizer:
    """The flows' optimiser: Adam per element (``"element"``, the paper's), or with the channel gates' flows
    sharing one second moment (``"shared"``, :class:`FlowAdam`; weight gates' flows stay per element)."""
    all_gates = gates(model)
    if normalization == "element":
        return torch.optim.Adam([g.flow for g in all_gates], lr=lr, weight_decay=0.0, fused=True)
    if normalization != "shared":
        raise ValueError(f"flux normalization must be 'element' or 'shared', got {normalization!r}")
    channel = [g.flow for g in all_gates if isinstance(g, ChannelGate)]
    other = [g.flow for g in all_gates if not isinstance(g, ChannelGate)]
    return FlowAdam([{"params": channel, "shared": True}, {"params": other, "shared": False}], lr=lr)


def warmup_cosine(start: float, end: float, i: int, n: int, warmup: int) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then :func:`cosine` to ``end`` over the rest
    of ``n`` steps."""
    if i < warmup:
        return start * (i + 1) / warmup
    return cosine(start, end, i - warmup, n - warmup)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip the gradient norm of ``optimizer``'s parameters to ``max_norm`` (nothing when None); under fp16
    AMP the gradients are unscaled first (``scaler.unscale_(optimizer)``), as the scaler's step expects."""
    if max_norm is None:
        return
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)


def cosine(start: float, end: float, i: int, n: int) -> float:
    """Cosine decay from ``start`` to ``end`` over ``n`` steps, at step ``i``."""
    if n <= 1:
        return start
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(i, n) / n))


def progress_bar(enabled: bool, *, total: int, initial: int = 0, desc: str) -> Any:
    """A tqdm bar, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
