"""The records insert_gates reports: what it gated, what it skipped and why, every channel group."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hyperflux_fx.analysis.coupling import OUTPUT_REASON, Unit
from hyperflux_fx.frontend.trace import Frontend, OpaqueModule, TrainingOnlyCode

__all__ = ["ChannelGroupReport", "GateReport", "GatedTensor", "SkippedItem"]


def _groups(n: int) -> str:
    return f"{n} group" if n == 1 else f"{n} groups"


def _split_reason(reason: str) -> tuple[str, str]:
    """(why, node name) of a blocked-group reason written as ``why: <node>``."""
    why, _, rest = reason.partition(": %")
    return (why, rest.split(" ", 1)[0]) if rest else (reason, "")


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
    through: str = ""  # a projection split into heads: the head group its channels are deleted through
    replicas: int = 1  # channels per unit (a group split over conv groups: one per conv group)

    @property
    def channels(self) -> int:
        return self.size * self.replicas


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
    frontend: Frontend | None = None  # which front end captured the graph, and why (None: a GraphModule given)

    @property
    def gated_elements(self) -> int:
        return sum(g.numel for g in self.gated) + sum(g.size for g in self.channel_groups if g.gated)

    @property
    def gateable_channels(self) -> tuple[int, int]:
        """(output channels in gated groups (a projection split into heads: when its head group is
        gated), the channels of every group the graph output does not consume)."""
        groups = [g for g in self.channel_groups
                  if g.unit == "channel" and (self._deletable(g) or self._reasons(g) != [OUTPUT_REASON])]
        return sum(g.channels for g in groups if self._deletable(g)), sum(g.channels for g in groups)

    @property
    def gateable_share(self) -> float | None:
        """:attr:`gateable_channels` as a share (channel/hybrid granularity; None when there is no group)."""
        gated, total = self.gateable_channels
        return gated / total if total else None

    def _head_group(self, g: ChannelGroupReport) -> ChannelGroupReport | None:
        return next((h for h in self.channel_groups if h.name == g.through), None) if g.through else None

    def _deletable(self, g: ChannelGroupReport) -> bool:
        """Gated, or deleted through its gated head group."""
        head = self._head_group(g)
        return g.gated or (head is not None and head.gated)

    def _reasons(self, g: ChannelGroupReport) -> list[str]:
        """Why a group's channels are kept (a projection split into heads: its head group's reasons)."""
        head = self._head_group(g)
        return head.blocked if head is not None and head.blocked else g.blocked

    def blockers(self) -> list[tuple[str, int, int, list[str]]]:
        """What keeps channels ungated: ``(reason, channels, groups, nodes)`` per reason, most channels
        first; each blocked group counts once, for its first reason (the graph output's aside). Head
        groups count through their projection's channels."""
        found: dict[str, tuple[int, int, list[str]]] = {}
        for g in self.channel_groups:
            reasons = self._reasons(g)
            if g.unit == "head" or self._deletable(g) or reasons == [OUTPUT_REASON] or not reasons:
                continue
            why, node = _split_reason(next(b for b in reasons if b != OUTPUT_REASON))
            channels, groups, nodes = found.get(why, (0, 0, []))
            found[why] = (channels + g.channels, groups + 1, nodes + ([node] if node and node not in nodes else []))
        return sorted(((why, c, n, nodes) for why, (c, n, nodes) in found.items()), key=lambda r: -r[1])

    def why_nothing_gated(self) -> str:
        """One line for a model in which nothing could be gated: the top blockers, and what to try."""
        if self.channel_groups:
            top = self.blockers()[:3]
            causes = "; ".join(f"{why} ({channels:,} channels in {_groups(groups)}"
                               + (f", e.g. at {', '.join(nodes[:2])})" if nodes else ")")
                               for why, channels, groups, nodes in top) or "every group feeds the graph output"
            hint = " Try --granularity weight (unstructured: smaller files, no speed-up)" if (
                self.granularity == "channel") else ""
            return f"no channel group can be gated: {causes}.{hint}"
        counts = self.skipped_by_reason()
        causes = "; ".join(f"{n} parameters: {why}" for why, n in list(counts.items())[:3]) or "no parameters"
        return f"no weight can be gated: {causes}"

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped parameters counted by reason, most first."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            if s.kind == "parameter":
                counts[s.reason] = counts.get(s.reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gated_elements"] = self.gated_elements
        out["gateable_share"] = self.gateable_share
        return out

    def __str__(self) -> str:
        return self.text()

    def text(self, verbose: bool = False) -> str:
        """The report: a summary, the channel groups (gated or blocked, and the top blockers), the
        gated tensors, the skipped parameters counted by reason (each one listed with ``verbose``)."""
        gated, total, units = self._groups_gated()
        parts = [f"{gated} of {total} channel groups gated ({units:,} units)"] if self.channel_groups else []
        if self.gated or not self.channel_groups:
            parts.append(f"{len(self.gated)} weight tensors gated ({sum(g.numel for g in self.gated):,} elements)")
        lines = [
            f"insert_gates: {', '.join(parts)}, {len(self.opaque)} opaque modules",
            (f"granularity={self.granularity}  model kind={self.model_kind}  "
             f"first op gated={self.gate_first}  last op gated={self.gate_last}"),
        ]
        if self.frontend is not None:
            lines.append(f"captured with {self.frontend.name} ({self.frontend.reason})")
        if self.rule_counts:
            lines.append("rewrites: " + ", ".join(f"{k}={v}" for k, v in sorted(self.rule_counts.items())))
        return "\n".join(lines + self._group_lines() + self._gated_lines() + self._skipped_lines(verbose)
                          + self._opaque_lines() + self._training_lines())

    def _groups_gated(self) -> tuple[int, int, int]:
        """(channel groups gated, all channel groups, units in the gated ones)."""
        gated = [g for g in self.channel_groups if g.gated]
        return len(gated), len(self.channel_groups), sum(g.size for g in gated)

    def _gated_lines(self) -> list[str]:
        if not self.gated:
            return []
        width = max(len(g.name) for g in self.gated)
        return ["", f"{'gated tensor':<{width}}  {'shape':<20} {'elements':>12}  level   via"] + [
            f"{g.name:<{width}}  {list(g.shape)!s:<20} {g.numel:>12,}  {g.level:<6}  " + ", ".join(g.via)
            for g in self.gated]

    def _skipped_lines(self, verbose: bool) -> list[str]:
        if not self.skipped:
            return []
        if not verbose:
            ops = sum(s.kind == "op" for s in self.skipped)
            return (["", "skipped parameters, by reason (each one: --plan --verbose or --json):"]
                    + [f"  {n:>4}  {why}" for why, n in self.skipped_by_reason().items()]
                    + ([f"  {ops:>4}  ops with a computed weight (listed with --verbose)"] if ops else []))
        width = max(len(s.name) for s in self.skipped)
        return ["", f"{'skipped':<{width}}  kind       reason"] + [
            f"{s.name:<{width}}  {s.kind:<9}  {s.reason}" for s in self.skipped]

    def _group_lines(self) -> list[str]:
        if not self.channel_groups:
            return []
        share = self.gateable_share
        gated, total, units = self._groups_gated()
        lines = ["", (f"channel groups: {gated} of {total} gated ({units:,} units); gateable channel share "
                      f"{'-' if share is None else f'{share:.2f}'} (groups the graph output consumes aside)")]
        lines += [f"  blocked: {why}: {channels:,} channels in {_groups(groups)}"
                  + (f" (at {', '.join(nodes[:3])})" if nodes else "")
                  for why, channels, groups, nodes in self.blockers()]
        lines += ["", "channel groups: size  unit  gated  producers  (why not gated; channel x N: a unit is one "
                      "channel in each of N conv groups)"]
        for g in self.channel_groups:
            why = "" if g.gated else "  -- " + "; ".join(
                f"{w} at {n}" if n else w for w, n in map(_split_reason, g.blocked))[:300]
            unit = g.unit if g.replicas == 1 else f"{g.unit} x {g.replicas}"
            lines.append(f"  {g.name:<28} {g.size:>5}  {unit:<12} {'yes' if g.gated else 'no ':<5}  "
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
