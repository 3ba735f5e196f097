"""Probing an op the table does not know: replay it on a tensor with some channels zeroed and see whether
the channels stay apart (a per-channel op) and along which dim."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from hyperflux_fx.analysis.coupling.labels import Label, shape_of
from hyperflux_fx.ir import VALUE_META


def _node_function(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any] | str:
    """What a call node calls, or why it cannot be replayed outside the graph."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if next(itertools.chain(mod.parameters(), mod.buffers()), None) is not None:
            return "a leaf module with parameters"
        return mod
    if node.op == "call_method":
        return lambda t, *a, **k: getattr(t, str(node.target))(*a, **k)
    return node.target


def replay(gm: fx.GraphModule, chain: list[fx.Node], src: fx.Node) -> Callable[[torch.Tensor], Any] | str:
    """The ops of ``chain`` (each reading the one before, the first reading ``src``) as a function
    of ``src``'s value, every other operand a constant (a literal, a size recorded on the example
    inputs, a tensor attribute); or why they cannot be replayed so."""
    steps, prev, missing = [], src, []
    for node in chain:
        fn = _node_function(gm, node)
        if isinstance(fn, str):
            return fn

        def value(a: Any, prev: fx.Node = prev) -> Any:
            if a is prev or not isinstance(a, fx.Node):
                return a
            if a.op == "get_attr":
                return functools.reduce(getattr, str(a.target).split("."), gm)
            if VALUE_META not in a.meta:
                missing.append(a.name)
            return a.meta.get(VALUE_META)

        steps.append((fn, prev, fx.node.map_aggregate(node.args, value), fx.node.map_aggregate(node.kwargs, value)))
        prev = node
    if missing:
        return f"operands that are not constants: {missing}"

    def run(t: torch.Tensor) -> Any:
        for fn, reads, args, kwargs in steps:
            t = fn(*fx.node.map_aggregate(args, lambda a, reads=reads, t=t: t if a is reads else a), **kwargs)
        return t

    return run


def probe_channelwise(gm: fx.GraphModule, node: fx.Node, lab: Label) -> int | str:
    """An op outside the table, run on random inputs of the example shape: the output dim carrying
    the channels of its first operand if it acts on each of them alone (:func:`channelwise_dim`),
    or why not."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    tm = x.meta.get("tensor_meta")
    if shape_of(x) is None or not tm.dtype.is_floating_point:
        return "no floating-point example shape"
    call = replay(gm, [node], x)
    if isinstance(call, str):
        return call
    return channelwise_dim(call, shape_of(x), tm.dtype, lab.dim, lab.width, shape_of(node))


def channelwise_dim(call: Callable[[torch.Tensor], Any], shape: tuple[int, ...], dtype: torch.dtype, dim: int,
                     width: int, out_shape: tuple[int, ...] | None) -> int | str:
    """The output dim of ``call`` that carries input dim ``dim``'s ``width`` channels one by one, or why
    there is none. ``call`` must be deterministic, and for a random half of the channels, taking them
    alone must give exactly those channels of the output (so the fold may call it narrower), and
    zeroing the others must leave those exactly zero and the kept ones unchanged (a closed channel
    stays closed and leaks into no open one). Window partition/reverse functions, ops that move
    elements along other dims and per-element ops pass."""
    if out_shape is None or width < 2:
        return "no example shape"
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=gen, dtype=dtype)
    kept = torch.randperm(width, generator=gen)[: width // 2].sort().values
    closed = torch.tensor(sorted(set(range(width)) - set(kept.tolist())), dtype=torch.long)
    try:
        with torch.no_grad():
            y, again = call(t), call(t)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != out_shape or not torch.equal(y, again):
                return "not a deterministic tensor of the recorded shape"
            alone = call(t.index_select(dim, kept))
            zeroed = call(t.index_fill(dim, closed, 0.0))
    except Exception as exc:  # noqa: BLE001 - any failure means "not channelwise"
        return f"fails on a narrower input ({type(exc).__name__})"
    aligned = dim - len(shape) + len(out_shape)
    why = "mixes the channels"
    for d in sorted((d for d in range(len(out_shape)) if out_shape[d] == width), key=lambda d: d != aligned):
        y_kept = y.index_select(d, kept)
        if alone.shape != y_kept.shape or not torch.equal(alone, y_kept):
            continue
        if not torch.equal(zeroed.index_select(d, kept), alone):
            continue
        if zeroed.index_select(d, closed).any():
            why = "makes a zeroed channel non-zero"
            continue
        return d
    return why
