"""Support table of weight-consuming ops: which operand of which op is a gateable weight.

Data, not code paths: each entry names an op (function, method name or module type) and where its
weight sits, with a one-line comment. ``insert_gates`` reads these tables; an op that is not listed
is never gated, and a parameter it consumes is reported as skipped with the op's name.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "FUNCTION_WEIGHTS",
    "METHOD_WEIGHTS",
    "MODULE_WEIGHT_ATTRS",
    "PASSTHROUGH_FUNCTIONS",
    "PASSTHROUGH_METHODS",
    "WeightSlot",
    "functional_module_call",
    "gateable_module_weights",
    "never_gated_reason",
    "weight_slots",
]


@dataclass(frozen=True)
class WeightSlot:
    """Where a weight operand sits in a call: positional index and keyword name."""

    index: int  # position in node.args
    keyword: str  # name when passed as a keyword
    computed_is_skip: bool  # True: a non-parameter operand here is a weight we could not gate (report it)


_W1 = (WeightSlot(1, "weight", True),)
_MM = (WeightSlot(0, "input", False), WeightSlot(1, "other", False))

#: call_function targets -> weight slots.
FUNCTION_WEIGHTS: dict[object, tuple[WeightSlot, ...]] = {
    F.linear: _W1,  # y = x W^T + b
    torch.conv1d: _W1,  # F.conv1d is torch.conv1d
    torch.conv2d: _W1,  # F.conv2d
    torch.conv3d: _W1,  # F.conv3d
    torch.conv_transpose1d: _W1,  # F.conv_transpose1d
    torch.conv_transpose2d: _W1,  # F.conv_transpose2d
    torch.conv_transpose3d: _W1,  # F.conv_transpose3d
    torch.matmul: _MM,  # either operand may be a parameter
    operator.matmul: _MM,  # x @ W
    torch.mm: (WeightSlot(0, "input", False), WeightSlot(1, "mat2", False)),  # 2-D matmul
    torch.bmm: (WeightSlot(0, "input", False), WeightSlot(1, "mat2", False)),  # batched matmul
    torch.addmm: (WeightSlot(1, "mat1", False), WeightSlot(2, "mat2", False)),  # bias + a @ b
}

#: call_method names (args[0] is self) -> weight slots.
METHOD_WEIGHTS: dict[str, tuple[WeightSlot, ...]] = {
    "matmul": (WeightSlot(0, "self", False), WeightSlot(1, "other", False)),  # x.matmul(W)
    "mm": (WeightSlot(0, "self", False), WeightSlot(1, "mat2", False)),  # x.mm(W)
    "__matmul__": (WeightSlot(0, "self", False), WeightSlot(1, "other", False)),  # x.__matmul__(W)
}

#: Ops a parameter may pass through on its way to a weight slot: each only moves, copies or casts
#: elements (0 stays 0), so masking the parameter before them equals masking the operand after them.
PASSTHROUGH_FUNCTIONS: frozenset[object] = frozenset({
    torch.t,  # transpose of a 2-D weight
    torch.transpose,  # swap two dims
    torch.permute,  # reorder dims
    torch.reshape,  # regroup elements
    torch.flatten,  # regroup elements
    torch.squeeze,  # drop size-1 dims
    torch.unsqueeze,  # add a size-1 dim
    operator.getitem,  # static slice of a parameter (w[:, :k])
})
PASSTHROUGH_METHODS: frozenset[str] = frozenset({
    "t", "transpose", "permute", "reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze",
    "contiguous", "expand", "to", "float", "half", "bfloat16", "type_as",
})

#: Module types (isinstance) -> attribute names of their gateable weights, for module-level gating.
MODULE_WEIGHT_ATTRS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.Linear, ("weight",)),  # incl. NonDynamicallyQuantizableLinear (MHA out_proj)
    (nn.modules.conv._ConvNd, ("weight",)),  # Conv1d/2d/3d, ConvTranspose1d/2d/3d and subclasses
    (nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")),  # q/k/v
)

_CONV_FUNCS = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d, nn.Conv3d: torch.conv3d}
_CONVT_FUNCS = {nn.ConvTranspose1d: torch.conv_transpose1d, nn.ConvTranspose2d: torch.conv_transpose2d,
                nn.ConvTranspose3d: torch.conv_transpose3d}
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
)


def weight_slots(node: fx.Node) -> tuple[WeightSlot, ...]:
    """Weight slots of a call_function / call_method node (empty when the op is not in the table)."""
    if node.op == "call_function":
        return FUNCTION_WEIGHTS.get(node.target, ())
    if node.op == "call_method":
        return METHOD_WEIGHTS.get(str(node.target), ())
    return ()


def slot_value(node: fx.Node, slot: WeightSlot) -> object:
    """The argument in ``slot`` (positional or keyword), or None."""
    if slot.index < len(node.args):
        return node.args[slot.index]
    return node.kwargs.get(slot.keyword)


def functional_module_call(module: nn.Module, node: fx.Node) -> tuple[object, dict[str, object]] | None:
    """How to call a leaf conv/linear module as a function with the same result.

    Returns ``(function, constant keyword arguments besides input/weight/bias)``, or None when the
    module must be gated at module level instead (a subclass with its own forward, a padding mode
    other than zeros, an output_size argument, ...).
    """
    if len(node.args) + len(node.kwargs) != 1:
        return None
    kind = type(module)  # exact type: a subclass may override forward
    if kind is nn.Linear:
        return F.linear, {}
    if kind in _CONV_FUNCS and module.padding_mode == "zeros":
        return _CONV_FUNCS[kind], {"stride": module.stride, "padding": module.padding,
                                   "dilation": module.dilation, "groups": module.groups}
    if kind in _CONVT_FUNCS and module.padding_mode == "zeros":
        return _CONVT_FUNCS[kind], {"stride": module.stride, "padding": module.padding,
                                    "output_padding": module.output_padding, "groups": module.groups,
                                    "dilation": module.dilation}
    return None


def gateable_module_weights(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the gateable weights inside a leaf module."""
    names: list[str] = []
    for prefix, sub in module.named_modules():
        for kind, attrs in MODULE_WEIGHT_ATTRS:
            if isinstance(sub, kind):
                for attr in attrs:
                    value = sub._parameters.get(attr)
                    if isinstance(value, nn.Parameter) and not isinstance(value, nn.parameter.UninitializedParameter):
                        names.append(f"{prefix}.{attr}" if prefix else attr)
                break
    return names


def never_gated_reason(owner: nn.Module | None, attr: str) -> str | None:
    """Why a parameter is never gated by the method (HYPERFLUX.md §1), or None."""
    if attr == "bias" or attr.endswith("_bias") or attr.startswith("bias_"):
        return "bias: never gated (HYPERFLUX.md §1)"
    # Norm layers outside torch.nn (timm's LayerNorm2d, RmsNorm, ...) are recognised by name.
    if owner is not None and (isinstance(owner, _NORM_TYPES) or "Norm" in type(owner).__name__):
        return f"normalisation parameter ({type(owner).__name__}): never gated"
    if owner is not None and isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return f"embedding ({type(owner).__name__}): never gated"
    return None
