"""The records insert_gates reports: what it gated, what it skipped and why, every channel group."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hyperflux_fx.analysis.coupling import Unit
from hyperflux_fx.frontend.trace import OpaqueModule, TrainingOnlyCode

__all__ = ["ChannelGroupReport", "GateReport", "GatedTensor", "SkippedItem"]


@dataclass
class GatedTensor:
    """One gated tensor."""

    name: str  # qualified parameter name (loadable from the original state dict)
    shape: tuple[int, ...]
    numel: int
    gate: str  # qualified name of its gate module
    level: str  # "op": the gate feeds the op directly; "module": gated at module level
    via: list[str] = field(default_factory=list)  # the ops that consume it


@dataclass
class SkippedItem:
    """A parameter or op left dense, and why."""

    name: str  # parameter name, or the node for ops
    kind: str  # "parameter" or "op"
    reason: str


@dataclass
class ChannelGroupReport:
    """One channel group found by the coupling analysis: gated, or why not."""

    name: str  # "group<id>:<first producer>" (the gate's target when gated)
    size: int  # units (channels, hidden units or heads)
    unit: Unit  # "channel" or "head"
    producers: list[str]  # producer node names
    consumers: int  # conv/linear ops reading the group
    gated: bool
    blocked: list[str] = field(default_factory=list)  # why it is not gated (empty when gated)


@dataclass
class GateReport:
    """What ``insert_gates`` gated and skipped."""

    granularity: str
    model_kind: str  # "cnn" or "transformer" (decides the first/last-op defaults)
    gate_first: bool
    gate_last: bool
    gated: list[GatedTensor] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    opaque: list[OpaqueModule] = field(default_factory=list)  # modules made leaves by the trace fallback
    rule_counts: dict[str, int] = field(default_factory=dict)  # rewrites per rule
    channel_groups: list[ChannelGroupReport] = field(default_factory=list)  # channel/hybrid: every group
    training_only: list[TrainingOnlyCode] = field(default_factory=list)  # train-mode code the graph lacks

    @property
    def gated_elements(self) -> int:
        return sum(g.numel for g in self.gated) + sum(g.size for g in self.channel_groups if g.gated)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gated_elements"] = self.gated_elements
        return out

    def __str__(self) -> str:
        lines = [
            (f"insert_gates: {len(self.gated)} tensors gated ({self.gated_elements:,} elements), "
             f"{sum(s.kind == 'parameter' for s in self.skipped)} parameters and "
             f"{sum(s.kind == 'op' for s in self.skipped)} ops skipped, {len(self.opaque)} opaque modules"),
            (f"granularity={self.granularity}  model kind={self.model_kind}  "
             f"first op gated={self.gate_first}  last op gated={self.gate_last}"),
        ]
        if self.rule_counts:
            lines.append("rewrites: " + ", ".join(f"{k}={v}" for k, v in sorted(self.rule_counts.items())))
        return "\n".join(lines + self._gated_lines() + self._skipped_lines() + self._group_lines()
                         + self._opaque_lines() + self._training_lines())

    def _gated_lines(self) -> list[str]:
        if not self.gated:
            return []
        width = max(len(g.name) for g in self.gated)
        return ["", f"{'gated tensor':<{width}}  {'shape':<20} {'elements':>12}  level   via"] + [
            f"{g.name:<{width}}  {list(g.shape)!s:<20} {g.numel:>12,}  {g.level:<6}  " + ", ".join(g.via)
            for g in self.gated]

    def _skipped_lines(self) -> list[str]:
        if not self.skipped:
            return []
        width = max(len(s.name) for s in self.skipped)
        return ["", f"{'skipped':<{width}}  kind       reason"] + [
            f"{s.name:<{width}}  {s.kind:<9}  {s.reason}" for s in self.skipped]

    def _group_lines(self) -> list[str]:
        if not self.channel_groups:
            return []
        lines = ["", "channel groups: size  unit  gated  producers  (why not gated)"]
        for g in self.channel_groups:
            why = "" if g.gated else "  -- " + "; ".join(g.blocked)[:300]
            lines.append(f"  {g.name:<28} {g.size:>5}  {g.unit:<7} {'yes' if g.gated else 'no ':<5}  "
                         f"{', '.join(g.producers)[:80]}{why}")
        return lines

    def _opaque_lines(self) -> list[str]:
        if not self.opaque:
            return []
        return ["", "opaque modules (traced as leaves; gated at module level):"] + [
            f"  {o.path} ({o.type}): {o.error}" for o in self.opaque]

    def _training_lines(self) -> list[str]:
        if not self.training_only:
            return []
        return ["", "training-only code (not in the graph, which is the eval function):"] + [
            f"  {c.path or '(root)'} ({c.type}): train mode runs {', '.join(c.train_only) or '-'}; "
            f"eval mode runs {', '.join(c.eval_only) or '-'}" for c in self.training_only]
