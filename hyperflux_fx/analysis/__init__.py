"""Graph analysis (never rewrites a graph): channel coupling, attention detection, cost."""

from __future__ import annotations

from hyperflux_fx.analysis.attention import AttentionInfo, find_attention
from hyperflux_fx.analysis.cost import count_params, count_params_and_macs, unit_costs
from hyperflux_fx.analysis.coupling import Coupling, Group, analyze_channels

__all__ = ["AttentionInfo", "Coupling", "Group", "analyze_channels", "count_params", "count_params_and_macs",
           "find_attention", "unit_costs"]
