"""The torch.export front end: a model torch.fx cannot trace, captured as an ATen graph.

:func:`export_graph` runs ``torch.export.export(model, inputs, kwargs, strict=False)`` with every
dim of every tensor input dynamic where the model allows it (``Dim.AUTO``: a batch or sequence
length of another size runs; a dim the model fixes stays fixed), and turns the exported program into
a plain GraphModule the passes rewrite like a symbolic trace (docs/frontends.md):

* the call signature is plain: the positional inputs, then the tensor keyword inputs in the order
  given; non-tensor keyword inputs (``use_cache=False``) are constants of the graph;
* the outputs are flat: one tensor when the model returns one (a Hugging Face ``ModelOutput`` holding
  only ``logits``), else the tuple of its tensors;
* run-time checks export inserts (input guards, ``_assert_tensor_metadata``) are dropped: they
  assert the example's dtypes and the exported sizes, which the fold changes;
* parameters keep the model's names (``model.layers.0.mlp.up_proj.weight``); the modules holding
  them are plain ``nn.Module`` containers, and every op is an ATen overload the op table knows.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from hyperflux_fx.ops import call_spec

__all__ = ["export_graph"]

_GUARDS = "_guards_fn"  # the input-guard module torch.export attaches to ep.module()


def export_graph(model: nn.Module, inputs: Sequence[Any], kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Capture ``model`` with torch.export (eval mode) as a plain GraphModule (see the module docstring).

    Raises:
        RuntimeError: torch.export could not capture the model (its message says where).
    """
    kwargs = dict(kwargs or {})
    args = tuple(inputs)
    with _torch_logs_quiet():  # export logs specialisations and guard failures as warnings: the error says it
        program = torch.export.export(model, args, kwargs=kwargs, strict=False,
                                      dynamic_shapes=_dynamic_spec(model, args, kwargs))
    unlifted = program.module()
    return fx.GraphModule(unlifted, _plain_graph(unlifted.graph, kwargs), type(model).__name__)


@contextlib.contextmanager
def _torch_logs_quiet() -> Iterator[None]:
    """Log records below ERROR and what export writes to stderr dropped (torch's loggers set their own
    levels, so the parent's won't do)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # and the graph it prints on a guard failure
            yield
    finally:
        logging.disable(before)


def _dynamic(value: Any) -> dict[int, Any] | None:
    """Every dim of a tensor ``Dim.AUTO`` (dynamic unless the model fixes it); None for the rest."""
    return {d: torch.export.Dim.AUTO for d in range(value.dim())} if isinstance(value, torch.Tensor) else None


def _dynamic_spec(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch.export's ``dynamic_shapes``, keyed by the forward's parameter names."""
    names = list(inspect.signature(model.forward).parameters)
    return {names[i]: _dynamic(x) for i, x in enumerate(args)} | {k: _dynamic(v) for k, v in kwargs.items()}


def _plain_graph(graph: fx.Graph, kwargs: dict[str, Any]) -> fx.Graph:
    """``graph`` with a plain call signature, flat outputs and without export's run-time checks."""
    graph._codegen = fx.graph.CodeGen()  # no pytree in/out specs: the placeholders are the signature
    for node in [n for n in graph.nodes if _is_check(n)]:
        graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        value = kwargs.get(str(node.target), node)
        if node.target in kwargs and not isinstance(value, torch.Tensor):  # a constant flag
            def constant(n: fx.Node, node: fx.Node = node, value: Any = value) -> Any:
                return value if n is node else n

            for user in list(node.users):
                user.args, user.kwargs = fx.node.map_arg(user.args, constant), fx.node.map_arg(user.kwargs, constant)
            graph.erase_node(node)
    out = graph.output_node()
    flat = [v for v in tree_leaves(out.args[0]) if isinstance(v, fx.Node)]
    out.args = (flat[0] if len(flat) == 1 else tuple(flat),)
    graph.eliminate_dead_code()
    graph.lint()
    return graph


def _is_check(node: fx.Node) -> bool:
    """export's input guards and tensor-metadata assertions (no outputs)."""
    if node.op == "call_module":
        return node.target == _GUARDS
    spec = call_spec(node)
    return spec is not None and spec.kind == "check"

