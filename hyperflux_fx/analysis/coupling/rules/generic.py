"""The rules that decide nothing about channels: ops that block them, ops that carry none, and what an
op missing from the table gets (a probe for a per-channel op, else a block with the reason)."""

from __future__ import annotations

from hyperflux_fx.analysis.coupling.labels import Label, Rule, block_inputs, only_label
from hyperflux_fx.analysis.coupling.rules.probe import probe_channelwise
from hyperflux_fx.ops import ChannelRule


def _block(gm, node, c, labels, spec):  # an op that mixes the channels (e.g. layer_norm over them)
    block_inputs(c, node, labels, spec.block_reason)


def _no_channels(gm, node, c, labels, spec):  # shape reads (checked by check_width_reads), gates
    lab = only_label(node, labels)
    if lab is not None and spec.reads_sizes and (node.op == "call_method" or node.args[1:] == ("shape",)
                                                 or spec.name == "sym_size"):
        c.shape_reads.append((node.name, lab))
    return None


def unsupported_module(gm, node, c, labels, spec):
    mod = gm.get_submodule(str(node.target))
    block_inputs(c, node, labels, f"leaf module {node.target} ({type(mod).__name__}) is not in the support table")


def unsupported(gm, node, c, labels, spec):
    """An op outside the table: it passes the channels if probing shows it acts on each channel alone
    (:func:`probe_channelwise`); otherwise it blocks them."""
    lab = only_label(node, labels)
    found = probe_channelwise(gm, node, lab) if lab is not None else "no labelled first operand"
    if isinstance(found, int):
        return Label(found, lab.segs)
    if node.op == "call_module":
        return unsupported_module(gm, node, c, labels, spec)
    name = getattr(node.target, "__name__", str(node.target))
    block_inputs(c, node, labels, f"{name} is not in the channel support table ({found})")
    return None


#: this family's channel rules (the op table names them; ``rules.RULES`` merges the families)
RULES: dict[ChannelRule, Rule] = {
    ChannelRule.BLOCK: _block,
    ChannelRule.NO_CHANNELS: _no_channels,
}
