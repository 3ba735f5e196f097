"""What a model costs: parameters and multiply-accumulates, measured by running it once, and what
one unit of a channel group costs. MAC formulas come from the op table (:mod:`hyperflux_fx.ops`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.analysis.coupling import Coupling, Group, group_consumers, shape_of
from hyperflux_fx.frontend.trace import ExampleInputError, TraceError, normalize_inputs, trace
from hyperflux_fx.ir import OPAQUE_META, STATE_ATTRS
from hyperflux_fx.ops import call_spec, module_macs, module_spec

__all__ = ["Costs", "count_costs", "count_params", "count_params_and_macs", "unit_costs"]


def count_params(model: nn.Module) -> int:
    """Parameters of the model, without hyperflux's own state (flow parameters)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(STATE_ATTRS))


class _Counter(fx.Interpreter):
    """Runs a GraphModule, adding up the MACs of its functional ops and methods."""

    def __init__(self, gm: fx.GraphModule, by_kind: dict[str, int]) -> None:
        super().__init__(gm)
        self.by_kind = by_kind

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        spec = call_spec(n)
        if spec is not None and spec.macs is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.by_kind[spec.kind] = self.by_kind.get(spec.kind, 0) + spec.macs(args, kwargs, out)
        return out


@dataclass(frozen=True)
class Costs:
    """What :func:`count_costs` measured, and how completely."""

    params: int
    macs: int
    counted_on: str  # "graph": every op of the traced graph; "layers": forward hooks on layers only
    note: str | None = None  # what may be missing from ``macs`` (None: nothing)
    by_kind: dict[str, int] = field(default_factory=dict)  # MACs per op kind of the op table (conv, linear, ...)


def count_costs(model: nn.Module, example_inputs: Any, *, example_kwargs: dict[str, Any] | None = None,
                frontend: str = "auto") -> Costs:
    """Parameters and multiply-accumulates of one forward on ``example_inputs``, and what they cover.

    Parameters exclude hyperflux's own state (flow parameters). MACs count every op whose entry in
    the op table has a formula (conv, conv-transpose, linear, matmul family, einsum, attention), whole
    batch included. The model is captured first (``frontend`` as in :func:`~hyperflux_fx.trace`; with
    "auto", torch.export is tried too when torch.fx keeps submodules opaque) so its functional ops
    count too. Where capture fails, or submodules stay opaque, only the layers (conv/linear/attention
    modules) inside them are counted, and ``note`` says so.
    """
    inputs = normalize_inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    original, was_training = model, model.training
    note = None
    if not isinstance(model, fx.GraphModule):
        try:
            model = _capture(model, inputs, kwargs, frontend)
        except (TraceError, ExampleInputError) as exc:
            note = (f"the model could not be captured for counting ({str(exc).splitlines()[0]}): MACs are counted "
                    "on its conv/linear/attention layers only; functional ops (matmul, einsum, ...) are not")
    if isinstance(model, fx.GraphModule) and (opaque := model.meta.get(OPAQUE_META)):
        names = ", ".join(o.path for o in opaque[:3]) + (" ..." if len(opaque) > 3 else "")
        note = (f"{len(opaque)} submodule(s) stayed opaque to the trace ({names}): inside them only conv/linear/"
                "attention layers are counted")
    model.eval()
    try:
        graph_kwargs = {} if isinstance(model, fx.GraphModule) else kwargs  # a capture holds them
        by_kind = _count_macs(model, inputs, graph_kwargs)
    finally:
        original.train(was_training)
    return Costs(count_params(original), sum(by_kind.values()),
                 "graph" if isinstance(model, fx.GraphModule) else "layers", note, by_kind)


def _capture(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], frontend: str) -> fx.GraphModule:
    """The graph to count on: ``frontend``'s; with "auto", torch.export's where torch.fx kept submodules
    opaque and export captures the whole model."""
    gm = trace(model, inputs, example_kwargs=kwargs or None, frontend=frontend)
    if frontend == "auto" and gm.meta.get(OPAQUE_META):
        try:
            return trace(model, inputs, example_kwargs=kwargs or None, frontend="export")
        except (TraceError, ExampleInputError):
            pass
    return gm


def _count_macs(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, int]:
    by_kind: dict[str, int] = {}

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        kind = module_spec(mod).kind  # type: ignore[union-attr]
        by_kind[kind] = by_kind.get(kind, 0) + module_macs(mod, args, out)

    # modules actually called (leaf convs, layers inside opaque leaves, attention); functional ops of a
    # GraphModule are counted by the interpreter (their holder modules are never called)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if (spec := module_spec(m)) is not None and spec.macs is not None]
    try:
        with torch.no_grad():
            if isinstance(model, fx.GraphModule):
                _Counter(model, by_kind).run(*inputs)
            else:
                model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {kind: int(macs) for kind, macs in by_kind.items()}


def count_params_and_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(parameters, multiply-accumulates)`` of one forward on ``example_inputs``
    (:func:`count_costs`); warns when the MACs may be incomplete (its ``note``)."""
    costs = count_costs(model, example_inputs)
    if costs.note:
        warnings.warn(f"count_params_and_macs: {costs.note}", UserWarning, stacklevel=2)
    return costs.params, costs.macs


def unit_costs(gm: fx.GraphModule, coupling: Coupling, group: Group) -> tuple[float, float]:
    """(parameters, MACs) that one unit of ``group`` costs: its slice of every producer's weight
    and bias and of every consumer's weight, times the output positions for MACs (``gm`` must carry
    ``tensor_meta``)."""
    params = coupling.parameters
    nodes = {n.name: n for n in gm.graph.nodes}
    p_cost = m_cost = 0.0
    for sid in group.spaces:
        prod = coupling.producers[sid]
        w = params[prod.weight]
        per = w.numel() / w.shape[prod.weight_dim] * prod.replicas * prod.unit_rows  # heads own several rows
        positions = math.prod(shape_of(nodes[prod.node]) or (1,)) / max(w.shape[prod.weight_dim], 1)
        p_cost += per + (1 if prod.bias else 0)
        m_cost += per * positions
    for cons in group_consumers(coupling, group):
        w = params[cons.weight]
        per = w.numel() / w.shape[cons.weight_dim]
        mine = [s for s in cons.weight_layout.segs if s.space in group.spaces]
        expand = sum(s.expand * s.replicas for s in mine) / max(len(mine), 1)
        out = shape_of(nodes[cons.node]) or (1,)
        positions = math.prod(out) / max(w.shape[1 - cons.weight_dim] if w.dim() > 1 else 1, 1)
        p_cost += per * expand
        m_cost += per * expand * positions
    return p_cost, m_cost
