"""ONNX export: checker, ONNX Runtime parity (incl. another batch size), sparse storage, bad input.

Parity tolerance: max|ORT - torch| <= 1e-5 + 1e-4 x max|torch| per output (export_onnx's default):
ORT's fp32 kernels (fused Conv+BN, other blocking) round differently from PyTorch's.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from models import FOLD_ZOO, REAL_ZOO, build_real
from torch import nn

import hyperflux_fx as hf


def _compact(model, x, granularity="channel", closed=0.5):
    gated = hf.insert_gates(model, hf.GateConfig(granularity=granularity, seed=0), example_inputs=x).graph_module
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.rand(g.flow.shape, generator=gen) - closed)
    return gated.eval(), (hf.fold_masks(gated).graph_module.eval() if hf.gates(gated) else gated)


def _fresh_session_matches(path, model, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    # against the input-dependent part of the output (a random model's logits are mostly its bias)
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref - ref.mean(0, keepdims=True)).max()


@pytest.mark.parametrize("name", ["residual_add", "concat", "flatten_linear", "squeeze_excite", "no_bias_chain",
                                  "layernorm_mlp", "sdpa_attention", "conv_variety"])
def test_fixture_zoo_parity_after_fold(name, tmp_path):
    build, inputs = FOLD_ZOO[name]
    x = inputs()[0]
    _, compact = _compact(build().eval(), x)
    rep = hf.export_onnx(compact, x, tmp_path / "m.onnx")
    assert rep.max_abs_diff is not None and len(rep.checked_shapes) == 4
    assert rep.checked_shapes[-1][0] == x.shape[0] + 3  # the dynamic batch was exercised
    _fresh_session_matches(tmp_path / "m.onnx", compact, torch.randn(7, *x.shape[1:]))


@pytest.mark.parametrize(("lib", "name", "size"), REAL_ZOO, ids=[f"{lib}:{name}" for lib, name, _ in REAL_ZOO])
def test_real_zoo_parity_after_fold(lib, name, size, tmp_path):
    model = build_real(lib, name, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    _, compact = _compact(model, x)
    rep = hf.export_onnx(compact, x, tmp_path / "m.onnx")
    assert rep.file_bytes == (tmp_path / "m.onnx").stat().st_size
    assert sum(rep.op_counts.values()) > 0 and ("Conv" in rep.op_counts or "Gemm" in rep.op_counts
                                                 or "MatMul" in rep.op_counts)
    _fresh_session_matches(tmp_path / "m.onnx", compact, torch.randn(3, 3, size, size))


def test_sparse_storage_of_a_98_percent_sparse_resnet18(tmp_path):
    model = build_real("torchvision", "resnet18", 32)
    x = torch.randn(2, 3, 32, 32)
    gated = hf.insert_gates(model, hf.GateConfig(seed=0), example_inputs=x).graph_module.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for g in hf.gates(gated):
            g.flow.copy_(torch.where(torch.rand(g.flow.shape, generator=gen) < 0.98, -1.0, 1.0))
    assert hf.density(gated) == pytest.approx(0.02, abs=0.001)
    compact = hf.fold_masks(gated).graph_module
    dense = hf.export_onnx(compact, x, tmp_path / "dense.onnx")
    sparse = hf.export_onnx(compact, x, tmp_path / "sparse.onnx", sparse_storage=True)
    assert sparse.file_bytes <= 0.08 * dense.file_bytes
    assert len(sparse.sparse_initializers) == 21 and sparse.dense_bytes >= dense.file_bytes * 0.95
    _fresh_session_matches(tmp_path / "sparse.onnx", compact, torch.randn(4, 3, 32, 32))


def test_gated_model_exports_with_a_warning(tmp_path):
    build, inputs = FOLD_ZOO["residual_add"]
    x = inputs()[0]
    gated = hf.insert_gates(build().eval(), hf.GateConfig(seed=0), example_inputs=x).graph_module.eval()
    with pytest.warns(UserWarning, match="not a compact one"):
        rep = hf.export_onnx(gated, x, tmp_path / "g.onnx")
    assert rep.warnings and rep.max_abs_diff is not None


def test_unsupported_op_names_the_node(tmp_path):
    class Hist(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.histc(self.fc(x), bins=4)

    with pytest.raises(hf.ExportError, match=r"at node %histc.*aten.histc"):
        hf.export_onnx(hf.trace(Hist(), torch.randn(3, 4)), torch.randn(3, 4), tmp_path / "h.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_and_failed_check_leave_no_file(tmp_path):
    build, inputs = FOLD_ZOO["concat"]
    x = inputs()[0]
    _, compact = _compact(build().eval(), x)
    with pytest.raises(hf.ExportError, match="cannot write"):
        hf.export_onnx(compact, x, tmp_path / "missing_dir" / "m.onnx")
    with pytest.raises(hf.ExportCheckError, match="max abs diff") as info:  # an impossible tolerance
        hf.export_onnx(compact, x, tmp_path / "m.onnx", rtol=0.0, atol=-1.0)
    assert info.value.report.max_abs_diff is not None
    assert list(tmp_path.iterdir()) == []


def test_measure_latency_reports_median_and_p90(tmp_path):
    build, inputs = FOLD_ZOO["residual_add"]
    x = inputs()[0]
    _, compact = _compact(build().eval(), x)
    hf.export_onnx(compact, x, tmp_path / "m.onnx")
    lat = hf.measure_latency(tmp_path / "m.onnx", batch_sizes=(1, 4), warmup=1, repeats=5)
    assert set(lat) == {1, 4}
    assert all(0 < v["median_ms"] <= v["p90_ms"] for v in lat.values())


def test_export_of_a_compact_model_raises_no_warning(tmp_path):
    build, inputs = FOLD_ZOO["no_bias_chain"]
    x = inputs()[0]
    _, compact = _compact(build().eval(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.export_onnx(compact, x, tmp_path / "m.onnx")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_onnx_file_follows_the_umask(tmp_path, umask):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    old = os.umask(umask)
    try:
        hf.export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o666 & ~umask


class _BiasHidesError(nn.Module):
    """Logits ~1000 from the bias; the exported file alone adds 0.5% of the input-dependent part."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.bias.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if torch.onnx.is_in_onnx_export():
            y = y + 0.005 * (y - 1000.0)
        return y


def test_parity_is_judged_on_the_input_dependent_part(tmp_path):
    # max|y| ~ 1000 would let this 0.5% error through (1e-4 x 1000 = 0.1 >> ~2e-3); the spread does not
    with pytest.raises(hf.ExportCheckError, match="differs"):
        hf.export_onnx(_BiasHidesError().eval(), torch.randn(2, 4), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_compare_latency_measures_files_side_by_side(tmp_path):
    from hyperflux_fx.export import compare_latency

    small, big = nn.Sequential(nn.Linear(8, 8)).eval(), nn.Sequential(nn.Linear(64, 8192), nn.Linear(8192, 8)).eval()
    hf.export_onnx(small, torch.randn(2, 8), tmp_path / "small.onnx")
    hf.export_onnx(big, torch.randn(2, 64), tmp_path / "big.onnx")
    a, b, a2 = compare_latency([tmp_path / "small.onnx", tmp_path / "big.onnx", tmp_path / "small.onnx"], batch=4,
                               repeats=20)
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in (a, b, a2))
    assert b["median_ms"] > 3 * max(a["median_ms"], a2["median_ms"])  # ~600k MACs per sample against 64
