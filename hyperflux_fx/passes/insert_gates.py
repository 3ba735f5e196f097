"""insert_gates: trace a model and gate every conv / linear / attention-projection weight.

Before (a traced ``nn.Conv2d`` called as a module)::

    conv1 = self.conv1(x)

After (weight granularity; the module stays as the holder of ``conv1.weight``/``conv1.bias``, so
the original state dict still loads)::

    conv1_weight = self.conv1.weight
    hyperflux_gates_conv1_weight = self.hyperflux_gates.conv1_weight(conv1_weight)
    conv1_bias = self.conv1.bias
    conv2d = torch.conv2d(x, hyperflux_gates_conv1_weight, conv1_bias, (1, 1), (1, 1), (1, 1), 1)

Every gated parameter gets one gate node right after the placeholders, shared by all of its weight
uses. Weight uses are found by :mod:`hyperflux_fx.analysis.weights` with the op table:

* functional ops (``F.linear``, ``F.conv*``, the matmul family) whose weight operand is a parameter
  reached through ``get_attr`` (possibly via transpose/reshape/slicing);
* leaf ``nn.Linear`` / ``nn.Conv*`` / ``nn.ConvTranspose*`` calls, rewritten to the functional op;
* other leaves holding such weights (``nn.MultiheadAttention``, conv subclasses with their own
  forward, opaque modules from the trace fallback): gated at module level through
  :class:`~hyperflux_fx.ir.GatedModuleCall`.

Channel and hybrid granularity add one :class:`~hyperflux_fx.ir.ChannelGate` per deletable channel
group (see :mod:`hyperflux_fx.passes._channel_gates`). Every parameter of the model ends up either
gated or in the report's skipped list with a reason.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.analysis.attention import find_attention
from hyperflux_fx.analysis.weights import WeightUse, WeightUses, end_ops, find_weight_uses
from hyperflux_fx.config import GateConfig
from hyperflux_fx.frontend.trace import normalize_inputs, propagate_shapes, trace
from hyperflux_fx.ir import (
    FRONTEND_META,
    GATE_REPORT_META,
    INPUTS_META,
    OPAQUE_META,
    PRESSURE_ATTR,
    TRAINING_ONLY_META,
    PressureState,
    gates,
)
from hyperflux_fx.ops import never_gated_reason
from hyperflux_fx.passes._channel_gates import insert_channel_gates
from hyperflux_fx.passes._gate_report import ChannelGroupReport, GatedTensor, GateReport, SkippedItem
from hyperflux_fx.passes._result import PassResult
from hyperflux_fx.passes._weight_gates import insert_weight_gates

__all__ = ["ChannelGroupReport", "GateReport", "GatedTensor", "SkippedItem", "insert_gates"]

log = logging.getLogger(__name__)

def insert_gates(model_or_gm: nn.Module, config: GateConfig | None = None, *, example_inputs: Any = None,
                 inplace: bool = False, leaf_modules: tuple[type | str, ...] = (),
                 concrete_args: dict[str, Any] | None = None, frontend: str = "auto",
                 example_kwargs: dict[str, Any] | None = None) -> PassResult:
    """Trace ``model_or_gm`` (if needed) and insert gates on its weights and/or channel groups.

    Args:
        model_or_gm: an ``nn.Module`` (traced with :func:`hyperflux_fx.trace`) or a GraphModule.
        config: what to gate (defaults: ``GateConfig()``).
        example_inputs: optional inputs; when given, shapes are propagated and checked.
        inplace: rewrite the given GraphModule itself (or share parameters with the given module)
            instead of a deep copy.
        leaf_modules: forwarded to :func:`hyperflux_fx.trace`.
        concrete_args: forwarded to :func:`hyperflux_fx.trace`.
        frontend: forwarded to :func:`hyperflux_fx.trace` ("auto", "fx" or "export").
        example_kwargs: forwarded to :func:`hyperflux_fx.trace` (keyword inputs for torch.export).

    Returns:
        ``PassResult(graph_module, modified, report)``; the report is also in
        ``graph_module.meta[GATE_REPORT_META]``.

    Raises:
        TypeError: ``model_or_gm`` is not an ``nn.Module``.
        ValueError: the model is already gated, or channel/hybrid granularity without example_inputs.
        TraceError / ExampleInputError: from tracing.
    """
    config = config or GateConfig()
    _check_arguments(model_or_gm, config, example_inputs)
    gm, original = _graph_module(model_or_gm, example_inputs, inplace, leaf_modules, concrete_args,
                                 frontend, example_kwargs)
    attention = find_attention(gm)
    report = GateReport(granularity=config.granularity, model_kind=attention.model_kind,
                        gate_first=_auto(config.gate_first, attention.model_kind),
                        gate_last=_auto(config.gate_last, attention.model_kind),
                        opaque=list(gm.meta.get(OPAQUE_META, [])),
                        training_only=list(gm.meta.get(TRAINING_ONLY_META, [])),
                        frontend=gm.meta.get(FRONTEND_META))
    found = find_weight_uses(gm)
    first, last = end_ops(gm, found.uses, attention)
    gated_names = _decide(gm, config, found, first, last, report, original)
    rules: Counter[str] = Counter()
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    insert_weight_gates(gm, gated_names, found, config, report, rules, generator)
    if example_inputs is not None:  # kept for later passes (fold_masks propagates shapes with them)
        gm.meta[INPUTS_META] = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x
                                     for x in normalize_inputs(example_inputs))
    if config.granularity in ("channel", "hybrid"):
        insert_channel_gates(gm, config, normalize_inputs(example_inputs), report, rules, generator)
    report.rule_counts = dict(rules)
    gm.meta[GATE_REPORT_META] = report
    if not gates(gm):
        log.warning("insert_gates: nothing to gate in %s", type(model_or_gm).__name__)
        return PassResult(gm, False, report)
    _attach_pressure(gm)
    log.info("insert_gates: %d tensors gated (%d elements)", len(report.gated), report.gated_elements)
    return PassResult(gm, True, report)


def _check_arguments(model_or_gm: Any, config: Any, example_inputs: Any) -> None:
    if not isinstance(model_or_gm, nn.Module):
        raise TypeError(f"insert_gates expects a torch.nn.Module or GraphModule, got "
                        f"{type(model_or_gm).__module__}.{type(model_or_gm).__qualname__}")
    if not isinstance(config, GateConfig):
        raise TypeError(f"config must be a hyperflux_fx.GateConfig, got {type(config).__name__}")
    if config.granularity in ("channel", "hybrid") and example_inputs is None:
        raise ValueError(f"granularity={config.granularity!r} needs example_inputs: the tensor shapes decide how "
                         "channels flow through the graph")
    if gates(model_or_gm):
        raise ValueError("the model is already gated (it contains hyperflux gate modules)")


def _graph_module(model_or_gm: nn.Module, example_inputs: Any, inplace: bool, leaf_modules: tuple[type | str, ...],
                  concrete_args: dict[str, Any] | None, frontend: str,
                  example_kwargs: dict[str, Any] | None) -> tuple[fx.GraphModule, list[str]]:
    """(the GraphModule to rewrite, the original model's parameter names)."""
    if isinstance(model_or_gm, fx.GraphModule):
        gm = model_or_gm if inplace else copy.deepcopy(model_or_gm)
        gm.meta.setdefault(OPAQUE_META, [])
        if example_inputs is not None:
            propagate_shapes(gm, normalize_inputs(example_inputs))
        return gm, []
    original = [name for name, _ in model_or_gm.named_parameters()]
    model = model_or_gm if inplace else copy.deepcopy(model_or_gm)
    return trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, frontend=frontend,
                 example_kwargs=example_kwargs), original


def _auto(flag: bool | None, model_kind: str) -> bool:
    """GateConfig.gate_first/gate_last: None means the paper's choice (CNNs yes, transformers no)."""
    return flag if flag is not None else model_kind == "cnn"


def _decide(gm: fx.GraphModule, config: GateConfig, found: WeightUses, first: set[fx.Node], last: set[fx.Node],
            report: GateReport, original: list[str]) -> list[str]:
    """The parameters to gate with weight gates; everything else goes to ``report.skipped`` with why."""
    uses_by_param = found.by_param()
    gated: list[str] = []
    for name, p in gm.named_parameters():
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        reason = _skip_reason(name, p, owner, attr, config, uses_by_param.get(name, []), first, last, report)
        if reason is None and name not in uses_by_param:
            reason = _why_not_a_weight(name, owner, attr, found)
        if reason is None:
            gated.append(name)
            if name in found.non_weight_users:
                log.info("insert_gates: %s also feeds %s; those uses stay ungated", name, found.non_weight_users[name])
        else:
            report.skipped.append(SkippedItem(name, "parameter", reason))
    canonical = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    report.skipped += [SkippedItem(n, "parameter", "not used by the traced forward")
                       for n in original if n not in canonical]
    report.skipped += [SkippedItem(c.node, "op", c.reason) for c in found.computed]
    if config.granularity == "channel":  # weights are pruned through their channel groups only
        report.skipped += [SkippedItem(n, "parameter", "granularity='channel': pruned through its channel group")
                           for n in gated]
        return []
    return gated


def _why_not_a_weight(name: str, owner: nn.Module, attr: str, found: WeightUses) -> str:
    """Why a parameter without weight uses stays dense."""
    reason = never_gated_reason(owner, attr)
    if reason is not None:
        return reason
    if name in found.non_weight_users:
        return f"used by {', '.join(sorted(found.non_weight_users[name]))}: not a weight of a supported op"
    if name in found.leaf_params:
        return f"inside leaf module {found.leaf_params[name]}: not a conv/linear/attention weight"
    return "not used by the traced forward"


def _skip_reason(name: str, p: nn.Parameter, owner: nn.Module, attr: str, config: GateConfig, uses: list[WeightUse],
                 first: set[fx.Node], last: set[fx.Node], report: GateReport) -> str | None:
    """Why parameter ``name`` stays dense, or None to gate it (only meaningful when it has weight uses)."""
    if not uses:
        return None  # the caller explains parameters without weight uses
    if isinstance(p, nn.parameter.UninitializedParameter):
        return "uninitialised lazy parameter: run the model once before gating"
    reason = never_gated_reason(owner, attr)
    if reason is not None:
        return reason
    if not p.is_floating_point():
        return f"dtype {p.dtype} is not floating point"
    if not p.requires_grad:
        return "frozen (requires_grad=False)"
    if not any(fnmatch.fnmatchcase(name, pat) for pat in config.include):
        return f"not matched by GateConfig.include={config.include}"
    if any(fnmatch.fnmatchcase(name, pat) for pat in config.exclude):
        return f"matched by GateConfig.exclude={config.exclude}"
    if p.numel() < config.min_numel:
        return f"{p.numel()} elements < GateConfig.min_numel={config.min_numel}"
    nodes = {u.node for u in uses}
    transformer = report.model_kind == "transformer"
    if not report.gate_first and nodes & first:
        why = "patch embedding of a transformer" if transformer else "first weight op"
        return f"{why}: stays dense (GateConfig.gate_first=False)"
    if not report.gate_last and nodes & last:
        why = "classifier head of a transformer" if transformer else "last weight op"
        return f"{why}: stays dense (GateConfig.gate_last=False)"
    return None


def _attach_pressure(gm: fx.GraphModule) -> None:
    """One PressureState for the whole model, read by every gate's gradient hook."""
    all_gates = gates(gm)
    state = PressureState(sum(g.numel for g in all_gates))
    state.to(all_gates[0].flow.device)
    gm.add_module(PRESSURE_ATTR, state)
    for g in all_gates:
        g.attach_pressure(state)
