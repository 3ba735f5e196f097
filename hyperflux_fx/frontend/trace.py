"""Tracing with leaf-module fallback, and shape propagation.

:func:`trace` runs torch.fx symbolic tracing with gate modules and timm's no-trace layers as leaves.
When tracing fails it finds the innermost submodule whose ``forward`` was running when the error
was raised, makes that submodule a leaf and retries. Such submodules are *opaque*: they are listed in
``gm.meta[OPAQUE_META]`` and gated at module level (their parameters are masked as a whole
before the module runs), never inside. A model whose own ``forward`` cannot be traced raises
:class:`TraceError`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.ir import OPAQUE_META, is_gate_module

__all__ = [
    "ExampleInputError",
    "OpaqueModule",
    "TraceError",
    "normalize_inputs",
    "propagate_shapes",
    "short_error",
    "trace",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpaqueModule:
    """A submodule the trace fallback kept as a leaf (listed in ``gm.meta[OPAQUE_META]``)."""

    path: str  # qualified name
    type: str  # module.qualname of its class
    error: str  # why torch.fx could not trace it (first line)


class TraceError(RuntimeError):
    """torch.fx could not trace the model, even with leaf fallback.

    Attributes:
        module_path: qualified name of the module whose forward failed ("" for the root).
        fx_error: the underlying exception.
    """

    def __init__(self, message: str, *, module_path: str, fx_error: BaseException) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.fx_error = fx_error


class ExampleInputError(ValueError):
    """The traced model could not run on the example inputs given."""


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a tuple of positional arguments (a lone tensor becomes a 1-tuple)."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    try:
        import timm.layers as timm_layers
        import timm.models  # noqa: F401  (registers every model's no-trace layers)
    except ImportError:  # pragma: no cover - timm is a pinned dependency
        return (), ()
    return tuple(timm_layers.get_notrace_modules()), tuple(timm_layers.get_notrace_functions())


class _Tracer(fx.Tracer):
    """fx tracer whose leaves are: torch.nn modules (fx's default), gates, timm's no-trace layers,
    user-given leaves (types or qualified names) and the opaque modules found by the fallback."""

    def __init__(self, *, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset(),
                 autowrap_functions: tuple[Callable[..., Any], ...] | None = None) -> None:
        # Defaults matter: unpickling a GraphModule re-traces its code with this class, no arguments
        # (its code, executed first, has imported timm if the graph calls timm's functions).
        if autowrap_functions is None:
            autowrap_functions = _timm_notrace()[1] if "timm" in sys.modules else ()
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.opaque_ids: set[int] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque_ids or is_gate_module(m):
            return True
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _culprit(exc: BaseException, names: dict[int, str]) -> str | None:
    """Qualified name of the innermost model submodule whose code was running when ``exc`` was raised."""
    found: str | None = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def short_error(exc: BaseException) -> str:
    """First line of ``type: message``, at most 300 characters."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def trace(model: nn.Module, example_inputs: Any = None, *, leaf_modules: Iterable[type | str] = (),
          concrete_args: dict[str, Any] | None = None, max_fallbacks: int = 64) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule, making untraceable submodules leaves.

    Args:
        model: the module to trace (a GraphModule is returned as it is).
        example_inputs: optional inputs (tensor or tuple); when given, shapes are propagated into
            ``node.meta["tensor_meta"]`` and a wrong input fails here with :class:`ExampleInputError`.
        leaf_modules: module types or qualified names to keep as leaves (not traced into).
        concrete_args: passed to ``torch.fx.Tracer.trace`` (e.g. to fix a flag argument).
        max_fallbacks: most submodules the fallback may turn into leaves before giving up.

    Returns:
        The GraphModule; ``gm.meta[OPAQUE_META]`` lists modules made leaves by the fallback.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        TraceError: the model's own forward cannot be traced.
        ExampleInputError: the traced model does not run on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"hyperflux_fx.trace expects a torch.nn.Module, got {type(model).__module__}."
                        f"{type(model).__qualname__}; build the model first (e.g. model = MyNet())")
    if isinstance(model, fx.GraphModule):
        gm = model
        gm.meta.setdefault(OPAQUE_META, [])
    else:
        gm = _trace_with_fallback(model, leaf_modules, concrete_args, max_fallbacks)
    inputs = normalize_inputs(example_inputs)
    if inputs:
        propagate_shapes(gm, inputs)
    return gm


def _trace_with_fallback(model: nn.Module, leaf_modules: Iterable[type | str],
                         concrete_args: dict[str, Any] | None, max_fallbacks: int) -> fx.GraphModule:
    # timm's no-trace registry only matters for models built from timm layers (and importing all of
    # timm.models costs about a second), so it is consulted only for those.
    uses_timm = any(type(m).__module__.startswith("timm.") for m in model.modules())
    timm_types, timm_functions = _timm_notrace() if uses_timm else ((), ())
    user = tuple(leaf_modules)
    bad = [x for x in user if not (isinstance(x, str) or (isinstance(x, type) and issubclass(x, nn.Module)))]
    if bad:
        raise TypeError(f"leaf_modules takes nn.Module subclasses or qualified names, got {bad!r}")
    tracer = _Tracer(leaf_types=timm_types + tuple(x for x in user if isinstance(x, type)),
                     leaf_names=frozenset(x for x in user if isinstance(x, str)),
                     autowrap_functions=timm_functions)
    names = {}
    for name, sub in model.named_modules(remove_duplicate=False):
        names.setdefault(id(sub), name)
    opaque: list[OpaqueModule] = []
    while True:
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            break
        except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
            path = _culprit(exc, names)
            if path is None or path == "" or len(opaque) >= max_fallbacks:
                where = f"module {path!r}" if path else f"the forward of {type(model).__qualname__} (root)"
                if path and len(opaque) >= max_fallbacks:
                    where += f" after {max_fallbacks} leaf fallbacks"
                raise TraceError(
                    f"torch.fx cannot trace {where}: {short_error(exc)}. Hint: pass leaf_modules=(...) with the "
                    "module types or qualified names to keep opaque, or concrete_args={...} to fix the "
                    "arguments that steer Python control flow.",
                    module_path=path or "", fx_error=exc) from exc
            sub = model.get_submodule(path)
            if id(sub) in tracer.opaque_ids:  # already a leaf and still failing: give up
                raise TraceError(f"torch.fx cannot trace around module {path!r}: {short_error(exc)}",
                                 module_path=path, fx_error=exc) from exc
            log.info("trace: %s (%s) is not traceable (%s); keeping it as an opaque leaf",
                     path, type(sub).__qualname__, short_error(exc))
            tracer.opaque_ids.add(id(sub))
            opaque.append(OpaqueModule(path, f"{type(sub).__module__}.{type(sub).__qualname__}", short_error(exc)))
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta[OPAQUE_META] = opaque
    gm.graph.lint()
    return gm


class _NodeFailure(RuntimeError):
    def __init__(self, node: fx.Node, exc: BaseException) -> None:
        super().__init__(f"at node {node.name} ({node.op} {_target_str(node)}): {short_error(exc)}")


def _target_str(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph, storing ``tensor_meta`` (as torch.fx's ShapeProp does) and naming the node
    that fails, without printing tracebacks."""

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata
        from torch.utils._pytree import tree_map_only

        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
        if isinstance(result, torch.Tensor) or (isinstance(result, (tuple, list)) and result
                                                and all(isinstance(r, torch.Tensor) for r in result)):
            n.meta["tensor_meta"] = tree_map_only(torch.Tensor, _extract_tensor_metadata, result)
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Run ``gm`` once on ``inputs`` (eval mode, no grad, state restored) recording ``tensor_meta``.

    Raises:
        ExampleInputError: naming the node that failed and the input shapes.
    """
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(*inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        # (fx.Interpreter appends a multi-line "While executing ..." note: keep the first line)
        why = str(exc).splitlines()[0] if isinstance(exc, _NodeFailure) else short_error(exc)
        raise ExampleInputError(f"the model does not run on example inputs {shapes}: {why}. "
                                "Pass inputs of the shape the model expects (e.g. --input-shape 1,3,32,32).") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
