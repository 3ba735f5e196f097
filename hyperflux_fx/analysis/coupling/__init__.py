"""Channel-coupling analysis: which channels of which ops must be deleted together.

Every conv / linear output creates a *channel space* (its output channels). Labels describing which
space owns which channels of a tensor are propagated forward through the graph: each op's entry in
the op table (:mod:`hyperflux_fx.ops`) names its :class:`~hyperflux_fx.ops.ChannelRule`, and
:data:`RULES` maps every rule to its code. Elementwise ops between two labelled tensors *tie* their
spaces; the connected components of the tie graph (networkx) are the *groups* deleted together.
Conv / linear inputs are *consumers* (their weight's input dimension is sliced). An op that is not
in the table, or that mixes channels (LayerNorm over them, softmax, a reshape that splits them, the
graph output), *blocks* every group it touches, with the node and the reason.

One concept per module (docs/ARCHITECTURE.md, "The channel analysis"):

- :mod:`.labels`: the vocabulary (spaces, labels, producers, consumers, groups, the result);
- :mod:`.rules`: the per-op rules, one module per family, and the ``RULES`` dispatch;
- :mod:`.analyze`: the driver (:func:`analyze_channels`);
- :mod:`.checks`: the consistency checks run after the rules;
- :mod:`.keep`: what the fold keeps, read by passes/ and train/.

Nothing here rewrites the graph: ``insert_gates`` (channel granularity) puts a mask at every consumer
input of an unblocked group, and ``fold_masks`` slices what this analysis lists.
"""

from __future__ import annotations

from hyperflux_fx.analysis.coupling.analyze import analyze_channels
from hyperflux_fx.analysis.coupling.keep import (
    consumer_input,
    dead_units,
    deletes_dead,
    group_consumers,
    kept_count,
    kept_ranges,
    label_keep,
    param_keep,
    parent_keep,
    plan_keep,
    producer_keep,
    round_field,
    round_multiple,
)
from hyperflux_fx.analysis.coupling.labels import (
    OUTPUT_REASON,
    ChannelParam,
    Consumer,
    Coupling,
    CutArg,
    Group,
    Label,
    NormUse,
    Producer,
    Seg,
    ShapeArg,
    Unit,
    param_target,
    shape_of,
)
from hyperflux_fx.analysis.coupling.rules import RULES

__all__ = ["OUTPUT_REASON", "RULES", "ChannelParam", "Consumer", "Coupling", "CutArg", "Group", "Label", "NormUse",
           "Producer", "Seg", "ShapeArg", "Unit", "analyze_channels", "consumer_input", "dead_units", "deletes_dead",
           "group_consumers", "kept_count", "kept_ranges", "label_keep", "param_keep", "param_target", "parent_keep",
           "plan_keep", "producer_keep", "round_field", "round_multiple", "shape_of"]
