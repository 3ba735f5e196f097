"""Tracing with leaf-module fallback, and loading models from ``model.py`` / ``timm:`` / ``torchvision:``.

:func:`trace` runs torch.fx symbolic tracing with gate modules and timm's no-trace layers as leaves.
When tracing fails it finds the innermost submodule whose ``forward`` was running when the error
was raised, makes that submodule a leaf and retries. Such submodules are *opaque*: they are listed in
``gm.meta["hyperflux.opaque"]`` and gated at module level (their parameters are masked as a whole
before the module runs), never inside. A model whose own ``forward`` cannot be traced raises
:class:`TraceError`.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.runtime.gates import is_gate_module

__all__ = [
    "ExampleInputError",
    "LoadedModel",
    "SourceError",
    "TraceError",
    "load_source",
    "normalize_inputs",
    "trace",
]

log = logging.getLogger(__name__)

#: ``gm.meta`` key holding the list of opaque submodules (dicts: path, type, error).
OPAQUE_META = "hyperflux.opaque"


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


class SourceError(ValueError):
    """A model source (``model.py``, ``timm:NAME``, ``torchvision:NAME``) could not be loaded."""


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


def _short(exc: BaseException) -> str:
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
        The GraphModule; ``gm.meta["hyperflux.opaque"]`` lists modules made leaves by the fallback.

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
    opaque: list[dict[str, str]] = []
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
                    f"torch.fx cannot trace {where}: {_short(exc)}. Hint: pass leaf_modules=(...) with the "
                    "module types or qualified names to keep opaque, or concrete_args={...} to fix the "
                    "arguments that steer Python control flow.",
                    module_path=path or "", fx_error=exc) from exc
            sub = model.get_submodule(path)
            if id(sub) in tracer.opaque_ids:  # already a leaf and still failing: give up
                raise TraceError(f"torch.fx cannot trace around module {path!r}: {_short(exc)}",
                                 module_path=path, fx_error=exc) from exc
            log.info("trace: %s (%s) is not traceable (%s); keeping it as an opaque leaf",
                     path, type(sub).__qualname__, _short(exc))
            tracer.opaque_ids.add(id(sub))
            opaque.append({"path": path, "type": f"{type(sub).__module__}.{type(sub).__qualname__}",
                           "error": _short(exc)})
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta[OPAQUE_META] = opaque
    gm.graph.lint()
    return gm


class _NodeFailure(RuntimeError):
    def __init__(self, node: fx.Node, exc: BaseException) -> None:
        super().__init__(f"at node {node.name} ({node.op} {_target_str(node)}): {_short(exc)}")


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
        why = str(exc).splitlines()[0] if isinstance(exc, _NodeFailure) else _short(exc)
        raise ExampleInputError(f"the model does not run on example inputs {shapes}: {why}. "
                                "Pass inputs of the shape the model expects (e.g. --input-shape 1,3,32,32).") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode


# -- loading model sources ------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model and what its source says about it."""

    model: nn.Module
    example_inputs: tuple[Any, ...]  # positional example inputs (batch of 2 by default)
    source: str  # what the user passed
    datasets: Callable[..., Any] | None = None  # model.py's datasets(), if any
    loss_fn: Callable[..., Any] | None = None  # model.py's loss_fn, if any
    extras: dict[str, Any] = field(default_factory=dict)


def _inputs_from_shape(shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(*shape, generator=gen),)


def _load_model_py(path: Path) -> tuple[nn.Module, tuple[Any, ...] | None, Any, Any]:
    if not path.is_file():
        raise SourceError(f"model file not found: {path}")
    mod_name = f"hyperflux_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SourceError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise SourceError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    except Exception as exc:
        raise SourceError(f"importing {path} failed: {_short(exc)}") from exc
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise SourceError(f"{path} defines no build_model(): add `def build_model() -> torch.nn.Module`")
    model = build()
    if not isinstance(model, nn.Module):
        raise SourceError(f"{path}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
    inputs = None
    if callable(getattr(module, "example_inputs", None)):
        inputs = normalize_inputs(module.example_inputs())
    return model, inputs, getattr(module, "datasets", None), getattr(module, "loss_fn", None)


def load_source(source: str, *, input_shape: Sequence[int] | None = None, weights: str | Path | None = None,
                num_classes: int | None = None) -> LoadedModel:
    """Load ``model.py`` (``build_model()``, optional ``example_inputs()``, ``datasets()``, ``loss_fn``),
    ``timm:NAME`` or ``torchvision:NAME`` (random init; nothing is downloaded).

    Args:
        source: the source string.
        input_shape: overrides the example input shape (including batch).
        weights: a state-dict file loaded with ``torch.load(weights_only=True)``.
        num_classes: classifier width for timm/torchvision models (their default when None).

    Raises:
        SourceError: with what to fix.
    """
    datasets = loss_fn = None
    if source.startswith("timm:"):
        import timm

        name = source.split(":", 1)[1]
        if name not in timm.list_models():
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise SourceError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = timm.create_model(name, pretrained=False, **kwargs)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        inputs = _inputs_from_shape((2, *size))
    elif source.startswith("torchvision:"):
        import torchvision

        name = source.split(":", 1)[1]
        available = torchvision.models.list_models()
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3)
            raise SourceError(f"unknown torchvision model {name!r}"
                              + (f"; did you mean {', '.join(close)}?" if close else ""))
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        inputs = _inputs_from_shape((2, 3, 299, 299) if name.startswith("inception") else (2, 3, 224, 224))
    else:
        model, inputs, datasets, loss_fn = _load_model_py(Path(source))
        if inputs is None and input_shape is None:
            raise SourceError(f"{source} has no example_inputs(): add one, or pass --input-shape (e.g. 2,3,32,32)")
    if input_shape is not None:
        if not all(isinstance(d, int) and d > 0 for d in input_shape):
            raise SourceError(f"input shape must be positive integers, got {tuple(input_shape)}")
        inputs = _inputs_from_shape(tuple(input_shape))
    if weights is not None:
        wpath = Path(weights)
        if not wpath.is_file():
            raise SourceError(f"weights file not found: {wpath}")
        try:
            state = torch.load(wpath, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            raise SourceError(f"cannot load weights from {wpath}: {_short(exc)}") from exc
    assert inputs is not None
    return LoadedModel(model=model, example_inputs=inputs, source=source, datasets=datasets, loss_fn=loss_fn)
