"""What a model costs: parameters and multiply-accumulates, measured by running it once, and what
one unit of a channel group costs. MAC formulas come from the op table (:mod:`hyperflux_fx.ops`)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.analysis.coupling import Coupling, Group, group_consumers, shape_of
from hyperflux_fx.frontend.trace import TraceError, normalize_inputs, trace
from hyperflux_fx.ir import STATE_ATTRS
from hyperflux_fx.ops import call_spec, module_macs, module_spec

__all__ = ["count_params", "count_params_and_macs", "unit_costs"]


def count_params(model: nn.Module) -> int:
    """Parameters of the model, without hyperflux's own state (flow parameters)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(STATE_ATTRS))


class _Counter(fx.Interpreter):
    """Runs a GraphModule, adding up the MACs of its functional ops and methods."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.macs = 0

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        spec = call_spec(n)
        if spec is not None and spec.macs is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.macs += spec.macs(args, kwargs, out)
        return out


def count_params_and_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(parameters, multiply-accumulates)`` of one forward on ``example_inputs``.

    Parameters exclude hyperflux's own state (flow parameters). MACs count every op whose entry in
    the op table has a formula (conv, conv-transpose, linear, matmul family, attention), whole batch
    included. Any other module is traced first (so its functional ops count too); only a model that
    cannot be traced at all is counted off forward hooks on its layers.
    """
    inputs = normalize_inputs(example_inputs)
    params = count_params(model)
    original, was_training = model, model.training
    if not isinstance(model, fx.GraphModule):
        with contextlib.suppress(TraceError):  # untraceable: counted with hooks, layers only
            model = trace(model)
    model.eval()
    total = [0]

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        total[0] += module_macs(mod, args, out)

    # modules actually called (leaf convs, layers inside opaque leaves, attention); functional ops of a
    # GraphModule are counted by the interpreter (their holder modules are never called)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if (spec := module_spec(m)) is not None and spec.macs is not None]
    try:
        with torch.no_grad():
            if isinstance(model, fx.GraphModule):
                counter = _Counter(model)
                counter.run(*inputs)
                total[0] += counter.macs
            else:
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
        original.train(was_training)
    return params, int(total[0])


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
