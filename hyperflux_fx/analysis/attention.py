"""Attention detection: which nodes compute attention and which weight ops project into or out of it.

An *anchor* computes attention: ``scaled_dot_product_attention``, an ``nn.MultiheadAttention`` leaf,
or a product of two activations (``q @ k^T``, ``attn @ v``) a few ops away from a softmax. A weight
op joined to an anchor through glue ops only (reshapes, splits, scaling, softmax, dropout: the
``moves_elements`` / ``attention_glue`` entries of the op table) is an attention projection. A graph
with anchors is a transformer, which decides the first/last-op defaults of ``insert_gates``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import fx

from hyperflux_fx.ops import node_spec

__all__ = ["AttentionInfo", "attention_projections", "find_attention", "input_dependence"]


@dataclass(frozen=True)
class AttentionInfo:
    """Attention found in a graph."""

    anchors: frozenset[fx.Node]  # nodes computing attention

    @property
    def model_kind(self) -> str:
        """"transformer" when the graph computes attention, else "cnn"."""
        return "transformer" if self.anchors else "cnn"


def input_dependence(graph: fx.Graph) -> dict[fx.Node, bool]:
    """For every node: does its value depend on a graph input (an activation), or on parameters only?"""
    dep: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        dep[node] = node.op == "placeholder" or any(dep[a] for a in node.all_input_nodes)
    return dep


def find_attention(gm: fx.GraphModule) -> AttentionInfo:
    """The attention anchors of ``gm``."""
    dep = input_dependence(gm.graph)
    anchors: set[fx.Node] = set()
    for node in gm.graph.nodes:
        spec = node_spec(gm, node)
        if spec is None:
            continue
        if spec.kind == "attention":
            anchors.add(node)
        elif spec.kind == "matmul":
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) == 2 and all(dep[a] for a in operands) and _near_softmax(gm, node):
                anchors.add(node)
    return AttentionInfo(frozenset(anchors))


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    spec = node_spec(gm, node)
    return spec is not None and spec.kind == "softmax"


def _is_glue(gm: fx.GraphModule, node: fx.Node) -> bool:
    spec = node_spec(gm, node)
    return spec is not None and node.op != "call_module" and (spec.attention_glue or spec.moves_elements)


def _near_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    steps: tuple[Callable[[fx.Node], Iterable[fx.Node]], ...] = (lambda n: list(n.users), lambda n: n.all_input_nodes)
    for step in steps:
        frontier, seen = [node], 0
        while frontier and seen < 8:  # a few ops either way: scaling, masking, dropout
            cur = frontier.pop()
            seen += 1
            for nxt in step(cur):
                if _is_softmax(gm, nxt):
                    return True
                frontier.append(nxt)
    return False


def attention_projections(gm: fx.GraphModule, info: AttentionInfo, weight_nodes: set[fx.Node]) -> set[fx.Node]:
    """Weight ops joined to an attention op through glue ops only: q/k/v and output projections.
    They belong to attention, so they are never taken for a patch embedding or a classifier head."""
    found: set[fx.Node] = set()
    steps: tuple[Callable[[fx.Node], Iterable[fx.Node]], ...] = (lambda n: n.all_input_nodes, lambda n: list(n.users))
    for anchor in info.anchors:
        for step in steps:
            frontier = list(step(anchor))
            seen: set[fx.Node] = set()
            while frontier:
                cur = frontier.pop()
                if cur in seen:
                    continue
                seen.add(cur)
                if cur in weight_nodes:
                    found.add(cur)
                elif _is_glue(gm, cur) or cur in info.anchors:
                    frontier.extend(step(cur))
    return found
