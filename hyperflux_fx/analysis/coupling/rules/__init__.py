"""The per-op channel rules, one module per family of ops, and :data:`RULES`, the dispatch the op table's
:class:`~hyperflux_fx.ops.ChannelRule` names index.

The families import only the vocabulary (:mod:`..labels`) and the shared helpers below them
(:mod:`.links`, :mod:`.params`, :mod:`.heads`, :mod:`.probe`); never the fold's keep planning
(:mod:`..keep`) nor the checks. docs/ARCHITECTURE.md ("Adding the channel rule for a new op") walks
through adding one."""

from __future__ import annotations

from hyperflux_fx.analysis.coupling.labels import Rule
from hyperflux_fx.analysis.coupling.rules import attention, elementwise, generic, norms, shapes, weights
from hyperflux_fx.ops import ChannelRule

__all__ = ["RULES"]

#: ChannelRule (named by each op's entry in hyperflux_fx.ops) -> its code.
RULES: dict[ChannelRule, Rule] = {
    **weights.RULES, **norms.RULES, **elementwise.RULES, **shapes.RULES, **attention.RULES, **generic.RULES,
}
