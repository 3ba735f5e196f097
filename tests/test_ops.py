"""The one op table: every op is known in one place, and every reader reads that place.

Two kinds of check. Statically, no module but ops.py names a torch op or module type that the table
holds as data (a table key, a comparison, an isinstance check: calling ``torch.cat`` to compute is a
use, not knowledge about the op). Dynamically, replacing one entry of the table changes what gating,
the channel analysis and the MAC count do for that op — all three at once — which they could not if
any kept its own copy.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import operator
import pkgutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hyperflux_fx as hf
from hyperflux_fx import ops
from hyperflux_fx.analysis.coupling import RULES, analyze_channels
from hyperflux_fx.frontend.trace import propagate_shapes

ROOT = Path(__file__).resolve().parents[1]
TABLE_OBJECTS = [*ops.FUNCTIONS, *(e.cls for e in ops.MODULES)]


def _in_table(obj: object) -> bool:
    return any(obj is t for t in TABLE_OBJECTS)


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def test_no_module_but_ops_names_an_op_of_the_table():
    found = []
    for path in sorted((ROOT / "hyperflux_fx").rglob("*.py")):
        if path.name == "ops.py":
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        tree = ast.parse(path.read_text())
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            parts = _dotted(node) if isinstance(node, ast.Attribute) and id(node) not in called else None
            if not parts or parts[0] not in ("torch", "F", "nn", "operator"):
                continue
            obj = getattr(module, parts[0], None)
            for attr in parts[1:]:
                obj = getattr(obj, attr, None)
            if obj is not None and _in_table(obj):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {'.'.join(parts)}")
    assert not found, f"ops named outside the op table (look them up in hyperflux_fx.ops): {sorted(set(found))}"


def test_every_channel_rule_has_its_code_and_the_analysis_keeps_no_op_table():
    assert set(RULES) == set(ops.ChannelRule)
    used = {s.channel_rule for s in [*ops.FUNCTIONS.values(), *ops.METHODS.values(), *(e.spec for e in ops.MODULES)]}
    assert used - {None} <= set(RULES)
    package = importlib.import_module("hyperflux_fx.analysis.coupling")
    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    assert len(modules) >= 10  # every module of the analysis package is looked at, rules/ included
    tables = [f"{m.__name__}.{k}" for m in [package, *modules] for k, v in vars(m).items()
              if isinstance(v, dict) and any(_in_table(x) for x in v)]
    assert not tables


def test_weight_ops_share_one_entry_per_target():
    # conv / linear / matmul entries: weight slots, channel rule and MAC formula sit on one object
    for target in (torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose2d, F.linear, torch.matmul,
                   operator.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm):
        spec = ops.function_spec(target)
        assert spec is not None and spec.macs is not None and spec.slots, target
        assert spec.kind in ("conv", "conv_transpose", "linear", "matmul", "mm")


class _Three(nn.Module):
    """A module ``pre`` that creates channels, then three weights ``w1``-``w3`` used by functional ops."""

    def __init__(self, pre: nn.Module, *shapes: tuple[int, ...]) -> None:
        super().__init__()
        self.pre = pre
        self.w1, self.w2, self.w3 = (nn.Parameter(torch.randn(*shape)) for shape in shapes)


class _Conv(_Three):  # two functional convs and a head: torch.conv2d's entry decides
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 3, 1), (4, 3, 3, 3), (5, 4, 3, 3), (2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(torch.conv2d(F.relu(torch.conv2d(F.relu(self.pre(x)), self.w1, None, 1, 1)), self.w2, None, 1, 1))
        return F.linear(y.mean((2, 3)), self.w3)


class _Linear(_Three):  # functional linears: F.linear's entry decides
    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 4), (6, 4), (5, 6), (2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(F.relu(F.linear(F.relu(self.pre(x)), self.w1)), self.w2)), self.w3)


class _Matmul(_Three):  # x @ W: operator.matmul's entry decides
    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 4), (4, 6), (6, 5), (2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.relu(F.relu(self.pre(x)) @ self.w1) @ self.w2), self.w3)


CASES = {  # target whose entry is replaced, model, example input, how many calls of the target
    "conv2d": (torch.conv2d, _Conv, (2, 3, 6, 6), 2),
    "linear": (F.linear, _Linear, (2, 4), 3),
    "matmul": (operator.matmul, _Matmul, (2, 4), 2),
}
SENTINEL_MACS = 1_000_003


def _readers(model: nn.Module, x: torch.Tensor) -> tuple[list[str], list[str], int]:
    """(what insert_gates gates, every block reason of the channel analysis, the MAC count)."""
    gated = [g.name for g in hf.insert_gates(model, hf.GateConfig(), example_inputs=x).report.gated]
    gm = hf.trace(model, x)
    propagate_shapes(gm, (x,))
    blocks = [r for g in analyze_channels(gm).groups() for r in g.blocked]
    return gated, blocks, hf.count_params_and_macs(gm, x)[1]


def _replace(monkeypatch: pytest.MonkeyPatch, target: object, macs: int) -> None:
    monkeypatch.setitem(ops.FUNCTIONS, target, dataclasses.replace(
        ops.FUNCTIONS[target], weights=(), channel_rule=ops.ChannelRule.BLOCK, block_reason="sentinel rule",
        macs=lambda args, kwargs, out: macs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_replacing_an_entry_changes_gating_coupling_and_cost_together(case, monkeypatch):
    target, build, shape, calls = CASES[case]
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(*shape)
    gated, blocks, macs = _readers(model, x)
    assert {"w1", "w2"} <= set(gated) and not any("sentinel" in r for r in blocks)
    _replace(monkeypatch, target, 0)
    _, _, macs_without = _readers(model, x)
    assert macs_without < macs  # the entry's own formula counted those ops
    _replace(monkeypatch, target, SENTINEL_MACS)
    gated2, blocks2, macs2 = _readers(model, x)
    assert "w1" not in gated2 and "w2" not in gated2 and "pre.weight" in gated2  # weight slots: the entry's
    assert any("sentinel rule" in r for r in blocks2)  # so is the channel rule
    assert macs2 == macs_without + calls * SENTINEL_MACS  # and the MAC formula, once per call
