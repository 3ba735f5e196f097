"""The one op table: everything hyperflux knows about an op, in one entry per op.

Each entry (:class:`OpSpec`) says, for one function, method name or module type:

* ``kind``: what the op is (a conv, a linear, a matmul, a batch norm, an activation, ...);
* ``signature``: its positional parameter names, so every reader finds an operand by name;
* ``weights`` / ``weight_attrs``: which operands (functions, methods) or attributes (modules) may
  hold a gateable weight;
* ``channel_rule``: how channels flow through it (a :class:`ChannelRule`; the rule's code lives in
  :mod:`hyperflux_fx.analysis.coupling`); ``None`` means the op is not in the channel support table
  and blocks every channel group it touches (DESIGN.md invariant 4);
* ``macs``: its multiply-accumulate formula;
* ``zero_preserving``: f(0) = 0 for elementwise ops; ``identity_at_eval`` for dropout and friends
  (``train_module``: the module a functional dropout becomes in the trace);
* ``moves_elements`` (only moves, copies or casts elements: a weight may pass through it on its way
  to a weight operand) and ``attention_glue`` (an attention tensor may pass through it between a
  projection and the attention product);
* for modules: the functional op computing the same thing, and why their parameters are never gated.

Passes and analyses look ops up here (:func:`function_spec`, :func:`method_spec`,
:func:`module_spec`, :func:`node_spec`); no other module keeps a table of torch ops.
"""

from __future__ import annotations

import enum
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from hyperflux_fx.ir import ChannelMask, EvalIdentity, Gate, MaskedMean, MaskedNorm

__all__ = [
    "FUNCTIONS",
    "METHODS",
    "MODULES",
    "ChannelRule",
    "ModuleEntry",
    "NormOperands",
    "OpKind",
    "OpSpec",
    "WeightSlot",
    "call_spec",
    "function_spec",
    "functional_module_call",
    "gateable_module_weights",
    "is_plain_batch_norm",
    "is_weight_module",
    "method_spec",
    "module_macs",
    "module_spec",
    "never_gated_reason",
    "node_spec",
    "norm_function",
    "cut_function",
    "gather_function",
    "norm_operands",
    "slot_value",
    "sync_module_sizes",
    "weight_slots",
]

OpKind = Literal[
    "conv", "conv_transpose", "linear",  # weight ops: a new channel space on their output
    "matmul", "mm",  # products (matmul/bmm/einsum may be batched; mm/addmm are 2-D)
    "attention",  # scaled_dot_product_attention, nn.MultiheadAttention
    "batch_norm", "norm", "embedding",  # per-channel statistics; other normalisations; look-ups
    "elementwise", "binary", "softmax", "reduce", "pool",  # value ops
    "shape", "cat", "index",  # moving ops: reshape/permute/..., concatenation, indexing and splitting
    "gate",  # hyperflux's own modules
    "check",  # run-time checks torch.export inserts (no output): the export front end drops them
]


class ChannelRule(enum.Enum):
    """How channel labels flow through an op; implemented in :mod:`hyperflux_fx.analysis.coupling`."""

    CONV = "conv"  # functional conv: input consumed, output a new space (depthwise: passes through)
    CONV_TRANSPOSE = "conv_transpose"  # functional transposed conv: as conv, weight dims swapped
    LINEAR = "linear"  # functional linear: last dim consumed and produced
    MM = "mm"  # x @ W (+ b) with W (in, out) a parameter: as linear, the weight's dims swapped
    CONV_MODULE = "conv_module"  # a plain nn.ConvNd leaf (zeros padding)
    LINEAR_MODULE = "linear_module"  # a plain nn.Linear leaf
    BATCH_NORM = "batch_norm"  # F.batch_norm: per-channel, its statistics sliced
    BATCH_NORM_MODULE = "batch_norm_module"  # a BatchNorm leaf
    NORM = "norm"  # LayerNorm / RMSNorm over the last dim: over the channels mask-aware, else per channel
    ELEMENTWISE = "elementwise"  # per element: label passes; zeros revived unless zero_preserving
    ADD = "add"  # two labels are tied; a broadcast operand must be per-channel sliceable
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    WHERE = "where"  # where(condition, x, y): x and y as add's operands, the condition broadcast
    CAT = "cat"  # offsets along the channel dim, or a tie along another dim
    RESHAPE = "reshape"  # flatten C*H*W (each channel owns H*W features), or a split into heads
    SHAPE_OF = "shape_of"  # view_as / reshape_as: the other tensor's shape; equal shapes tie the two labels
    PERMUTE = "permute"  # moves the channel dim
    TRANSPOSE = "transpose"  # swaps two dims
    REDUCE = "reduce"  # fine unless it reduces the channel dim
    SPATIAL = "spatial"  # pooling/interpolation: channels untouched
    GETITEM = "getitem"  # the channel dim must be taken whole
    UNSQUEEZE = "unsqueeze"  # a size-1 dim inserted: the label's dim shifts
    EXPAND = "expand"  # broadcasts size-1 dims: the label passes, its written size follows the width
    SLICE = "slice"  # aten.slice(x, dim, start, end, step): as getitem with one slice on dim
    SELECT = "select"  # aten.select(x, dim, index): as getitem with one integer on dim
    EMBEDDING = "embedding"  # a look-up: its output's last dim is a new space, the table's columns
    SOFTMAX = "softmax"  # fine unless over the channels
    ATTENTION = "attention"  # a head label on q, k and v passes to the output
    MATMUL = "matmul"  # q @ k^T / attn @ v: a head label on a batch dim passes
    UNBIND = "unbind"  # items keep the label (dim shifted)
    SPLIT = "split"  # split / chunk / narrow: on the channel dim, runs of channels (a space cut where needed)
    ADDCMUL = "addcmul"  # input + value * tensor1 * tensor2: the three tied or broadcast, as add and mul
    GLU = "glu"  # a * sigmoid(b), the halves of a dim: over the channels, the halves cut apart and tied
    SHIFT = "shift"  # roll / flip / pad along other dims: channels untouched (pad: revived by a non-zero value)
    BLOCK = "block"  # mixes the channels: blocks them with the entry's block_reason
    NO_CHANNELS = "no_channels"  # its output carries no channels (shape reads, weight gates)


@dataclass(frozen=True)
class WeightSlot:
    """Where a weight operand sits in a call: positional index and keyword name."""

    index: int  # position in node.args
    keyword: str  # name when passed as a keyword
    computed_is_skip: bool  # True: a non-parameter operand here is a weight we could not gate (report it)


MacFormula = Callable[..., int]  # functions/methods: (args, kwargs, out); modules: (module, args, out)


@dataclass(frozen=True)
class OpSpec:
    """Everything known about one op (see the module docstring)."""

    name: str  # for reports
    kind: OpKind
    signature: tuple[str, ...] = ()  # positional parameter names (methods start with "self")
    weights: tuple[str, ...] = ()  # operands (by signature name) that may be a gateable weight
    weights_must_be_params: bool = False  # a computed operand in a weight slot is reported as skipped
    weight_attrs: tuple[str, ...] = ()  # modules: attribute names of gateable weights
    channel_rule: ChannelRule | None = None  # None: not in the channel support table (blocks)
    block_reason: str = ""  # with ChannelRule.BLOCK: why
    macs: MacFormula | None = None
    zero_preserving: bool | None = None  # f(0) == 0 (elementwise ops)
    identity_at_eval: bool = False  # dropout and friends
    moves_elements: bool = False  # only moves/copies/casts elements (a weight may pass through)
    attention_glue: bool = False  # an attention tensor may pass through (scaling, masking, splitting)
    explicit_sizes: bool = False  # reshape/view: size arguments that must follow a deleted dim's width
    functional: Callable[..., Any] | None = None  # modules: the function computing the same thing
    functional_kwargs: tuple[str, ...] = ()  # modules: attributes passed to it after input/weight/bias
    never_gated: str | None = None  # modules: why their parameters are never gated
    train_module: type[nn.Module] | None = None  # functional dropouts: the module doing it at the model's flag
    train_args: tuple[str, ...] = ("p", "inplace")  # the constant arguments train_module is built from
    norm_kind: Literal["layer", "rms", "group"] | None = None  # norm entries: which statistics
    reads_sizes: bool = False  # x.size() / getattr(x, "shape"): a tensor's sizes, read at run time
    keeps_dims: bool = False  # moves elements keeping every dim where it is (expand, casts): broadcasts alike

    @property
    def slots(self) -> tuple[WeightSlot, ...]:
        """The weight operands as (index, keyword) slots."""
        return tuple(WeightSlot(self.signature.index(w), w, self.weights_must_be_params) for w in self.weights)

    def arg(self, node: fx.Node, name: str, default: Any = None) -> Any:
        """The operand called ``name`` in the signature, positional or keyword."""
        return _arg(node.args, node.kwargs, self.signature, name, default)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], signature: tuple[str, ...], name: str,
         default: Any = None) -> Any:
    i = signature.index(name)
    return args[i] if i < len(args) else kwargs.get(name, default)


# -- MAC formulas -----------------------------------------------------------------------------------
# A conv's MACs: every output element sums in_channels/groups x kernel products (weight.shape[1] is
# already in/groups); a transposed conv scatters every input element into out/groups x kernel.

def _conv_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> int:
    w = _arg(args, kwargs, _CONV_SIG, "weight")
    return out.numel() * w.shape[1] * math.prod(w.shape[2:])


def _conv_t_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> int:
    w = _arg(args, kwargs, _CONV_T_SIG, "weight")
    return args[0].numel() * w.shape[1] * math.prod(w.shape[2:])


def _linear_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> int:
    return out.numel() * _arg(args, kwargs, _LINEAR_SIG, "weight").shape[1]


def _product_macs(operand: int) -> MacFormula:
    """out.numel() x the contracted size, read off the last dim of operand ``operand``."""
    def macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> int:
        return out.numel() * args[operand].shape[-1]
    return macs


def _einsum_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> int:
    """Product of the sizes of every index (each output element sums over the others). The dims an
    ellipsis stands for are indices too, aligned from the right and broadcast across operands."""
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    sizes: dict[str, int] = {}
    for spec, t in zip(equation.replace(" ", "").split("->")[0].split(","), operands, strict=False):
        if not isinstance(t, torch.Tensor):
            return 0
        letters: list[str] = list(spec)
        if "..." in spec:
            head, tail = spec.split("...")
            n = t.dim() - len(head) - len(tail)
            letters = [*head, *(f"...{n - i}" for i in range(n)), *tail]  # ...k: the k-th ellipsis dim from the right
        for letter, size in zip(letters, t.shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return math.prod(sizes.values()) if len(operands) > 1 else 0


def _sdpa_macs(args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> int:
    q, k = _arg(args, kwargs, _SDPA_SIG, "query"), _arg(args, kwargs, _SDPA_SIG, "key")
    return (q.numel() + out.numel()) * k.shape[-2]  # q k^T over q's head dim, attn v over v's (they may differ)


def _conv_module_macs(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> int:
    rows = args[0].numel() if mod.transposed else out.numel()
    return rows * mod.weight.shape[1] * math.prod(mod.weight.shape[2:])


def _linear_module_macs(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> int:
    return out.numel() * mod.in_features


def _mha_macs(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> int:
    q, k = args[0], args[1]
    e = mod.embed_dim
    lq, lk = q.numel() // e, k.numel() // e
    return (lq + 2 * lk) * e * e + lq * e * e + 2 * lq * (k.shape[-2] if k.dim() == 3 else 1) * e


# -- functions --------------------------------------------------------------------------------------

_CONV_SIG = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_SIG = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_LINEAR_SIG = ("input", "weight", "bias")
_SDPA_SIG = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_BN_SIG = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BINARY_SIG = ("input", "other")
_LAYER_NORM_SIG = ("input", "normalized_shape", "weight", "bias", "eps")
_RMS_NORM_SIG = ("input", "normalized_shape", "weight", "eps")
_REDUCE_SIG = ("input", "dim", "keepdim")


def _conv(name: str) -> OpSpec:
    return OpSpec(name, "conv", _CONV_SIG, weights=("weight",), weights_must_be_params=True,
                  channel_rule=ChannelRule.CONV, macs=_conv_macs)


def _conv_t(name: str) -> OpSpec:
    return OpSpec(name, "conv_transpose", _CONV_T_SIG, weights=("weight",), weights_must_be_params=True,
                  channel_rule=ChannelRule.CONV_TRANSPOSE, macs=_conv_t_macs)


def _product(name: str, kind: OpKind, signature: tuple[str, ...], weights: tuple[str, ...], operand: int,
             rule: ChannelRule | None = None) -> OpSpec:
    return OpSpec(name, kind, signature, weights=weights, channel_rule=rule, macs=_product_macs(operand))


def _act(name: str, zero: bool, *, eval_identity: bool = False) -> OpSpec:
    return OpSpec(name, "elementwise", ("input",), channel_rule=ChannelRule.ELEMENTWISE, zero_preserving=zero,
                  identity_at_eval=eval_identity, attention_glue=eval_identity)


_DROPOUT_SIG = ("input", "p", "training", "inplace")


def _dropout(module: type[nn.Module]) -> OpSpec:
    """A functional dropout: zero-preserving, identity at eval, and done by ``module`` following the
    model's train/eval flag (the trace turns ``F.dropout(x, p, training=self.training)``, traced in
    eval mode, into a call of ``module(p)``)."""
    return OpSpec(module.__name__.lower(), "elementwise", _DROPOUT_SIG, channel_rule=ChannelRule.ELEMENTWISE,
                  zero_preserving=True, identity_at_eval=True, attention_glue=True, train_module=module)


def _stochastic_depth() -> dict[Any, OpSpec]:
    """torchvision's ``stochastic_depth(x, p, mode, training)`` (drop path): as a functional dropout, done
    by ``torchvision.ops.StochasticDepth(p, mode)`` (empty when torchvision is missing)."""
    try:
        import torchvision.ops
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return {}
    spec = OpSpec("stochastic_depth", "elementwise", ("input", "p", "mode", "training"),
                  channel_rule=ChannelRule.ELEMENTWISE, zero_preserving=True, identity_at_eval=True,
                  attention_glue=True, train_module=torchvision.ops.StochasticDepth, train_args=("p", "mode"))
    return {torchvision.ops.stochastic_depth: spec}


def _binary(name: str, rule: ChannelRule, signature: tuple[str, ...] = _BINARY_SIG) -> OpSpec:
    return OpSpec(name, "binary", signature, channel_rule=rule, attention_glue=rule in (ChannelRule.MUL,
                                                                                         ChannelRule.DIV))


def _moving(name: str, rule: ChannelRule | None, signature: tuple[str, ...] = ("input",), *,
            sizes: bool = False) -> OpSpec:
    return OpSpec(name, "shape", signature, channel_rule=rule, moves_elements=True, explicit_sizes=sizes)


def _spatial(name: str) -> OpSpec:
    return OpSpec(name, "pool", ("input",), channel_rule=ChannelRule.SPATIAL)


_GLU = OpSpec("glu", "elementwise", ("input", "dim"), channel_rule=ChannelRule.GLU, zero_preserving=True)
_SOFTMAX = OpSpec("softmax", "softmax", ("input", "dim"), channel_rule=ChannelRule.SOFTMAX, attention_glue=True)
_SPLIT = OpSpec("split", "index", ("input", "split_size_or_sections", "dim"), channel_rule=ChannelRule.SPLIT,
                attention_glue=True)
_CHUNK = OpSpec("chunk", "index", ("input", "chunks", "dim"), channel_rule=ChannelRule.SPLIT, attention_glue=True)
_NARROW = OpSpec("narrow", "index", ("input", "dim", "start", "length"), channel_rule=ChannelRule.SPLIT)

_INDEX_SELECT = OpSpec("index_select", "shape", ("input", "dim", "index"), channel_rule=ChannelRule.BLOCK,
                       block_reason="index_select takes channels by index (a folded channel shuffle)")

#: call_function target -> spec. One line per op; the comment says what it contributes.
FUNCTIONS: dict[Any, OpSpec] = {
    torch.conv1d: _conv("conv1d"),  # F.conv1d is torch.conv1d
    torch.conv2d: _conv("conv2d"),  # F.conv2d
    torch.conv3d: _conv("conv3d"),  # F.conv3d
    torch.conv_transpose1d: _conv_t("conv_transpose1d"),  # F.conv_transpose1d
    torch.conv_transpose2d: _conv_t("conv_transpose2d"),  # F.conv_transpose2d
    torch.conv_transpose3d: _conv_t("conv_transpose3d"),  # F.conv_transpose3d
    F.linear: OpSpec("linear", "linear", _LINEAR_SIG, weights=("weight",), weights_must_be_params=True,
                     channel_rule=ChannelRule.LINEAR, macs=_linear_macs),  # y = x W^T + b
    torch.matmul: _product("matmul", "matmul", _BINARY_SIG, _BINARY_SIG, 0, ChannelRule.MATMUL),  # either operand
    operator.matmul: _product("matmul", "matmul", _BINARY_SIG, _BINARY_SIG, 0, ChannelRule.MATMUL),  # x @ W
    torch.mm: _product("mm", "mm", ("input", "mat2"), ("input", "mat2"), 0, ChannelRule.MM),  # x @ W
    torch.bmm: _product("bmm", "matmul", ("input", "mat2"), ("input", "mat2"), 0),  # batched matmul
    torch.addmm: _product("addmm", "mm", ("input", "mat1", "mat2"), ("mat1", "mat2"), 1,
                          ChannelRule.MM),  # bias + x @ W (GPT-2's Conv1D)
    torch.baddbmm: _product("baddbmm", "matmul", ("input", "batch1", "batch2"), ("batch1", "batch2"), 1),  # batched
    torch.einsum: OpSpec("einsum", "matmul", ("equation",), macs=_einsum_macs),  # any contraction
    F.scaled_dot_product_attention: OpSpec("scaled_dot_product_attention", "attention", _SDPA_SIG,
                                           channel_rule=ChannelRule.ATTENTION, macs=_sdpa_macs),  # heads independent
    F.batch_norm: OpSpec("batch_norm", "batch_norm", _BN_SIG, channel_rule=ChannelRule.BATCH_NORM),  # per channel
    F.layer_norm: OpSpec("layer_norm", "norm", _LAYER_NORM_SIG, channel_rule=ChannelRule.NORM,
                         norm_kind="layer"),  # over the channels: mask-aware statistics, affine sliced
    F.rms_norm: OpSpec("rms_norm", "norm", _RMS_NORM_SIG, channel_rule=ChannelRule.NORM,
                       norm_kind="rms"),  # as layer_norm, without the mean
    F.group_norm: OpSpec("group_norm", "norm", ("input", "num_groups", "weight", "bias", "eps"),
                         channel_rule=ChannelRule.NORM, norm_kind="group"),  # per group, mask-aware, as layer_norm
    operator.add: _binary("add", ChannelRule.ADD), torch.add: _binary("add", ChannelRule.ADD),  # tie
    operator.sub: _binary("sub", ChannelRule.SUB), torch.sub: _binary("sub", ChannelRule.SUB),  # tie
    operator.mul: _binary("mul", ChannelRule.MUL), torch.mul: _binary("mul", ChannelRule.MUL),  # x * s(x) keeps zeros
    operator.truediv: _binary("div", ChannelRule.DIV), torch.div: _binary("div", ChannelRule.DIV),  # tie
    torch.cat: OpSpec("cat", "cat", ("tensors", "dim"), channel_rule=ChannelRule.CAT),  # offsets or tie
    torch.where: OpSpec("where", "binary", ("condition", "input", "other"),
                        channel_rule=ChannelRule.WHERE),  # an add of the two values, the condition broadcast
    torch.concat: OpSpec("cat", "cat", ("tensors", "dim"), channel_rule=ChannelRule.CAT),  # alias of cat
    torch.flatten: _moving("flatten", ChannelRule.RESHAPE),  # C*H*W: each channel owns H*W features
    torch.reshape: _moving("reshape", ChannelRule.RESHAPE, ("input", "shape"), sizes=True),  # keep/flatten/heads
    torch.permute: _moving("permute", ChannelRule.PERMUTE, ("input", "dims")),  # move the channel dim
    torch.transpose: _moving("transpose", ChannelRule.TRANSPOSE, ("input", "dim0", "dim1")),  # swap two dims
    torch.t: _moving("t", None),  # transpose of a 2-D weight
    torch.squeeze: _moving("squeeze", None),  # drop size-1 dims
    torch.unsqueeze: _moving("unsqueeze", ChannelRule.UNSQUEEZE, ("input", "dim")),  # add a size-1 dim
    operator.getitem: OpSpec("getitem", "index", ("input", "index"), channel_rule=ChannelRule.GETITEM,
                             moves_elements=True, attention_glue=True),  # whole channel dim kept; w[:, :k] moves
    torch.unbind: OpSpec("unbind", "index", ("input", "dim"), channel_rule=ChannelRule.UNBIND,
                         attention_glue=True),  # items keep the label
    torch.chunk: _CHUNK,  # on the channels: runs of them (a producer's space cut there); q, k, v = x.chunk(3)
    torch.split: _SPLIT,  # as chunk
    torch.narrow: _NARROW,  # as chunk, one piece
    torch.mean: OpSpec("mean", "reduce", _REDUCE_SIG, channel_rule=ChannelRule.REDUCE),  # unless over channels
    torch.sum: OpSpec("sum", "reduce", _REDUCE_SIG, channel_rule=ChannelRule.REDUCE),  # unless over channels
    torch.amax: OpSpec("amax", "reduce", _REDUCE_SIG, channel_rule=ChannelRule.REDUCE),  # unless over channels
    F.softmax: _SOFTMAX,  # blocks only a softmax over the channels
    torch.softmax: _SOFTMAX,  # as F.softmax
    F.adaptive_avg_pool1d: _spatial("adaptive_avg_pool1d"),  # spatial
    F.adaptive_avg_pool2d: _spatial("adaptive_avg_pool2d"),  # spatial
    F.adaptive_avg_pool3d: _spatial("adaptive_avg_pool3d"),  # spatial
    F.avg_pool1d: _spatial("avg_pool1d"), F.avg_pool2d: _spatial("avg_pool2d"),  # spatial
    F.avg_pool3d: _spatial("avg_pool3d"),  # spatial
    F.max_pool1d: _spatial("max_pool1d"), F.max_pool2d: _spatial("max_pool2d"),  # spatial
    F.max_pool3d: _spatial("max_pool3d"),  # spatial
    F.adaptive_max_pool2d: _spatial("adaptive_max_pool2d"),  # spatial
    F.interpolate: _spatial("interpolate"),  # spatial resampling
    torch.addcmul: OpSpec("addcmul", "binary", ("input", "tensor1", "tensor2", "value"),
                          channel_rule=ChannelRule.ADDCMUL),  # GRN's bias + weight * x
    torch.roll: OpSpec("roll", "shape", ("input", "shifts", "dims"), channel_rule=ChannelRule.SHIFT),  # shifted windows
    torch.index_select: _INDEX_SELECT,  # a folded channel shuffle's gather
    torch.flip: OpSpec("flip", "shape", ("input", "dims"), channel_rule=ChannelRule.SHIFT),  # along other dims
    F.pad: OpSpec("pad", "shape", ("input", "pad", "mode", "value"), channel_rule=ChannelRule.SHIFT),  # other dims
    getattr: OpSpec("getattr", "shape", channel_rule=ChannelRule.NO_CHANNELS,
                    reads_sizes=True),  # x.shape: read at run time
    # activations: f(0) = 0 keeps a deleted channel exactly zero; f(0) != 0 revives it
    F.relu: _act("relu", True), torch.relu: _act("relu", True), F.relu6: _act("relu6", True),
    F.glu: _GLU,  # gated linear unit over a dim (the channels: two tied halves)
    F.gelu: _act("gelu", True), F.silu: _act("silu", True), F.hardswish: _act("hardswish", True),
    F.hardtanh: _act("hardtanh", True), F.leaky_relu: _act("leaky_relu", True), F.elu: _act("elu", True),
    F.mish: _act("mish", True), torch.tanh: _act("tanh", True), F.tanh: _act("tanh", True),
    F.celu: _act("celu", True), F.selu: _act("selu", True),
    F.dropout: _dropout(nn.Dropout), F.dropout1d: _dropout(nn.Dropout1d), F.dropout2d: _dropout(nn.Dropout2d),
    F.dropout3d: _dropout(nn.Dropout3d), F.alpha_dropout: _dropout(nn.AlphaDropout),
    F.feature_alpha_dropout: _dropout(nn.FeatureAlphaDropout),  # identity at eval; the trace makes them modules
    torch.sigmoid: _act("sigmoid", False), F.sigmoid: _act("sigmoid", False),
    F.hardsigmoid: _act("hardsigmoid", False), F.softplus: _act("softplus", False),
    **_stochastic_depth(),  # torchvision drop path: identity at eval, StochasticDepth in training
}


def _method_moving(name: str, rule: ChannelRule | None, *, sizes: bool = False, keeps_dims: bool = False) -> OpSpec:
    return OpSpec(name, "shape", ("self",), channel_rule=rule, moves_elements=True, explicit_sizes=sizes,
                  keeps_dims=keeps_dims)


def _method_act(name: str, zero: bool, *, moves: bool = False) -> OpSpec:
    return OpSpec(name, "elementwise", ("self",), channel_rule=ChannelRule.ELEMENTWISE, zero_preserving=zero,
                  moves_elements=moves, keeps_dims=moves)


_METHOD_BINARY_SIG = ("self", "other")
_METHOD_MATMUL = _product("matmul", "matmul", _METHOD_BINARY_SIG, _METHOD_BINARY_SIG, 0, ChannelRule.MATMUL)
_METHOD_SPLIT = OpSpec("split", "index", ("self", "split_size", "dim"), channel_rule=ChannelRule.SPLIT,
                       attention_glue=True)
_METHOD_CHUNK = OpSpec("chunk", "index", ("self", "chunks", "dim"), channel_rule=ChannelRule.SPLIT,
                       attention_glue=True)

#: call_method name (args[0] is self) -> spec.
METHODS: dict[str, OpSpec] = {
    "matmul": _METHOD_MATMUL,  # x.matmul(W); head label on a batch dim
    "__matmul__": _METHOD_MATMUL,  # x.__matmul__(W)
    "mm": _product("mm", "mm", ("self", "mat2"), ("self", "mat2"), 0),  # x.mm(W)
    "bmm": _product("bmm", "matmul", ("self", "mat2"), ("self", "mat2"), 0),  # x.bmm(W), batched
    "add": _binary("add", ChannelRule.ADD, _METHOD_BINARY_SIG),  # tie
    "sub": _binary("sub", ChannelRule.SUB, _METHOD_BINARY_SIG),  # tie
    "mul": _binary("mul", ChannelRule.MUL, _METHOD_BINARY_SIG),  # tie
    "div": _binary("div", ChannelRule.DIV, _METHOD_BINARY_SIG),  # tie
    "relu": _method_act("relu", True), "relu_": _method_act("relu_", True),  # f(0) = 0
    "tanh": _method_act("tanh", True),  # f(0) = 0
    "sigmoid": _method_act("sigmoid", False), "exp": _method_act("exp", False),  # f(0) != 0
    "contiguous": _method_act("contiguous", True, moves=True),  # same values
    "clone": _method_act("clone", True),  # same values
    "float": _method_act("float", True, moves=True),  # cast: zero stays zero
    "half": _method_moving("half", None, keeps_dims=True),  # cast
    "bfloat16": _method_moving("bfloat16", None, keeps_dims=True),  # cast
    "to": _method_moving("to", None, keeps_dims=True), "type_as": _method_moving("type_as", None, keeps_dims=True),
    "flatten": _method_moving("flatten", ChannelRule.RESHAPE),  # see ChannelRule.RESHAPE
    "view": _method_moving("view", ChannelRule.RESHAPE, sizes=True),  # explicit sizes
    "reshape": _method_moving("reshape", ChannelRule.RESHAPE, sizes=True),  # explicit sizes
    "view_as": OpSpec("view_as", "shape", ("self", "other"), channel_rule=ChannelRule.SHAPE_OF,
                      moves_elements=True),  # the other's shape: tied to it
    "reshape_as": OpSpec("reshape_as", "shape", ("self", "other"), channel_rule=ChannelRule.SHAPE_OF,
                         moves_elements=True),  # as view_as
    "unflatten": _method_moving("unflatten", None),  # moves (weights)
    "expand": _method_moving("expand", ChannelRule.EXPAND, keeps_dims=True),  # broadcasts (a class token per sample)
    "squeeze": _method_moving("squeeze", None),  # drops size-1 dims
    "unsqueeze": _method_moving("unsqueeze", ChannelRule.UNSQUEEZE),  # adds a size-1 dim
    "t": _method_moving("t", None),  # 2-D transpose of a weight
    "permute": _method_moving("permute", ChannelRule.PERMUTE),  # move the channel dim
    "transpose": OpSpec("transpose", "shape", ("self", "dim0", "dim1"), channel_rule=ChannelRule.TRANSPOSE,
                        moves_elements=True),  # swap two dims
    "mean": OpSpec("mean", "reduce", ("self", "dim", "keepdim"), channel_rule=ChannelRule.REDUCE),
    "sum": OpSpec("sum", "reduce", ("self", "dim", "keepdim"), channel_rule=ChannelRule.REDUCE),
    "amax": OpSpec("amax", "reduce", ("self", "dim", "keepdim"), channel_rule=ChannelRule.REDUCE),
    "softmax": OpSpec("softmax", "softmax", ("self", "dim"), channel_rule=ChannelRule.SOFTMAX,
                      attention_glue=True),  # blocks only a softmax over the channels
    "unbind": OpSpec("unbind", "index", ("self", "dim"), channel_rule=ChannelRule.UNBIND,
                     attention_glue=True),  # items keep the label
    "chunk": _METHOD_CHUNK, "split": _METHOD_SPLIT,  # as torch.chunk / torch.split
    "addcmul": OpSpec("addcmul", "binary", ("self", "tensor1", "tensor2", "value"),
                      channel_rule=ChannelRule.ADDCMUL),  # as torch.addcmul
    "roll": OpSpec("roll", "shape", ("self", "shifts", "dims"), channel_rule=ChannelRule.SHIFT),  # as torch.roll
    "flip": OpSpec("flip", "shape", ("self", "dims"), channel_rule=ChannelRule.SHIFT),  # as torch.flip
    "narrow": OpSpec("narrow", "index", ("self", "dim", "start", "length"), channel_rule=ChannelRule.SPLIT),
    "size": OpSpec("size", "shape", channel_rule=ChannelRule.NO_CHANNELS, reads_sizes=True),  # read at run time
    "dim": OpSpec("dim", "shape", channel_rule=ChannelRule.NO_CHANNELS),  # read at run time
}


# -- ATen overloads (the export front end) ----------------------------------------------------------
# A graph from torch.export calls ATen overloads. Each is one of the ops above under another name: its
# entry is that op's spec, with the operand names read off the overload's schema ("self" -> "input",
# dropout's "train" -> "training"). Elementwise maths without an entry here (pow, rsqrt, neg, cos, ...)
# is probed like any op outside the table.

_aten = torch.ops.aten
_RENAMED_OPERANDS = {"self": "input", "train": "training"}


def _overload(op: Any, like: OpSpec) -> OpSpec:
    """``like`` under the operand names of ATen overload ``op``."""
    return replace(like, signature=tuple(_RENAMED_OPERANDS.get(a.name, a.name) for a in op._schema.arguments))


_CAST = _method_act("cast", True, moves=True)  # dtype/device copies: zero stays zero
_ALIAS = _method_act("alias", True, moves=True)  # the same values
_SLICE = OpSpec("slice", "index", channel_rule=ChannelRule.SLICE, moves_elements=True, attention_glue=True)
_SELECT = OpSpec("select", "index", channel_rule=ChannelRule.SELECT, moves_elements=True, attention_glue=True)
_EMBEDDING = OpSpec("embedding", "embedding", channel_rule=ChannelRule.EMBEDDING)
_CHECK = OpSpec("check", "check", channel_rule=ChannelRule.NO_CHANNELS)
_SYM_SIZE = OpSpec("sym_size", "shape", channel_rule=ChannelRule.NO_CHANNELS, reads_sizes=True)

#: ATen overload -> the spec of the op it is (its operand names follow in FUNCTIONS, below).
_ATEN_LIKE: dict[Any, OpSpec] = {
    _aten.linear.default: FUNCTIONS[F.linear], _aten.batch_norm.default: FUNCTIONS[F.batch_norm],
    _aten.conv1d.default: FUNCTIONS[torch.conv1d], _aten.conv2d.default: FUNCTIONS[torch.conv2d],
    _aten.conv3d.default: FUNCTIONS[torch.conv3d],
    _aten.conv_transpose1d.default: FUNCTIONS[torch.conv_transpose1d],
    _aten.conv_transpose2d.input: FUNCTIONS[torch.conv_transpose2d],
    _aten.conv_transpose3d.input: FUNCTIONS[torch.conv_transpose3d],
    _aten.matmul.default: FUNCTIONS[torch.matmul], _aten.mm.default: FUNCTIONS[torch.mm],
    _aten.bmm.default: FUNCTIONS[torch.bmm], _aten.addmm.default: FUNCTIONS[torch.addmm],
    _aten.baddbmm.default: FUNCTIONS[torch.baddbmm],
    _aten.scaled_dot_product_attention.default: FUNCTIONS[F.scaled_dot_product_attention],
    _aten.layer_norm.default: FUNCTIONS[F.layer_norm], _aten.rms_norm.default: FUNCTIONS[F.rms_norm],
    _aten.group_norm.default: FUNCTIONS[F.group_norm],
    _aten.embedding.default: _EMBEDDING,
    _aten.add.Tensor: FUNCTIONS[torch.add], _aten.sub.Tensor: FUNCTIONS[torch.sub],
    _aten.mul.Tensor: FUNCTIONS[torch.mul], _aten.div.Tensor: FUNCTIONS[torch.div],
    _aten.addcmul.default: FUNCTIONS[torch.addcmul], _aten.glu.default: _GLU, _aten.where.self: FUNCTIONS[torch.where],
    _aten.where.ScalarOther: FUNCTIONS[torch.where], _aten.where.ScalarSelf: FUNCTIONS[torch.where],
    _aten.cat.default: FUNCTIONS[torch.cat],
    _aten.flatten.using_ints: FUNCTIONS[torch.flatten],
    _aten.view.default: FUNCTIONS[torch.reshape], _aten.reshape.default: FUNCTIONS[torch.reshape],
    _aten._unsafe_view.default: FUNCTIONS[torch.reshape],
    _aten.permute.default: FUNCTIONS[torch.permute], _aten.transpose.int: FUNCTIONS[torch.transpose],
    _aten.t.default: FUNCTIONS[torch.t],
    _aten.unsqueeze.default: FUNCTIONS[torch.unsqueeze], _aten.squeeze.dim: FUNCTIONS[torch.squeeze],
    _aten.squeeze.dims: FUNCTIONS[torch.squeeze],
    _aten.expand.default: METHODS["expand"],
    _aten.clone.default: _ALIAS, _aten.alias.default: _ALIAS, _aten.contiguous.default: _ALIAS,
    _aten.to.dtype: _CAST, _aten.to.dtype_layout: _CAST, _aten.to.device: _CAST, _aten._to_copy.default: _CAST,
    _aten.type_as.default: _CAST,  # the other operand gives only its dtype
    _aten.slice.Tensor: _SLICE, _aten.select.int: _SELECT,
    _aten.split.Tensor: _SPLIT, _aten.split_with_sizes.default: _SPLIT, _aten.chunk.default: _CHUNK,
    _aten.narrow.default: _NARROW, _aten.unbind.int: FUNCTIONS[torch.unbind],
    _aten.mean.dim: FUNCTIONS[torch.mean], _aten.sum.dim_IntList: FUNCTIONS[torch.sum],
    _aten.amax.default: FUNCTIONS[torch.amax],
    _aten.softmax.int: _SOFTMAX, _aten._softmax.default: _SOFTMAX,
    _aten.index_select.default: _INDEX_SELECT,
    _aten.roll.default: FUNCTIONS[torch.roll], _aten.flip.default: FUNCTIONS[torch.flip],
    _aten.pad.default: FUNCTIONS[F.pad], _aten.constant_pad_nd.default: FUNCTIONS[F.pad],
    _aten.adaptive_avg_pool1d.default: FUNCTIONS[F.adaptive_avg_pool1d],
    _aten.adaptive_avg_pool2d.default: FUNCTIONS[F.adaptive_avg_pool2d],
    _aten.avg_pool2d.default: FUNCTIONS[F.avg_pool2d], _aten.max_pool2d.default: FUNCTIONS[F.max_pool2d],
    _aten.relu.default: FUNCTIONS[F.relu], _aten.gelu.default: FUNCTIONS[F.gelu], _aten.silu.default: FUNCTIONS[F.silu],
    _aten.tanh.default: FUNCTIONS[torch.tanh], _aten.hardswish.default: FUNCTIONS[F.hardswish],
    _aten.hardtanh.default: FUNCTIONS[F.hardtanh], _aten.leaky_relu.default: FUNCTIONS[F.leaky_relu],
    _aten.elu.default: FUNCTIONS[F.elu], _aten.mish.default: FUNCTIONS[F.mish],
    _aten.sigmoid.default: FUNCTIONS[torch.sigmoid], _aten.hardsigmoid.default: FUNCTIONS[F.hardsigmoid],
    _aten.relu_.default: FUNCTIONS[F.relu], _aten.silu_.default: FUNCTIONS[F.silu],  # in place (export's
    _aten.hardswish_.default: FUNCTIONS[F.hardswish], _aten.hardtanh_.default: FUNCTIONS[F.hardtanh],  # graph of
    _aten.leaky_relu_.default: FUNCTIONS[F.leaky_relu], _aten.sigmoid_.default: FUNCTIONS[torch.sigmoid],  # timm's
    _aten.hardsigmoid_.default: FUNCTIONS[F.hardsigmoid],  # inplace=True activations): as their out-of-place forms
    _aten.dropout.default: replace(FUNCTIONS[F.dropout], train_args=("p",)),  # (input, p, train)
    _aten.sym_size.int: _SYM_SIZE,  # a size read at run time (dynamic shapes)
    _aten._assert_tensor_metadata.default: _CHECK, _aten._assert_scalar.default: _CHECK,
}
FUNCTIONS.update({op: _overload(op, like) for op, like in _ATEN_LIKE.items()})


# -- modules ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleEntry:
    """A module type and its spec; ``exact`` entries match ``type(m) is cls`` only (a subclass may
    override forward), the others any instance. The first matching entry wins."""

    cls: type[nn.Module]
    spec: OpSpec
    exact: bool = False


_NORM = "normalisation parameter ({type}): never gated"
_BATCH_NORM_FORWARD = nn.modules.batchnorm._BatchNorm.forward
_CONV_KW = ("stride", "padding", "dilation", "groups")
_CONV_T_KW = ("stride", "padding", "output_padding", "groups", "dilation")


def _conv_module(cls: type[nn.Module], fn: Callable[..., Any]) -> ModuleEntry:
    spec = OpSpec(cls.__name__, "conv", weight_attrs=("weight",), channel_rule=ChannelRule.CONV_MODULE,
                  macs=_conv_module_macs, functional=fn, functional_kwargs=_CONV_KW)
    return ModuleEntry(cls, spec, exact=True)


def _conv_t_module(cls: type[nn.Module], fn: Callable[..., Any]) -> ModuleEntry:
    spec = OpSpec(cls.__name__, "conv_transpose", weight_attrs=("weight",), macs=_conv_module_macs, functional=fn,
                  functional_kwargs=_CONV_T_KW)
    return ModuleEntry(cls, spec, exact=True)


def _module_act(cls: type[nn.Module], zero: bool, *, eval_identity: bool = False) -> ModuleEntry:
    return ModuleEntry(cls, OpSpec(cls.__name__, "elementwise", channel_rule=ChannelRule.ELEMENTWISE,
                                   zero_preserving=zero, identity_at_eval=eval_identity))


def _module_spatial(cls: type[nn.Module]) -> ModuleEntry:
    return ModuleEntry(cls, OpSpec(cls.__name__, "pool", channel_rule=ChannelRule.SPATIAL))


def _channel_norm_module(cls: type[nn.Module], kind: Literal["layer", "rms", "group"]) -> ModuleEntry:
    """torch's own LayerNorm / RMSNorm / GroupNorm (exact type: a subclass may permute first, as timm's LayerNorm2d)."""
    return ModuleEntry(cls, OpSpec(cls.__name__, "norm", channel_rule=ChannelRule.NORM, never_gated=_NORM,
                                   norm_kind=kind), exact=True)


def _module_norm(cls: type[nn.Module]) -> ModuleEntry:
    return ModuleEntry(cls, OpSpec(cls.__name__, "norm", never_gated=_NORM))


#: Module types, in lookup order (exact plain layers first, then families by isinstance).
MODULES: tuple[ModuleEntry, ...] = (
    _conv_module(nn.Conv1d, torch.conv1d),  # functional form torch.conv1d
    _conv_module(nn.Conv2d, torch.conv2d),  # functional form torch.conv2d
    _conv_module(nn.Conv3d, torch.conv3d),  # functional form torch.conv3d
    _conv_t_module(nn.ConvTranspose1d, torch.conv_transpose1d),  # functional form, no module channel rule
    _conv_t_module(nn.ConvTranspose2d, torch.conv_transpose2d),
    _conv_t_module(nn.ConvTranspose3d, torch.conv_transpose3d),
    ModuleEntry(nn.Linear, OpSpec("Linear", "linear", weight_attrs=("weight",), channel_rule=ChannelRule.LINEAR_MODULE,
                                  macs=_linear_module_macs, functional=F.linear), exact=True),  # functional F.linear
    ModuleEntry(nn.modules.conv._ConvNd, OpSpec("conv subclass", "conv", weight_attrs=("weight",),
                                                macs=_conv_module_macs)),  # own forward: gated at module level
    ModuleEntry(nn.Linear, OpSpec("Linear subclass", "linear", weight_attrs=("weight",),
                                  macs=_linear_module_macs)),  # e.g. MHA's out_proj: gated at module level
    ModuleEntry(nn.MultiheadAttention, OpSpec("MultiheadAttention", "attention", weight_attrs=(
        "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"), macs=_mha_macs)),  # q/k/v projections
    ModuleEntry(nn.modules.batchnorm._BatchNorm, OpSpec("BatchNorm", "batch_norm",
                                                        channel_rule=ChannelRule.BATCH_NORM_MODULE, never_gated=_NORM)),
    _module_norm(nn.modules.batchnorm._NormBase),  # instance norms: statistics per sample
    _channel_norm_module(nn.LayerNorm, "layer"), _channel_norm_module(nn.RMSNorm, "rms"),  # as F.layer_norm
    _channel_norm_module(nn.GroupNorm, "group"),  # as F.group_norm
    ModuleEntry(MaskedMean, OpSpec("MaskedMean", "reduce", ("input", "mask"), channel_rule=ChannelRule.REDUCE),
                exact=True),  # a gated model's mean over the channels
    ModuleEntry(MaskedNorm, OpSpec("MaskedNorm", "norm", ("input", "weight", "bias", "mask"),
                                   channel_rule=ChannelRule.NORM), exact=True),  # a gated model's norm
    _module_norm(nn.LayerNorm), _module_norm(nn.GroupNorm), _module_norm(nn.LocalResponseNorm),  # subclasses
    _module_norm(nn.RMSNorm),  # subclasses: their own forward
    ModuleEntry(nn.Embedding, OpSpec("Embedding", "embedding", never_gated="embedding ({type}): never gated")),
    ModuleEntry(nn.EmbeddingBag, OpSpec("EmbeddingBag", "embedding", never_gated="embedding ({type}): never gated")),
    _module_act(nn.ReLU, True), _module_act(nn.ReLU6, True), _module_act(nn.GELU, True),  # f(0) = 0
    _module_act(nn.SiLU, True), _module_act(nn.Hardswish, True), _module_act(nn.Hardtanh, True),
    _module_act(nn.LeakyReLU, True), _module_act(nn.ELU, True), _module_act(nn.Mish, True),
    _module_act(nn.Tanh, True), _module_act(nn.CELU, True), _module_act(nn.SELU, True),
    _module_act(nn.Identity, True, eval_identity=True),  # identity
    _module_act(nn.Dropout, True, eval_identity=True), _module_act(nn.Dropout1d, True, eval_identity=True),
    _module_act(nn.Dropout2d, True, eval_identity=True), _module_act(nn.Dropout3d, True, eval_identity=True),
    _module_act(nn.AlphaDropout, True, eval_identity=True),  # identity at eval
    _module_act(nn.FeatureAlphaDropout, True, eval_identity=True),  # identity at eval
    _module_act(EvalIdentity, True, eval_identity=True),  # drop path, stochastic depth: kept as leaves by the trace
    *(_module_act(spec.train_module, True, eval_identity=True)
      for spec in _stochastic_depth().values()),  # torchvision's StochasticDepth, made by the trace
    _module_act(nn.Sigmoid, False), _module_act(nn.Hardsigmoid, False), _module_act(nn.Softplus, False),  # f(0) != 0
    _module_spatial(nn.MaxPool1d), _module_spatial(nn.MaxPool2d), _module_spatial(nn.MaxPool3d),
    _module_spatial(nn.AvgPool1d), _module_spatial(nn.AvgPool2d), _module_spatial(nn.AvgPool3d),
    _module_spatial(nn.AdaptiveAvgPool1d), _module_spatial(nn.AdaptiveAvgPool2d),
    _module_spatial(nn.AdaptiveAvgPool3d), _module_spatial(nn.AdaptiveMaxPool2d), _module_spatial(nn.Upsample),
    ModuleEntry(nn.Flatten, OpSpec("Flatten", "shape", channel_rule=ChannelRule.RESHAPE)),  # as torch.flatten
    ModuleEntry(nn.GLU, OpSpec("GLU", "elementwise", channel_rule=ChannelRule.GLU,
                               zero_preserving=True)),  # as F.glu over its dim attribute
    ModuleEntry(nn.Softmax, OpSpec("Softmax", "softmax", channel_rule=ChannelRule.SOFTMAX,
                                   attention_glue=True)),  # as F.softmax over its dim attribute
    ModuleEntry(Gate, OpSpec("gate", "gate", channel_rule=ChannelRule.NO_CHANNELS)),  # weights or masks, no channels
    ModuleEntry(ChannelMask, OpSpec("ChannelMask", "gate", channel_rule=ChannelRule.ELEMENTWISE,
                                    zero_preserving=True)),  # x * mask: the label passes
)


# -- look-ups ---------------------------------------------------------------------------------------

def function_spec(target: Any) -> OpSpec | None:
    """The spec of a call_function target (None: unknown op)."""
    try:
        return FUNCTIONS.get(target)
    except TypeError:  # an unhashable target
        return None


def method_spec(name: str) -> OpSpec | None:
    """The spec of a call_method name (None: unknown method)."""
    return METHODS.get(name)


def module_spec(module: nn.Module) -> OpSpec | None:
    """The spec of a module: the first entry of :data:`MODULES` it matches (None: unknown)."""
    return _type_spec(type(module))


@functools.cache
def _type_spec(cls: type) -> OpSpec | None:
    # a module's entry depends on its type alone, and passes ask for it once per node and module
    for entry in MODULES:
        if cls is entry.cls if entry.exact else issubclass(cls, entry.cls):
            return entry.spec
    return None


def call_spec(node: fx.Node) -> OpSpec | None:
    """The spec of a call_function / call_method node (None for every other node and unknown ops)."""
    if node.op == "call_function":
        return function_spec(node.target)
    if node.op == "call_method":
        return method_spec(str(node.target))
    return None


def node_spec(gm: fx.GraphModule, node: fx.Node) -> OpSpec | None:
    """The spec of a call node of ``gm`` (None for placeholders, get_attr, output and unknown ops)."""
    if node.op == "call_module":
        return module_spec(gm.get_submodule(str(node.target)))
    return call_spec(node)


def weight_slots(node: fx.Node) -> tuple[WeightSlot, ...]:
    """Weight slots of a call_function / call_method node (empty when the op has none)."""
    spec = call_spec(node)
    return spec.slots if spec is not None else ()


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
    spec = module_spec(module)
    if spec is None or spec.functional is None or getattr(module, "padding_mode", "zeros") != "zeros":
        return None
    return spec.functional, {name: getattr(module, name) for name in spec.functional_kwargs}


def gateable_module_weights(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the gateable weights inside a leaf module."""
    names: list[str] = []
    for prefix, sub in module.named_modules():
        spec = module_spec(sub)
        for attr in spec.weight_attrs if spec is not None else ():
            value = sub._parameters.get(attr)
            if isinstance(value, nn.Parameter) and not isinstance(value, nn.parameter.UninitializedParameter):
                names.append(f"{prefix}.{attr}" if prefix else attr)
    return names


def is_plain_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm whose forward is torch's own (not one that adds more, like timm's BatchNormAct)."""
    spec = module_spec(module)
    return spec is not None and spec.kind == "batch_norm" and type(module).forward is _BATCH_NORM_FORWARD


def is_weight_module(module: nn.Module) -> bool:
    """True for conv, conv-transpose and linear layers (their ``weight`` is a weight matrix)."""
    spec = module_spec(module)
    return spec is not None and spec.kind in ("conv", "conv_transpose", "linear")


def never_gated_reason(owner: nn.Module | None, attr: str) -> str | None:
    """Why a parameter is never gated by the method (HYPERFLUX.md §1), or None."""
    if attr == "bias" or attr.endswith("_bias") or attr.startswith("bias_"):
        return "bias: never gated (HYPERFLUX.md §1)"
    if owner is None:
        return None
    spec = module_spec(owner)
    if spec is not None and spec.never_gated:
        return spec.never_gated.format(type=type(owner).__name__)
    if "Norm" in type(owner).__name__:  # norm layers outside torch.nn (timm's LayerNorm2d, RmsNorm, ...)
        return _NORM.format(type=type(owner).__name__)
    return None


def module_macs(module: nn.Module, args: tuple[Any, ...], out: Any) -> int:
    """MACs of one call of a module (0 for modules without a formula)."""
    spec = module_spec(module)
    if spec is None or spec.macs is None:
        return 0
    return spec.macs(module, args, out[0] if isinstance(out, tuple) else out)


def sync_module_sizes(module: nn.Module) -> None:
    """Refresh a conv/linear module's size attributes from its (sliced) weight."""
    if not is_weight_module(module):
        return
    w = module.weight
    if module_spec(module).kind == "linear":
        module.out_features, module.in_features = w.shape[0], w.shape[1]
    elif module.transposed:
        module.out_channels, module.in_channels = w.shape[1] * module.groups, w.shape[0]
    else:
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups


@dataclass(frozen=True)
class NormOperands:
    """What a LayerNorm / RMSNorm call normalises and with what: ``weight``/``bias`` are graph nodes
    (functions, MaskedNorm) or parameter targets (modules), None when absent."""

    kind: Literal["layer", "rms", "group"]
    dims: int  # trailing dims the statistics run over (group: 0, they run over dim 1 and those after it)
    input: Any
    weight: Any
    bias: Any
    eps: float | None
    module: str | None  # a norm module's path (its normalized_shape follows the width)
    groups: int = 1  # group: num_groups


_NORM_FUNCTIONS: dict[str, Callable[..., Any]] = {"layer": F.layer_norm, "rms": F.rms_norm, "group": F.group_norm}


def norm_function(kind: str) -> Callable[..., Any]:
    """The function computing a plain norm of ``kind`` ("layer" or "rms"), as F.layer_norm's signature
    (``rms``: no bias)."""
    return _NORM_FUNCTIONS[kind]


def mean_function() -> Callable[..., Any]:
    """The function a fold rewrites a mask-aware mean into (``mean(x, dim, keepdim=...)``)."""
    return torch.mean


def gather_function() -> Callable[..., Any]:
    """The function a fold rewrites a channel shuffle that loses channels into (``index_select(x, dim,
    index)``: the kept channels in their shuffled order)."""
    return torch.index_select


def cut_function(kind: str) -> Callable[..., Any]:
    """The function a fold rewrites a channel cut into: "split" (``split(x, sizes, dim)``: split and
    chunk, whose kept pieces need not be equal) or "narrow" (``narrow(x, dim, start, length)``)."""
    return {"split": torch.split, "narrow": torch.narrow}[kind]


def norm_operands(gm: fx.GraphModule, node: fx.Node) -> NormOperands | None:
    """The operands of a norm node with :attr:`ChannelRule.NORM` (None for any other node)."""
    spec = node_spec(gm, node)
    if spec is None or spec.channel_rule is not ChannelRule.NORM:
        return None
    if node.op == "call_module":
        path = str(node.target)
        mod = gm.get_submodule(path)
        if isinstance(mod, MaskedNorm):
            return NormOperands(mod.kind, int(mod.kind != "group"), node.args[0], node.args[1], node.args[2], mod.eps,
                                None, mod.groups)
        targets = [f"{path}.{name}" if getattr(mod, name, None) is not None else None for name in ("weight", "bias")]
        if isinstance(mod, nn.GroupNorm):
            return NormOperands("group", 0, node.args[0], *targets, mod.eps, path, mod.num_groups)
        return NormOperands(spec.norm_kind, len(mod.normalized_shape), node.args[0], *targets, mod.eps, path)
    if spec.norm_kind == "group":
        return NormOperands("group", 0, node.args[0], spec.arg(node, "weight"), spec.arg(node, "bias"),
                            spec.arg(node, "eps", 1e-5), None, spec.arg(node, "num_groups"))
    shape = spec.arg(node, "normalized_shape")
    dims = 1 if isinstance(shape, int) else len(shape)
    bias = spec.arg(node, "bias") if "bias" in spec.signature else None
    eps = spec.arg(node, "eps", 1e-5 if spec.norm_kind == "layer" else None)
    return NormOperands(spec.norm_kind, dims, node.args[0], spec.arg(node, "weight"), bias, eps, None)
