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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from hyperflux_fx.frontend.exported import export_graph
from hyperflux_fx.ir import FRONTEND_META, OPAQUE_META, TRAINING_ONLY_META, VALUE_META, EvalIdentity, is_gate_module
from hyperflux_fx.ops import function_spec, module_spec

__all__ = [
    "ExampleInputError",
    "FRONTENDS",
    "Frontend",
    "OpaqueModule",
    "TraceError",
    "TrainingOnlyCode",
    "normalize_inputs",
    "modes_restored",
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


@dataclass(frozen=True)
class Frontend:
    """Which front end captured a graph (``gm.meta[FRONTEND_META]``): "fx" (symbolic tracing) or
    "export" (torch.export), and why that one."""

    name: str
    reason: str


FRONTENDS = ("auto", "fx", "export")


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
        self.eval_identity: dict[str, nn.Module] = {}  # leaves that are the identity at eval only

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque_ids or is_gate_module(m):
            return True
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if super().is_leaf_module(m, module_qualified_name):
            return True
        if _identity_at_eval_only(m):
            self.eval_identity[module_qualified_name] = m
            return True
        return False


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


@contextmanager
def modes_restored(*modules: nn.Module) -> Iterator[None]:
    """On exit, every submodule of ``modules`` is back in the train/eval mode it had on entry."""
    modes = {m: m.training for module in modules for m in module.modules()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def short_error(exc: BaseException) -> str:
    """First line of ``type: message``, at most 300 characters."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def trace(model: nn.Module, example_inputs: Any = None, *, example_kwargs: dict[str, Any] | None = None,
          frontend: str = "auto", leaf_modules: Iterable[type | str] = (),
          concrete_args: dict[str, Any] | None = None, max_fallbacks: int = 64) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule: torch.fx symbolic tracing (untraceable submodules become
    leaves) or torch.export (docs/frontends.md).

    Args:
        model: the module to capture (a GraphModule is returned as it is).
        example_inputs: optional inputs (tensor or tuple); when given, shapes are propagated into
            ``node.meta["tensor_meta"]`` and a wrong input fails here with :class:`ExampleInputError`.
            torch.export needs them.
        example_kwargs: keyword inputs for torch.export (``{"use_cache": False}``, an attention mask);
            non-tensor ones become constants of the graph, tensors trailing positional inputs.
        frontend: "fx", "export", or "auto" (the default): symbolic tracing, and torch.export when
            tracing fails at the model's own forward or ``example_kwargs`` are given.
            ``gm.meta[FRONTEND_META]`` says which one ran and why.
        leaf_modules: module types or qualified names to keep as leaves (fx only).
        concrete_args: passed to ``torch.fx.Tracer.trace`` (fx only; e.g. to fix a flag argument).
        max_fallbacks: most submodules the fallback may turn into leaves before giving up.

    Returns:
        The GraphModule; ``gm.meta[OPAQUE_META]`` lists modules made leaves by the fallback.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``frontend``, or torch.export without example inputs.
        TraceError: no front end could capture the model.
        ExampleInputError: the captured model does not run on ``example_inputs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"hyperflux_fx.trace expects a torch.nn.Module, got {type(model).__module__}."
                        f"{type(model).__qualname__}; build the model first (e.g. model = MyNet())")
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
    inputs = normalize_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = model
        gm.meta.setdefault(OPAQUE_META, [])
    else:
        gm = _capture(model, inputs, example_kwargs, frontend, leaf_modules, concrete_args, max_fallbacks)
    if inputs:
        propagate_shapes(gm, inputs + tuple(v for v in (example_kwargs or {}).values() if isinstance(v, torch.Tensor)))
    return gm


def _capture(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, frontend: str,
             leaf_modules: Iterable[type | str], concrete_args: dict[str, Any] | None,
             max_fallbacks: int) -> fx.GraphModule:
    """The front end asked for; "auto": fx, and export when fx fails at the root or kwargs are given."""
    if frontend == "export" or (frontend == "auto" and kwargs):
        why = "asked for" if frontend == "export" else "keyword inputs were given (torch.fx takes none)"
        return _exported(model, inputs, kwargs, why, None)
    try:
        gm = _trace_with_fallback(model, leaf_modules, concrete_args, max_fallbacks)
    except TraceError as exc:
        if frontend == "fx" or exc.module_path:
            raise
        if not inputs:
            raise TraceError(f"{exc} With example_inputs, torch.export would be tried next (frontend='export').",
                             module_path="", fx_error=exc.fx_error) from exc
        return _exported(model, inputs, kwargs, f"torch.fx failed at the root ({short_error(exc.fx_error)})", exc)
    if frontend == "auto" and inputs and (leaves := _blocking_leaves(gm, inputs)):
        return _export_through_leaves(model, inputs, gm, leaves)
    gm.meta[FRONTEND_META] = Frontend("fx", "asked for" if frontend == "fx" else "symbolic tracing succeeded")
    return gm


def _blocking_leaves(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> list[str]:
    """The leaves of an fx graph that would block the channels they read: the submodules the fallback
    made opaque, and timm's no-trace layers that the op table cannot pass channels through and that
    read a tensor (MobileViT's block; not a position encoding computed from sizes alone)."""
    timm_types = _timm_notrace()[0] if "timm" in sys.modules else ()
    unknown = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(
        sub := gm.get_submodule(str(n.target)), timm_types) and getattr(module_spec(sub), "channel_rule", None) is None]
    if unknown:
        propagate_shapes(gm, inputs)
    reads_tensor = [str(n.target) for n in unknown
                    if any(hasattr(a.meta.get("tensor_meta"), "shape") for a in n.all_input_nodes)]
    return [o.path for o in gm.meta[OPAQUE_META]] + reads_tensor


def _export_through_leaves(model: nn.Module, inputs: tuple[Any, ...], fx_gm: fx.GraphModule,
                           leaves: list[str]) -> fx.GraphModule:
    """torch.export's graph where torch.fx left leaves whose channels would all block (:func:`_blocking_leaves`)
    and torch.export traces through them; else the fx graph, saying why."""
    named = ", ".join(leaves[:3]) + (", ..." if len(leaves) > 3 else "")
    try:
        return _exported(model, inputs, None, f"torch.fx left opaque leaves ({named}); torch.export traces "
                                              "through them", None)
    except TraceError as exc:
        fx_gm.meta[FRONTEND_META] = Frontend("fx", f"symbolic tracing with opaque leaves ({named}); torch.export "
                                                   f"failed too ({short_error(exc.fx_error)})")
        return fx_gm


def _exported(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, why: str,
              fx_error: TraceError | None) -> fx.GraphModule:
    """torch.export's graph of ``model`` (eval mode), its dropouts following the gated model's flag."""
    if not inputs:
        raise ValueError(f"{why}: torch.export needs example_inputs (and example_kwargs for keyword inputs)")
    try:
        with modes_restored(model):
            model.eval()
            gm = export_graph(model, inputs, kwargs)
    except Exception as exc:  # torch.export raises many types
        first = f"torch.fx cannot trace it ({short_error(fx_error.fx_error)}); " if fx_error is not None else ""
        raise TraceError(f"neither front end captures {type(model).__qualname__}: {first}torch.export cannot "
                         f"capture it ({short_error(exc)})", module_path="", fx_error=exc) from exc
    gm.training = model.training
    gm.meta[OPAQUE_META] = []
    gm.meta[TRAINING_ONLY_META] = []
    gm.meta[FRONTEND_META] = Frontend("export", why)
    _dropout_modules(gm)
    log.info("trace: %s captured with torch.export (%s)", type(model).__qualname__, why)
    gm.graph.lint()
    gm.recompile()
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
    with modes_restored(model):
        model.eval()  # the graph is the eval function (docs/gating.md, "Training-mode code")
        graph = _trace_eval(model, tracer, concrete_args, max_fallbacks, names, opaque)
        train_graph = _trace_train(model, tracer, concrete_args)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = model.training  # only its own flag: its submodules are the model's, in their own modes
    gm.meta[OPAQUE_META] = opaque
    gm.meta[TRAINING_ONLY_META] = [] if train_graph is None else _training_only(graph, train_graph, name)
    _keep_eval_identity_leaves(gm, model, tracer.eval_identity)
    _dropout_modules(gm)
    for code in gm.meta[TRAINING_ONLY_META]:
        log.warning("trace: %s", code.message)
    gm.graph.lint()
    gm.recompile()
    return gm


def _trace_eval(model: nn.Module, tracer: _Tracer, concrete_args: dict[str, Any] | None, max_fallbacks: int,
                names: dict[int, str], opaque: list[OpaqueModule]) -> fx.Graph:
    """Trace ``model`` (in eval mode), making the submodules that fail leaves (recorded in ``opaque``)."""
    while True:
        try:
            return tracer.trace(model, concrete_args=concrete_args)
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


def _trace_train(model: nn.Module, tracer: _Tracer, concrete_args: dict[str, Any] | None) -> fx.Graph | None:
    """The same trace in train mode (same leaves), to find training-only code; None if it fails."""
    model.train()
    try:
        return tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; the eval graph stands on its own
        log.warning("trace: the train-mode trace failed (%s), so code that runs only in training (dropout, drop "
                    "path, batch statistics) is not checked against the graph", short_error(exc))
        return None


@dataclass(frozen=True)
class TrainingOnlyCode:
    """Code that runs differently in train mode and is not in the (eval-mode) graph, per module
    (listed in ``gm.meta[TRAINING_ONLY_META]``)."""

    path: str  # qualified name of the innermost module ("" for the root's own forward)
    type: str  # its class
    train_only: tuple[str, ...]  # ops the train-mode trace has and the graph lacks
    eval_only: tuple[str, ...]  # ops the graph has and the train-mode trace lacks

    @property
    def message(self) -> str:
        where = f"module {self.path!r} ({self.type})" if self.path else f"the root forward ({self.type})"
        parts = [f"train mode runs {', '.join(self.train_only)}" if self.train_only else "",
                 f"eval mode runs {', '.join(self.eval_only)}" if self.eval_only else ""]
        return (f"training-only code in {where}: {'; '.join(p for p in parts if p)}. The graph is the eval "
                "function, so the gated model trains without the training-only part")


def _identity_at_eval_only(m: nn.Module) -> bool:
    """A parameterless module whose forward returns its first input in eval mode and does something
    else in train mode (drop path, stochastic depth)."""
    if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
        return False
    with modes_restored(m):
        m.eval()
        try:
            if not _returns_first_input(fx.Tracer().trace(m)):
                return False
        except Exception:  # noqa: BLE001 - not traceable alone: not one of these
            return False
        m.train()
        try:
            return not _returns_first_input(fx.Tracer().trace(m))
        except Exception:  # noqa: BLE001 - the train-mode forward does something fx cannot trace
            return True


def _returns_first_input(graph: fx.Graph) -> bool:
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return first is not None and out.args[0] is first


def _keep_eval_identity_leaves(gm: fx.GraphModule, model: nn.Module, found: dict[str, nn.Module]) -> None:
    """Wrap the eval-identity leaves in :class:`EvalIdentity` (the op table's entry for them)."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for path, module in found.items():
        if path not in called:
            continue
        parent_path, _, field = path.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        if parent_path and parent is model.get_submodule(parent_path):  # the user's own module: left alone
            continue
        wrapper = EvalIdentity(module)
        wrapper.training = module.training
        setattr(parent, field, wrapper)


def _dropout_modules(gm: fx.GraphModule) -> None:
    """``F.dropout(x, p, training=self.training)`` traced in eval mode reads ``training=False``; it
    becomes a call of the op table's module for it (``nn.Dropout(p)``), which follows the gated
    model's train/eval flag. A call without an explicit ``training=False`` is left as it is."""
    for node in list(gm.graph.nodes):
        spec = function_spec(node.target) if node.op == "call_function" else None
        if spec is None or spec.train_module is None:
            continue
        explicit = len(node.args) > spec.signature.index("training") or "training" in node.kwargs
        defaults = {"p": 0.5, "inplace": False}
        kwargs = {k: spec.arg(node, k, defaults.get(k)) for k in spec.train_args}
        if not explicit or spec.arg(node, "training") is not False or any(
                not isinstance(v, (int, float, str)) for v in kwargs.values()):
            continue
        name = node.name
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, spec.train_module(**kwargs).train(gm.training))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (spec.arg(node, "input"),))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)


def _training_only(graph: fx.Graph, train_graph: fx.Graph, root: str) -> list[TrainingOnlyCode]:
    """Per innermost module, the ops in which the eval-mode graph and the train-mode one differ
    (a dropout's ``training`` flag aside: :func:`_dropout_modules` handles it)."""
    mine, theirs = _op_counts(graph), _op_counts(train_graph)
    eval_extra, train_extra = mine - theirs, theirs - mine
    types = _module_types(graph) | _module_types(train_graph)
    out = []
    for path in sorted({k[0] for k in eval_extra + train_extra}):
        train_only = tuple(sorted({k[1] for k in train_extra if k[0] == path}))
        eval_only = tuple(sorted({k[1] for k in eval_extra if k[0] == path}))
        out.append(TrainingOnlyCode(path, types.get(path) or root, train_only, eval_only))
    return out


def _innermost(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = next(reversed(stack.values()))
    return path, getattr(cls, "__qualname__", str(cls))


def _op_counts(graph: fx.Graph) -> Counter[tuple[str, str]]:
    """(innermost module, op with its constant operands) counted over ``graph``."""
    out: Counter[tuple[str, str]] = Counter()
    for n in graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        spec = function_spec(n.target) if n.op == "call_function" else None
        flag = "training" if spec is not None and spec.train_module is not None else None
        operands = [(spec.signature[i] if spec is not None and i < len(spec.signature) else str(i), a)
                    for i, a in enumerate(n.args)] + list(n.kwargs.items())
        consts = [f"{k}={v!r}" for k, v in operands if isinstance(v, (bool, int, float, str)) and k != flag]
        target = getattr(n.target, "__name__", str(n.target))
        if n.op == "get_attr" and target.startswith("_tensor_constant"):  # numbered per trace
            target = "_tensor_constant"
        out[(_innermost(n)[0], f"{target}({', '.join(consts)})" if consts else target)] += 1
    return out


def _module_types(graph: fx.Graph) -> dict[str, str]:
    """Innermost module path -> its class name, over ``graph``'s ops."""
    return dict(_innermost(n) for n in graph.nodes if n.op not in ("placeholder", "output"))


class _NodeFailure(RuntimeError):
    def __init__(self, node: fx.Node, exc: BaseException) -> None:
        super().__init__(f"at node {node.name} ({node.op} {_target_str(node)}): {short_error(exc)}")


def _target_str(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _is_constant(value: Any) -> bool:
    """A Python scalar or a tuple of them (a size read at run time, a shape)."""
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, (bool, int, float)) for v in value)
    return isinstance(value, (bool, int, float))


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
        elif _is_constant(result):  # sizes read at run time: what an op outside the table is probed with
            n.meta[VALUE_META] = result
        n.meta["type"] = type(result)
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Run ``gm`` once on ``inputs`` (eval mode, no grad, state restored) recording ``tensor_meta``.

    Raises:
        ExampleInputError: naming the node that failed and the input shapes.
    """
    with modes_restored(gm):
        gm.eval()
        try:
            with torch.no_grad():
                _ShapeRecorder(gm).run(*inputs)
        except Exception as exc:
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
            # (fx.Interpreter appends a multi-line "While executing ..." note: keep the first line)
            why = str(exc).splitlines()[0] if isinstance(exc, _NodeFailure) else short_error(exc)
            raise ExampleInputError(f"the model does not run on example inputs {shapes}: {why}. Pass inputs "
                                    "of the shape the model expects (e.g. --input-shape 1,3,32,32).") from exc
