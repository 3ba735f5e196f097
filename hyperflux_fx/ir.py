"""The vocabulary of a gated graph: gate modules, masks, the pressure state, and every attribute
name and meta key a gated GraphModule carries. The bottom layer: it imports nothing of hyperflux.

A gate holds the flow parameters ``t`` of HYPERFLUX.md §1. Forward computes ``W * 1[t >= 0]``; the
backward pass gives the weight the masked gradient and the flow parameters the straight-through
estimate ``dL/dt = kappa * dL/dm`` (§2), where ``dL/dm = W * dL/d(W*m)``. A pruned weight therefore
still gets a mask gradient (a first-order estimate of what its return would do), which is what makes
regrowth possible.

Gates are torch.fx leaves (see :func:`is_gate_module`), so graph passes find them as ``call_module``
nodes by type. Every gate also carries a gradient hook on its flow parameters that adds the pressure
gradient ``gamma * scale / N`` read from the shared :class:`PressureState` (§3): a plain training
loop gets the Hyperflux dynamics without touching its loss. :func:`pressure_loss` is the explicit
form of the same term, for loops that prefer it — use one or the other (keep the state's gamma at 0
with the explicit loss).
"""


from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CALLS_ATTR",
    "FOLD_REPORT_META",
    "FRONTEND_META",
    "GATES_ATTR",
    "GATE_NODE_META",
    "GATE_REPORT_META",
    "INPUTS_META",
    "MASKS_ATTR",
    "MASK_NODE_META",
    "MODULE_NODE_META",
    "OPAQUE_META",
    "PRESSURE_ATTR",
    "STATE_ATTRS",
    "TRAINING_ONLY_META",
    "ChannelGate",
    "ChannelMask",
    "EvalIdentity",
    "Gate",
    "GatedModuleCall",
    "MaskedMean",
    "MaskedNorm",
    "PressureState",
    "WeightGate",
    "apply_decoupled_pressure",
    "density",
    "flux",
    "gates",
    "get_pressure",
    "is_gate_module",
    "layer_density",
    "lift_regrown",
    "named_gates",
    "pressure_loss",
    "pressure_state",
    "reset_flux",
    "set_pressure",
    "track_flux",
]


# -- names: every attribute and meta key of a gated model has its one home here ---------------------
# Attributes insert_gates adds to a gated GraphModule.
GATES_ATTR = "hyperflux_gates"  # ModuleDict of the gate modules
MASKS_ATTR = "hyperflux_masks"  # ModuleDict of ChannelMask / MaskedNorm modules (channel/hybrid granularity)
CALLS_ATTR = "hyperflux_calls"  # ModuleDict of module-level gated calls
PRESSURE_ATTR = "hyperflux_pressure"  # the shared PressureState
STATE_ATTRS = (GATES_ATTR, MASKS_ATTR, CALLS_ATTR, PRESSURE_ATTR)  # all of them (fold removes them; counts skip them)

# GraphModule.meta keys.
OPAQUE_META = "hyperflux.opaque"  # list of OpaqueModule: submodules the trace fallback made leaves
FRONTEND_META = "hyperflux.frontend"  # Frontend: which front end captured the graph, and why
TRAINING_ONLY_META = "hyperflux.training_only"  # list of TrainingOnlyCode: train-mode code the eval graph lacks
INPUTS_META = "hyperflux.example_inputs"  # example inputs kept for later passes' shape propagation
GATE_REPORT_META = "hyperflux.gate_report"  # the GateReport of insert_gates
FOLD_REPORT_META = "hyperflux.fold_report"  # the FoldReport of fold_masks

# Node.meta keys.
GATE_NODE_META = "hyperflux.gate"  # on gate nodes: the gated parameter's or group's name
MODULE_NODE_META = "hyperflux.module"  # on rewritten ops: the module path they came from
MASK_NODE_META = "hyperflux.mask"  # on ChannelMask nodes: the consumer they feed; on MaskedNorm: the norm replaced
VALUE_META = "hyperflux.value"  # on non-tensor nodes: the Python scalar / tuple computed on the example inputs


class _HardMaskSTE(torch.autograd.Function):
    """``W * 1[t >= 0]`` with the scaled straight-through gradient for ``t``.

    Backward: ``dW = g * m``, ``dm = g * W``, ``dt = kappa * dm``; when a flux buffer is given it
    accumulates ``-dm`` (the flux ``phi = -dL/dm`` of HYPERFLUX.md §3) and the step counter is bumped.
    """

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, flow: torch.Tensor, kappa: float,
                flux_sum: torch.Tensor | None, flux_steps: torch.Tensor | None) -> torch.Tensor:
        keep = flow >= 0
        # the bool mask (1 byte per element) is saved so backward need not re-read the flows
        ctx.save_for_backward(weight, keep)
        ctx.kappa = kappa
        ctx.flux_sum = flux_sum
        ctx.flux_steps = flux_steps
        ctx.flow_dtype = flow.dtype
        return torch.where(keep, weight, 0.0)  # one pass, no float mask materialised

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, keep = ctx.saved_tensors
        grad_weight = torch.where(keep, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_flow = None
        if ctx.needs_input_grad[1] or ctx.flux_sum is not None:
            # kappa * dL/dm with dL/dm = grad * W, in one pass (addcmul onto a broadcast zero)
            zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
            scaled = torch.addcmul(zero, grad, weight, value=ctx.kappa)
            if ctx.flux_sum is not None:
                ctx.flux_sum.sub_(scaled, alpha=1.0 / ctx.kappa)  # flux phi = -dL/dm
                ctx.flux_steps.add_(1)
            if ctx.needs_input_grad[1]:
                grad_flow = scaled if scaled.dtype == ctx.flow_dtype else scaled.to(ctx.flow_dtype)
        return grad_weight, grad_flow, None, None, None


class Gate(nn.Module):
    """Base class of every gate: flow parameters, mask, pressure hook and flux read-out.

    Attributes:
        flow: the flow parameters ``t`` (an ``nn.Parameter``); the mask is ``1[t >= 0]``.
        target: qualified name of what the gate masks (a parameter name for weight gates).
        kappa: straight-through scale.
        pressure_scale: per-gate multiplier of the pressure gradient (1 for plain Hyperflux;
            cost-weighted pressure sets it per group).
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], *, target: str, init_a: float = 0.2,
                 kappa: float = 0.25, generator: torch.Generator | None = None) -> None:
        super().__init__()
        flow = torch.empty(tuple(shape), dtype=torch.float32)
        flow.uniform_(init_a, 2.5 * init_a, generator=generator)
        self.flow = nn.Parameter(flow)
        self.target = target
        self.kappa = float(kappa)
        self.pressure_scale = 1.0
        self.unit_cost = 1.0  # what one unit costs, for cost-weighted density (channel gates set it)
        self.register_buffer("flux_sum", None, persistent=False)
        self.register_buffer("flux_steps", None, persistent=False)
        self._pressure: PressureState | None = None
        self._pressure_handle: Any = None
        self._register_pressure_hook()

    # -- pressure -------------------------------------------------------------------------------
    def attach_pressure(self, state: PressureState | None) -> None:
        """Read gamma (and N) from ``state`` in this gate's gradient hook; ``None`` detaches."""
        # A plain attribute, not a submodule: the state is registered once, on the gated model.
        object.__setattr__(self, "_pressure", state)

    def _add_pressure(self, grad: torch.Tensor) -> torch.Tensor:
        state = self._pressure
        if state is None or state.decoupled:  # decoupled: the trainer moves the flows itself
            return grad
        coef = self.pressure_scale / state.total_elements
        return grad + (state.gamma * state.grad_scale * coef).to(grad.dtype)

    def _register_pressure_hook(self) -> None:
        # Hooks on a Parameter are lost by deepcopy and pickling (Parameter.__deepcopy__ builds a
        # fresh tensor), so the hook is (re-)registered here, from __init__ and from __setstate__.
        object.__setattr__(self, "_pressure_handle", self.flow.register_hook(self._add_pressure))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_pressure_handle"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register_pressure_hook()

    # -- mask and flux --------------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        """The current 0/1 mask (detached, float32, shape of ``flow``)."""
        return (self.flow.detach() >= 0).to(torch.float32)

    @property
    def numel(self) -> int:
        """Number of gated units (elements of ``flow``)."""
        return self.flow.numel()

    def kept(self) -> int:
        """Number of open units."""
        return int((self.flow.detach() >= 0).sum().item())

    def track_flux(self, enabled: bool = True) -> None:
        """Start (and zero) or stop accumulating the flux ``-dL/dm`` in backward."""
        if enabled:
            self.flux_sum = torch.zeros_like(self.flow, dtype=torch.float32)
            self.flux_steps = torch.zeros((), dtype=torch.long, device=self.flow.device)
        else:
            self.flux_sum = None
            self.flux_steps = None

    def reset_flux(self) -> None:
        """Zero the accumulated flux (keeps tracking on)."""
        if self.flux_sum is not None:
            self.flux_sum.zero_()
            self.flux_steps.zero_()

    def mean_flux(self) -> torch.Tensor | None:
        """Mean flux per unit over the backward passes since the last reset; None if not tracking."""
        if self.flux_sum is None:
            return None
        return self.flux_sum / self.flux_steps.clamp(min=1)  # stays on the device: no host sync

    def extra_repr(self) -> str:
        return f"target={self.target!r}, shape={tuple(self.flow.shape)}, kappa={self.kappa}"


class WeightGate(Gate):
    """Unstructured gate: one flow parameter per weight element; ``forward(W) = W * 1[t >= 0]``.

    Graph use (one gate per gated parameter, shared by all of its weight uses)::

        conv1_weight = self.conv1.weight
        gated = self.hyperflux_gates.conv1_weight(conv1_weight)
        conv2d = torch.conv2d(x, gated, self.conv1.bias, (1, 1), (1, 1), (1, 1), 1)
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape != self.flow.shape:
            raise RuntimeError(f"gate for {self.target!r} expects shape {tuple(self.flow.shape)}, "
                               f"got {tuple(weight.shape)}")
        return _HardMaskSTE.apply(weight, self.flow, self.kappa, self.flux_sum, self.flux_steps)


def is_gate_module(module: nn.Module) -> bool:
    """True for hyperflux's own graph modules (gates, masks, module-level calls): tracer leaves."""
    return isinstance(module, (Gate, GatedModuleCall, ChannelMask, MaskedNorm))


def named_gates(module: nn.Module) -> Iterator[tuple[str, Gate]]:
    """``(qualified module name, gate)`` for every gate in ``module``."""
    for name, sub in module.named_modules():
        if isinstance(sub, Gate):
            yield name, sub


def gates(module: nn.Module) -> list[Gate]:
    """Every gate module of a gated model, in registration order."""
    return [g for _, g in named_gates(module)]


def density(module: nn.Module, *, weighted: bool = False) -> float:
    """Kept fraction of all gated units (weights, or channels for structured gates).

    Args:
        weighted: weigh each unit by its gate's ``unit_cost`` (parameters or MACs per channel with
            ``GateConfig(cost=...)``; 1 for weight gates), i.e. the kept fraction of the cost.
    """
    all_gates = gates(module)
    if not all_gates:
        raise ValueError("the model has no gates: run hyperflux_fx.insert_gates first")
    cost = [g.unit_cost if weighted else 1.0 for g in all_gates]
    kept = torch.stack([(g.flow.detach() >= 0).sum() * c for g, c in zip(all_gates, cost, strict=True)]).sum()
    total = sum(g.numel * c for g, c in zip(all_gates, cost, strict=True))
    return float(kept.item()) / total


def layer_density(module: nn.Module) -> dict[str, float]:
    """Kept fraction per gate, keyed by the gate's target (e.g. ``"layer1.0.conv1.weight"``)."""
    return {g.target: g.kept() / g.numel for g in gates(module)}


def track_flux(module: nn.Module, enabled: bool = True) -> None:
    """Start (and zero) or stop flux accumulation on every gate."""
    for g in gates(module):
        g.track_flux(enabled)


def reset_flux(module: nn.Module) -> None:
    """Zero every gate's accumulated flux."""
    for g in gates(module):
        g.reset_flux()


def flux(module: nn.Module) -> dict[str, torch.Tensor]:
    """Mean flux ``-dL/dm`` per unit since the last reset, keyed by gate target.

    Raises:
        RuntimeError: when flux tracking is off (call :func:`track_flux` before training).
    """
    out: dict[str, torch.Tensor] = {}
    for g in gates(module):
        value = g.mean_flux()
        if value is None:
            raise RuntimeError(f"flux tracking is off for gate {g.target!r}: call hyperflux_fx.track_flux(model)")
        out[g.target] = value
    return out


class GatedModuleCall(nn.Module):
    """Module-level gating: calls a leaf module with some parameters replaced by gated tensors.

    Used for leaves ``insert_gates`` cannot open up (``nn.MultiheadAttention``, opaque modules from
    the trace fallback, conv subclasses with their own forward). The module itself stays where it was
    (its parameter names unchanged); the graph passes it in with a ``get_attr``::

        attn = self.attn
        gated = self.hyperflux_gates.attn_in_proj_weight(self.attn.in_proj_weight)
        out = self.hyperflux_calls.attn(attn, (gated,), x, x, x)
    """

    def __init__(self, names: tuple[str, ...], module_path: str) -> None:
        super().__init__()
        self.names = tuple(names)  # parameter names relative to the called module
        self.module_path = module_path  # qualified name of the called module

    def forward(self, module: nn.Module, weights: tuple[torch.Tensor, ...], *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(module, dict(zip(self.names, weights, strict=True)), args, kwargs)

    def extra_repr(self) -> str:
        return f"module={self.module_path!r}, gated={list(self.names)}"


class _StructuredSTE(torch.autograd.Function):
    """``m = 1[t >= 0]`` returned as a tensor, with ``dL/dt = kappa * dL/dm`` (flux = -dL/dm)."""

    @staticmethod
    def forward(ctx: Any, flow: torch.Tensor, kappa: float, flux_sum: torch.Tensor | None,
                flux_steps: torch.Tensor | None) -> torch.Tensor:
        ctx.kappa = kappa
        ctx.flux_sum = flux_sum
        ctx.flux_steps = flux_steps
        return (flow >= 0).to(flow.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.flux_sum is not None:
            ctx.flux_sum.sub_(grad)
            ctx.flux_steps.add_(1)
        return grad * ctx.kappa, None, None, None


class ChannelGate(Gate):
    """Structured gate: one flow parameter per unit of a channel group (channel, hidden unit).

    ``forward()`` takes no input and returns the 0/1 mask vector (straight-through gradient);
    :class:`ChannelMask` nodes apply it where the group's channels are consumed. ``target`` names the
    group; ``producers`` lists the graph nodes whose outputs form it; ``unit`` says whether its units
    are channels or attention heads; ``unit_cost`` is what one unit costs (parameters or MACs) for
    cost-weighted pressure and density.
    """

    def __init__(self, size: int, *, target: str, producers: tuple[str, ...], unit: str = "channel",
                 unit_cost: float = 1.0, init_a: float = 0.2, kappa: float = 0.25,
                 generator: torch.Generator | None = None) -> None:
        super().__init__((size,), target=target, init_a=init_a, kappa=kappa, generator=generator)
        self.producers = tuple(producers)
        self.unit = unit  # "channel" (channels, hidden units) or "head" (attention heads)
        self.unit_cost = float(unit_cost)

    def forward(self) -> torch.Tensor:
        return _StructuredSTE.apply(self.flow, self.kappa, self.flux_sum, self.flux_steps)


def _writable_layout(x: torch.Tensor) -> bool:
    """Can a new tensor take ``x``'s strides? Not when a dim of more than one element has stride 0 (an
    ``expand``): its elements would share memory."""
    return all(st != 0 or n == 1 for n, st in zip(x.shape, x.stride(), strict=True))


class ChannelMask(nn.Module):
    """Multiplies a tensor by channel masks along ``dim`` where a group is consumed.

    ``layout`` lists the runs of channels on that dim: ``(mask index or -1, length, expand[, replicas])``;
    mask index ``i`` takes the i-th mask argument (a channel gate's output), -1 means "always kept",
    ``expand`` repeats each unit (a flattened channel owns H*W consecutive features) and ``replicas``
    repeats the whole run (a space split over conv groups: each unit has a channel in every group).
    ``order`` (channels a shuffle permuted): position p of ``dim`` holds position ``order[p]`` of the
    runs laid one after another.
    """

    order: torch.Tensor | None

    def __init__(self, dim: int, layout: tuple[tuple[int, ...], ...], order: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.dim = int(dim)
        self.layout = tuple(tuple(int(v) for v in run) for run in layout)
        self.register_buffer("order", None if order is None else torch.tensor(order, dtype=torch.long),
                             persistent=False)

    def full_mask(self, *masks: torch.Tensor) -> torch.Tensor:
        """The mask over every feature of ``dim``."""
        ref = masks[0]
        parts = []
        for index, length, expand, *replicas in self.layout:
            m = masks[index] if index >= 0 else torch.ones(length, dtype=ref.dtype, device=ref.device)
            m = m.repeat_interleave(expand) if expand > 1 else m
            parts.append(m.repeat(replicas[0]) if replicas and replicas[0] > 1 else m)
        full = torch.cat(parts) if len(parts) > 1 else parts[0]
        return full if self.order is None else full[self.order]

    def forward(self, x: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        full = self.full_mask(*masks).to(x.dtype)
        shape = [1] * x.dim()
        shape[self.dim] = full.numel()
        y = x * full.view(shape)
        if y.stride() != x.stride() and _writable_layout(x):  # x is a strided view (a slice): the product is laid
            #   out as x was, since a consumer's CPU kernel may depend on the layout (linear does), and open
            #   gates change nothing
            y = torch.empty_strided(x.size(), x.stride(), dtype=y.dtype, device=y.device).copy_(y)
        return y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layout={list(self.layout)}"


class MaskedNorm(nn.Module):
    """A LayerNorm / RMSNorm over the last dim whose statistics count the *open* channels only.

    Called as ``norm(x, weight, bias, mask)`` (``mask``: the channel gate's 0/1 output for the
    channels of the last dim). With every channel open it is the plain norm (the same call, so open
    gates change nothing, bit for bit). Otherwise the open channels get exactly what the folded,
    narrower norm computes on them, and a closed channel gets the value it would have if it were
    reopened with the open channels' statistics: finite, so the masks after it can zero it, and an
    honest input for its gate's flux. The mask is used as a choice of channels, not multiplied in:
    no gradient reaches the gate through the statistics (docs/gating.md, "Mask-aware norms").
    """

    def __init__(self, kind: str, width: int, eps: float | None, groups: int = 1) -> None:
        super().__init__()
        if kind not in ("layer", "rms", "group"):
            raise ValueError(f"MaskedNorm kind must be 'layer', 'rms' or 'group', got {kind!r}")
        self.kind = kind
        self.width = int(width)
        self.eps = eps
        self.groups = int(groups)  # group: GroupNorm's num_groups (channels on dim 1)

    @property
    def dim(self) -> int:
        """The channel dim: the last for LayerNorm / RMSNorm, 1 for GroupNorm."""
        return 1 if self.kind == "group" else -1

    def plain(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """The unmasked norm over the channels ``x`` has."""
        eps = 1e-5 if self.eps is None and self.kind != "rms" else self.eps
        if self.kind == "group":
            return F.group_norm(x, self.groups, weight, bias, eps)
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                mask: torch.Tensor) -> torch.Tensor:
        keep = mask.detach() != 0
        if bool(keep.all()):
            return self.plain(x, weight, bias)
        if keep.numel() != x.shape[self.dim]:  # GroupNorm: one unit per position, in every group
            keep = keep.repeat(x.shape[self.dim] // keep.numel())
        idx = torch.nonzero(keep).flatten()
        if idx.numel() == 0:
            return torch.zeros_like(x)  # nothing open: every reader of these channels masks them
        x_open = x.index_select(self.dim, idx)
        y_open = self.plain(x_open, _pick(weight, idx), _pick(bias, idx))
        return self._reopened(x, x_open, weight, bias).index_copy(self.dim, idx, y_open)

    def _reopened(self, x: torch.Tensor, x_open: torch.Tensor, weight: torch.Tensor | None,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """Every channel normalised with the open channels' statistics (per group for GroupNorm)."""
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if self.kind == "group":
            n, g = x.shape[0], self.groups
            var, mean = torch.var_mean(x_open.reshape(n, g, -1), dim=-1, unbiased=False)
            stats_shape = (n, g) + (1,) * (x.dim() - 1)
            y = ((x.reshape(n, g, -1, *x.shape[2:]) - mean.view(stats_shape))
                 * torch.rsqrt(var.view(stats_shape) + eps)).reshape(x.shape)
        elif self.kind == "layer":
            var, mean = torch.var_mean(x_open, dim=-1, unbiased=False, keepdim=True)
            y = (x - mean) * torch.rsqrt(var + eps)
        else:
            y = x * torch.rsqrt(x_open.pow(2).mean(dim=-1, keepdim=True) + eps)
        affine_shape = (-1,) + (1,) * (x.dim() - 2) if self.kind == "group" else (-1,)
        if weight is not None:
            y = y * weight.view(affine_shape)
        return y + bias.view(affine_shape) if bias is not None else y

    def extra_repr(self) -> str:
        return f"kind={self.kind}, width={self.width}, eps={self.eps}" + (
            f", groups={self.groups}" if self.kind == "group" else "")


class MaskedMean(nn.Module):
    """A mean over one dim that carries a gated group's channels, over the *open* channels only
    (ConvNeXt-V2's global response norm divides by the mean over the channels).

    Called as ``mean(x, mask)``. With every channel open it is ``x.mean(dim, keepdim)`` (the same call,
    so open gates change nothing, bit for bit); otherwise the mean of the open channels, which is what
    the folded model's mean over the kept channels computes. As in :class:`MaskedNorm` the mask
    selects, it is not multiplied in.
    """

    def __init__(self, dim: int, keepdim: bool) -> None:
        super().__init__()
        self.dim = int(dim)
        self.keepdim = bool(keepdim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.detach() != 0
        if bool(keep.all()):
            return x.mean(self.dim, keepdim=self.keepdim)
        idx = torch.nonzero(keep).flatten()
        if idx.numel() == 0:  # nothing open: the readers of the channels mask them
            return torch.zeros_like(x.narrow(self.dim, 0, 1)).sum(self.dim, keepdim=self.keepdim)
        return x.index_select(self.dim, idx).mean(self.dim, keepdim=self.keepdim)


def _pick(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.index_select(0, idx)


class EvalIdentity(nn.Module):
    """A parameterless submodule that is the identity at eval and does something else in training
    (drop path, stochastic depth): the trace keeps it as this leaf, so the graph is the eval function
    and training still calls ``inner`` (docs/gating.md, "Training-mode code")."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return self.inner(x, *args, **kwargs) if self.training else x

    def extra_repr(self) -> str:
        return f"{type(self.inner).__module__}.{type(self.inner).__qualname__} in training"


class PressureState(nn.Module):
    """Shared pressure state of one gated model: ``gamma`` (a buffer, so it follows ``.to()`` and is
    saved in checkpoints) and ``total_elements`` N, the number of gated units the mean runs over."""

    def __init__(self, total_elements: int) -> None:
        super().__init__()
        if total_elements <= 0:
            raise ValueError(f"total_elements must be > 0, got {total_elements}")
        self.register_buffer("gamma", torch.zeros((), dtype=torch.float32))
        # Loss scale of fp16 AMP: the hooks see scaled gradients, so the pressure is scaled alike.
        self.register_buffer("grad_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.total_elements = int(total_elements)
        # Decoupled pressure (apply_decoupled_pressure): the hooks add nothing, and the trainer moves
        # every flow down by flow_lr * gamma * pressure_scale after the optimiser's step.
        self.decoupled = False

    def extra_repr(self) -> str:
        return f"gamma={float(self.gamma):.6g}, total_elements={self.total_elements}"


def pressure_state(module: nn.Module) -> PressureState:
    """The pressure state of a gated model.

    Raises:
        ValueError: when ``module`` was not produced by ``insert_gates``.
    """
    state = getattr(module, PRESSURE_ATTR, None)
    if not isinstance(state, PressureState):
        # ValueError, not TypeError: any module is the right type, an ungated one the wrong value
        raise ValueError("the model has no pressure state: run hyperflux_fx.insert_gates first")  # noqa: TRY004
    return state


def set_pressure(module: nn.Module, gamma: float) -> None:
    """Set gamma for the gradient hooks of every gate of ``module``."""
    if not gamma >= 0:  # also rejects NaN
        raise ValueError(f"pressure gamma must be >= 0, got {gamma}")
    pressure_state(module).gamma.fill_(float(gamma))


def get_pressure(module: nn.Module) -> float:
    """Current gamma of the gradient hooks."""
    return float(pressure_state(module).gamma.item())


@torch.no_grad()
def apply_decoupled_pressure(module: nn.Module, lr: float) -> None:
    """One step of decoupled pressure: every flow moves down by ``lr * gamma * pressure_scale``.

    Coupled pressure (the paper's) is a gradient ``gamma / N`` that passes through the flows' Adam:
    once it dominates a flow's gradient, Adam's normalisation moves that flow one ``lr`` per step
    whatever gamma is, so gamma acts as an on/off switch. Applied after the optimiser's step, as
    AdamW decouples weight decay, the pressure moves every flow by a distance proportional to gamma
    (gamma = 1: one full Adam step), while the flux still moves it through Adam: a flow sinks when
    its Adam-normalised flux is below ``gamma`` (docs/training.md)."""
    gamma = pressure_state(module).gamma
    for g in gates(module):
        g.flow.sub_(gamma * (lr * g.pressure_scale))


@torch.no_grad()
def lift_regrown(module: nn.Module, closed_before: list[torch.Tensor], height: float) -> None:
    """Every unit that was closed before this step and is open now is lifted to at least ``height``."""
    for g, was in zip(gates(module), closed_before, strict=True):
        g.flow.copy_(torch.where(was & (g.flow >= 0), g.flow.clamp(min=height), g.flow))


def pressure_loss(module: nn.Module, gamma: float | torch.Tensor) -> torch.Tensor:
    """Explicit pressure term ``gamma * mean(t)`` over all gated units (scaled per gate by its
    ``pressure_scale``); its gradient equals what the hooks add when the state's gamma is ``gamma``."""
    all_gates = gates(module)
    if not all_gates:
        raise ValueError("the model has no gates: run hyperflux_fx.insert_gates first")
    total = sum(g.numel for g in all_gates)
    weighted = torch.stack([g.flow.sum() * g.pressure_scale for g in all_gates]).sum()
    return gamma * weighted / total
