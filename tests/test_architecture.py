"""The layout rules of docs/ARCHITECTURE.md, checked: layers (import-linter), short functions, no
package-internal import hidden inside a function."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hyperflux_fx as hf
from hyperflux_fx import ir
from hyperflux_fx.analysis.attention import find_attention
from hyperflux_fx.analysis.cost import count_params_and_macs, unit_costs
from hyperflux_fx.analysis.cost_model import CostModel
from hyperflux_fx.analysis.coupling import analyze_channels, dead_units
from hyperflux_fx.analysis.weights import find_weight_uses

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hyperflux_fx"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """(where, function, public module-level function?) for every function of the package."""
    out = []
    for path, tree in _modules():
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                public = id(node) in top and not node.name.startswith("_") and not path.name.startswith("_")
                out.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node, public))
    return out


def _length(fn: ast.AST) -> int:
    return fn.end_lineno - fn.lineno + 1


def test_no_function_is_over_80_lines():
    long = [(where, _length(fn)) for where, fn, _ in _functions() if _length(fn) > 80]
    assert not long, f"functions over 80 lines (split them): {long}"


def test_public_functions_are_short_drivers():
    long = [(where, _length(fn)) for where, fn, public in _functions() if public and _length(fn) > 60]
    assert not long, f"public functions over 60 lines (make them drivers of smaller steps): {long}"


def test_no_package_internal_import_inside_a_function():
    hidden = []
    for where, fn, _ in _functions():
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("hyperflux_fx")):
                hidden.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Import) and any(a.name.startswith("hyperflux_fx") for a in node.names):
                hidden.append(f"{where}: import {node.names[0].name}")
    assert not hidden, f"package-internal imports inside functions (move them to the top): {hidden}"


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: import-linter is pinned in the dev extra (make test installs it)")
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", "pyproject.toml"], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False, timeout=300)


def test_the_layer_contract_holds():
    proc = _lint_imports(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout  # the package layers; the channel analysis, its rules, the CLI


UPWARD = [  # (module, the import added to it, the broken edge import-linter must name)
    ("ops.py", "from hyperflux_fx.passes import fold_masks", "hyperflux_fx.ops -> hyperflux_fx.passes"),
    ("analysis/coupling/rules/shapes.py", "from hyperflux_fx.analysis.coupling.keep import kept_count",
     "hyperflux_fx.analysis.coupling.rules.shapes -> hyperflux_fx.analysis.coupling.keep"),
    ("analysis/coupling/rules/norms.py", "from hyperflux_fx.analysis.coupling.rules.shapes import RULES",
     "hyperflux_fx.analysis.coupling.rules.norms -> hyperflux_fx.analysis.coupling.rules.shapes"),
]


@pytest.mark.parametrize(("module", "line", "edge"), UPWARD, ids=[m for m, _, _ in UPWARD])
def test_an_upward_import_breaks_the_layer_contract(tmp_path, module, line, edge):
    shutil.copytree(PACKAGE, tmp_path / "hyperflux_fx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "hyperflux_fx" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402  (upward)\n")
    proc = _lint_imports(tmp_path, tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert edge in proc.stdout.replace("\n", " ").replace("  ", " "), proc.stdout


def test_the_printed_graphs_in_architecture_md_are_current():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import render_architecture
    finally:
        sys.path.remove(str(ROOT / "tools"))
    text = render_architecture.DOC.read_text()
    assert render_architecture.render(text) == text, "stale: run python tools/render_architecture.py"


def _docstrings(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_every_gated_model_name_and_meta_key_comes_from_ir():
    names = [v for k, v in vars(ir).items() if k.endswith(("_ATTR", "_META")) and isinstance(v, str)]
    assert len(names) >= 11
    spelled = []
    for path, tree in _modules():
        if path.name == "ir.py":
            continue
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                    and any(node.value.startswith(n) for n in names)):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not spelled, f"attribute names / meta keys spelled outside ir.py (import them from there): {spelled}"


def test_analysis_leaves_the_graph_as_it_found_it():
    from models import FOLD_ZOO

    build, inputs = FOLD_ZOO["residual_add"]
    gated = hf.insert_gates(build().eval(), hf.GateConfig(granularity="hybrid", seed=0),
                            example_inputs=inputs()).graph_module
    code, nodes = gated.code, [(n.name, n.op, str(n.target), n.args) for n in gated.graph.nodes]
    state = {k: v.clone() for k, v in gated.state_dict().items()}
    coupling = analyze_channels(gated)
    for group in coupling.groups():
        unit_costs(gated, coupling, group)
        dead_units(gated, coupling, group)
    find_weight_uses(gated)
    find_attention(gated)
    count_params_and_macs(gated, inputs())
    model = CostModel(gated, hf.FoldConfig(round_to=1))
    model.marginal(model.counts(rounded=False))
    model.cost()
    assert gated.code == code and [(n.name, n.op, str(n.target), n.args) for n in gated.graph.nodes] == nodes
    assert all(torch.equal(v, state[k]) for k, v in gated.state_dict().items()) and set(state) == set(
        gated.state_dict())
