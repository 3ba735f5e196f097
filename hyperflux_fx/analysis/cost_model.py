"""The exact cost model of the folded structure: the parameters and MACs that ``fold_masks`` followed
by ``count_params_and_macs`` would give for a gated model's current masks, without folding.

``fold_masks`` deletes whole units of channel groups and changes nothing else, so the compact
model's cost is a function of one integer per group: ``k[g]``, the units group ``g`` keeps (after
dead units, ``min_channels`` and ``round_to``; :func:`~hyperflux_fx.analysis.coupling.kept_count`,
the rule ``fold_masks`` itself uses). Every sliced dim of a tensor has a folded width that is linear
in ``k`` (a producer's rows, a per-channel parameter, a consumer's input columns over concatenated
and flattened groups), so:

* a parameter's size is its numel scaled by the folded / dense width of each dim the fold slices
  (at most two such dims: the cost is *bilinear* in the widths, e.g. a conv's ``in x out``);
* a conv / linear / weight-matmul's MACs are its output positions times its weight's numel, so they
  scale with the folded weight's numel;
* a MAC op between activations (``q @ k^T``, attention) gets its op-table MAC formula evaluated on
  meta tensors of the folded shapes (each labelled dim at its folded width).

Everything else is constant. ``marginal`` gives, per group, what closing one more unit saves (the
finite difference, exact for the bilinear terms), which drives the cost-weighted pressure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_map

from hyperflux_fx.analysis.coupling import (
    Coupling,
    Group,
    Label,
    analyze_channels,
    dead_units,
    deletes_dead,
    kept_count,
    param_target,
    shape_of,
)
from hyperflux_fx.analysis.runtime import resolve_fold_config
from hyperflux_fx.config import FoldConfig
from hyperflux_fx.frontend.trace import normalize_inputs, propagate_shapes
from hyperflux_fx.ir import INPUTS_META, STATE_ATTRS, ChannelGate, WeightGate, gates
from hyperflux_fx.ops import call_spec, module_macs, module_spec, slot_value, weight_slots

__all__ = ["MEASURES", "Cost", "CostModel", "Width"]

MEASURES = ("params", "macs")


@dataclass(frozen=True)
class Cost:
    """Parameters and multiply-accumulates (whole batch of the example inputs)."""

    params: int
    macs: int

    def of(self, measure: str) -> int:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        return self.params if measure == "params" else self.macs


@dataclass(frozen=True)
class Width:
    """A folded width: sum over parts of (k[group] or a fixed length) x multiplier."""

    parts: tuple[tuple[int | None, int, int], ...]  # (group id or None, dense length, multiplier)

    def at(self, k: dict[int, int]) -> int:
        return sum((k[g] if g is not None else n) * m for g, n, m in self.parts)

    @property
    def groups(self) -> set[int]:
        return {g for g, _, _ in self.parts if g is not None}


@dataclass
class _Tensor:
    """A parameter and the folded width of each dim the fold slices."""

    numel: int
    dims: dict[int, Width]
    dense: dict[int, int]
    shape: tuple[int, ...] = ()

    def numel_at(self, k: dict[int, int]) -> int:
        rest = self.numel // math.prod(self.dense.values())
        return rest * math.prod(w.at(k) for w in self.dims.values())

    at = numel_at

    @property
    def groups(self) -> set[int]:
        return set().union(*(w.groups for w in self.dims.values()))


@dataclass
class _ScaledMacs:
    """A weight op: dense MACs scaled by its folded weight's numel (MACs = positions x weight numel)."""

    macs: int
    weight: _Tensor
    node: str = ""

    def at(self, k: dict[int, int]) -> int:
        return self.macs * self.weight.numel_at(k) // self.weight.numel

    @property
    def groups(self) -> set[int]:
        return self.weight.groups


@dataclass(frozen=True)
class _Ref:
    """A tensor operand of a MAC op: its dense shape and the folded width of its labelled dim."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    dim: int | None
    width: Width | None

    def meta(self, k: dict[int, int]) -> torch.Tensor:
        shape = list(self.shape)
        if self.width is not None:
            shape[self.dim] = self.width.at(k)
        return torch.empty(shape, dtype=self.dtype, device="meta")


@dataclass
class _FormulaMacs:
    """A MAC op between activations: its op-table formula on meta tensors of the folded shapes."""

    formula: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: _Ref
    group_set: set[int]

    def at(self, k: dict[int, int]) -> int:
        def meta(a: Any) -> Any:
            return a.meta(k) if isinstance(a, _Ref) else a
        return int(self.formula(tree_map(meta, self.args), tree_map(meta, self.kwargs), self.out.meta(k)))

    @property
    def groups(self) -> set[int]:
        return self.group_set


class CostModel:
    """The compact model's cost as a function of each group's kept units (see the module docstring).

    Build it once per gated model (``CostModel(gm, FoldConfig())``); it follows the masks as they
    change. ``cost()`` equals ``count_params_and_macs(fold_masks(gm, fold).graph_module, inputs)``
    exactly, for the example inputs ``insert_gates`` kept (or ``example_inputs``).
    """

    def __init__(self, gm: fx.GraphModule, fold: FoldConfig | None = None, *, example_inputs: Any = None) -> None:
        self.fold = resolve_fold_config(fold or FoldConfig())
        if self.fold.fold_batchnorm:
            raise ValueError("CostModel follows fold_masks with fold_batchnorm=False (BatchNorm folding changes "
                             "which parameters exist); count the folded model instead")
        inputs = normalize_inputs(example_inputs) if example_inputs is not None else gm.meta.get(INPUTS_META)
        if inputs is None:
            raise ValueError("CostModel needs example_inputs (none were kept by insert_gates)")
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        inputs = tuple(tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, list(inputs)))
        propagate_shapes(gm, inputs)
        self.gm = gm
        self.coupling: Coupling = analyze_channels(gm)
        self.groups: list[Group] = self.coupling.groups()
        by_key = {(g.unit, frozenset(g.producers)): g for g in gates(gm) if isinstance(g, ChannelGate)}
        self.gate_of: dict[int, ChannelGate | None] = {
            g.id: by_key.get((g.unit, frozenset(g.producers))) for g in self.groups}
        self._weight_gates = {g.target: g for g in gates(gm) if isinstance(g, WeightGate)}
        group_of = {s: g.id for g in self.groups for s in g.spaces}
        self._tensors = _sliced_tensors(gm, self.coupling, group_of)
        self._params_const = sum(p.numel() for n, p in gm.named_parameters()
                                 if not n.startswith(STATE_ATTRS) and n not in self._tensors)
        self._macs_const, self._mac_terms = _mac_terms(gm, inputs, self.coupling, group_of, self._tensors)
        self.dense = self.cost_at({g.id: g.size for g in self.groups})

    # -- counts -------------------------------------------------------------------------------------

    def closed(self, group: Group, overrides: dict[ChannelGate, torch.Tensor] | None = None,
               params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """A bool per unit of ``group``: closed by its gate (or ``overrides[gate]``), or dead (judged on
        ``params``, the weights with their masks applied; computed here when not given)."""
        gate = self.gate_of[group.id]
        if gate is None:
            closed = torch.zeros(group.size, dtype=torch.bool)
        elif overrides is not None and gate in overrides:
            closed = overrides[gate].cpu()
        else:
            closed = (gate.mask() == 0).cpu()
        if deletes_dead(group, self.fold):
            params = self._effective_params() if params is None else params
            closed = closed | dead_units(self.gm, self.coupling, group, params=params)
        return closed

    def counts(self, overrides: dict[ChannelGate, torch.Tensor] | None = None, *, rounded: bool = True
               ) -> dict[int, int]:
        """Units each group keeps: as ``fold_masks`` would (``rounded``), or simply the open ones."""
        out = {}
        params = self._effective_params()  # once: masking every gated weight is the costly part
        for g in self.groups:
            n_closed = int(self.closed(g, overrides, params).sum()) if g.deletable else 0
            out[g.id] = (kept_count(g, n_closed, self.fold) if rounded
                         else max(g.size - n_closed, 1))
        return out

    def _effective_params(self) -> dict[str, torch.Tensor]:
        if not self._weight_gates:
            return self.coupling.parameters
        params = dict(self.coupling.parameters)
        for target, gate in self._weight_gates.items():
            if target in params:
                params[target] = params[target].detach() * gate.mask().to(params[target].dtype)
        return params

    def weight_ops(self) -> list[tuple[str, _Tensor]]:
        """(node name, sliced weight) of every weight op whose MACs follow the kept units."""
        return [(t.node, t.weight) for t in self._mac_terms if isinstance(t, _ScaledMacs)]

    # -- cost ---------------------------------------------------------------------------------------

    def cost_at(self, k: dict[int, int]) -> Cost:
        """The compact model's cost when group ``g`` keeps ``k[g]`` units."""
        params = self._params_const + sum(t.numel_at(k) for t in self._tensors.values())
        macs = self._macs_const + sum(term.at(k) for term in self._mac_terms)
        return Cost(int(params), int(macs))

    def cost(self, overrides: dict[ChannelGate, torch.Tensor] | None = None) -> Cost:
        """The cost ``fold_masks`` + ``count_params_and_macs`` would give for the current masks."""
        return self.cost_at(self.counts(overrides))

    def marginal(self, k: dict[int, int]) -> dict[int, Cost]:
        """Per group: what closing one more of its units saves at ``k`` (cost(k) - cost(k - 1 unit))."""
        saved: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for kind, terms in ((0, self._tensors.values()), (1, self._mac_terms)):
            for term in terms:
                now = None
                for g in term.groups:
                    if k[g] <= 0:
                        continue
                    now = term.at(k) if now is None else now
                    saved[g][kind] += now - term.at({**k, g: k[g] - 1})
        return {g.id: Cost(*saved[g.id]) for g in self.groups}


def _sliced_tensors(gm: fx.GraphModule, c: Coupling, group_of: dict[int, int]) -> dict[str, _Tensor]:
    """Every parameter the fold may slice, with the folded width of each sliced dim."""
    params = {n: p for n, p in gm.named_parameters() if not n.startswith(STATE_ATTRS)}
    dims: dict[str, dict[int, Width]] = defaultdict(dict)
    pieces: dict[tuple[str, int], dict[int, tuple[int | None, int, int]]] = defaultdict(dict)
    for sid, prod in sorted(c.producers.items(), key=lambda kv: kv[1].offset):
        if sid in c.split_parents:
            continue  # deleted through its heads, whose producer entry slices the same rows
        for target, dim in ((prod.weight, prod.weight_dim), (prod.bias, 0)):
            if target is not None:  # one run per piece of the output (a weight shared by two ops: once)
                pieces[(target, dim)][prod.offset] = (group_of[sid], c.sizes[sid], prod.replicas * prod.unit_rows)
    runs: dict[tuple[str, int], list[tuple[int | None, int, int]]] = defaultdict(list)
    for key, by_offset in pieces.items():
        runs[key] = list(by_offset.values())
    for cp in c.params:  # several runs of one tensor (a BatchNorm over a concatenation), the rest kept
        runs[(cp.target, cp.dim)].append((group_of[cp.space], c.sizes[cp.space], cp.expand * cp.replicas))
    for (target, dim), parts in runs.items():
        if target in params:
            rest = params[target].shape[dim] - sum(size * per for _, size, per in parts)
            dims[target][dim] = Width(tuple(parts) + (((None, rest, 1),) if rest > 0 else ()))
    for cons in c.consumers:
        dims[cons.weight][cons.weight_dim] = label_width(cons.weight_layout, group_of)
    return {name: _Tensor(params[name].numel(), d, {i: params[name].shape[i] for i in d}, tuple(params[name].shape))
            for name, d in dims.items() if name in params}


def label_width(label: Label, group_of: dict[int, int]) -> Width:
    """The folded width along a label's dim."""
    return Width(tuple((group_of.get(s.space) if s.space is not None else None, s.length, s.expand * s.replicas)
                        for s in label.segs))


class _NodeMacs(fx.Interpreter):
    """Runs the gated graph once, recording every node's MACs and its operands' shapes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.macs: dict[str, int] = {}
        self.operands: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
        self.hooked = [0]

    def run_node(self, n: fx.Node) -> Any:
        before = self.hooked[0]
        out = super().run_node(n)
        macs = self.hooked[0] - before
        spec = call_spec(n)
        if spec is not None and spec.macs is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            macs += spec.macs(args, kwargs, out)
            self.operands[n.name] = (args, kwargs, out)
        if macs:
            self.macs[n.name] = int(macs)
        return out


def _mac_terms(gm: fx.GraphModule, inputs: tuple[Any, ...], c: Coupling, group_of: dict[int, int],
               tensors: dict[str, _Tensor]) -> tuple[int, list[Any]]:
    """(constant MACs, the MAC terms that follow the kept units)."""
    counter = _NodeMacs(gm)
    hooks = [m.register_forward_hook(lambda mod, a, o: counter.hooked.__setitem__(0, counter.hooked[0]
                                                                                     + module_macs(mod, a, o)))
             for m in gm.modules() if (spec := module_spec(m)) is not None and spec.macs is not None]
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            counter.run(*inputs)
    finally:
        for h in hooks:
            h.remove()
        gm.train(was_training)
    nodes = {n.name: n for n in gm.graph.nodes}
    const, terms = 0, []
    for name, macs in counter.macs.items():
        term = _mac_term(gm, nodes[name], macs, counter.operands.get(name), c, group_of, tensors)
        if term is None:
            const += macs
        else:
            terms.append(term)
    return const, terms


def _mac_term(gm: fx.GraphModule, node: fx.Node, macs: int, operands: Any, c: Coupling, group_of: dict[int, int],
              tensors: dict[str, _Tensor]) -> Any:
    """The term for one MAC node, or None when its MACs cannot change."""
    weight = _weight_target(gm, node)
    if weight is not None:
        return _ScaledMacs(macs, tensors[weight], node.name) if weight in tensors else None
    if operands is None or node.op == "call_module":
        return None
    args, kwargs, out = operands
    ref_args = _refs(node.args, args, c, group_of)
    ref_kwargs = _refs(node.kwargs, kwargs, c, group_of)
    out_ref = _ref(node, out, c, group_of)
    found: set[int] = set(out_ref.width.groups if out_ref.width is not None else ())
    for r in (ref_args, ref_kwargs):
        tree_map(lambda a: found.update(a.width.groups) if isinstance(a, _Ref) and a.width is not None else None, r)
    spec = call_spec(node)
    return _FormulaMacs(spec.macs, ref_args, ref_kwargs, out_ref, found) if found else None


def _weight_target(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The parameter a weight op multiplies by (a functional op's weight slot, a module's weight)."""
    if node.op == "call_module":
        spec = module_spec(gm.get_submodule(str(node.target)))
        if spec is not None and "weight" in spec.weight_attrs:
            return f"{node.target}.weight"
        return None
    for slot in weight_slots(node):
        target = param_target(gm, slot_value(node, slot))
        if target is not None:
            return target
    return None


def _refs(templ: Any, values: Any, c: Coupling, group_of: dict[int, int]) -> Any:
    """``values`` with each tensor operand replaced by a :class:`_Ref` (nodes of ``templ`` give labels)."""
    if isinstance(templ, (tuple, list)) and isinstance(values, (tuple, list)):
        return type(values)(_refs(t, v, c, group_of) for t, v in zip(templ, values, strict=False))
    if isinstance(templ, dict) and isinstance(values, dict):
        return {key: _refs(templ.get(key), v, c, group_of) for key, v in values.items()}
    if isinstance(values, torch.Tensor):
        return _ref(templ if isinstance(templ, fx.Node) else None, values, c, group_of)
    return values


def _ref(node: fx.Node | None, value: torch.Tensor, c: Coupling, group_of: dict[int, int]) -> _Ref:
    label = c.labels.get(node.name) if node is not None else None
    shape = tuple(value.shape)
    if label is None or shape_of(node) != shape:
        return _Ref(shape, value.dtype, None, None)
    width = label_width(label, group_of)
    return _Ref(shape, value.dtype, label.dim, width if width.groups else None)
