"""hyperflux-compile end to end on digits, --plan, --resume, the report, and bad input.

Runs are short (2 dense + 2 pruning + 1 regrowth epochs) so the suite stays fast; they check that
the outputs are consistent, not that the model is good (bench_sparsity does that).
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from speedup import measured_speedup

import hyperflux_fx as hf
from hyperflux_fx.analysis.cost_model import CostModel
from hyperflux_fx.analysis.latency_model import LatencyModel
from hyperflux_fx.analysis.runtime import nchwc_block
from hyperflux_fx.cli import main
from hyperflux_fx.config import FoldConfig, GateConfig
from hyperflux_fx.frontend.sources import load_source
from hyperflux_fx.passes import insert_gates
from hyperflux_fx.report.html import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "digits_cnn.py")
SPEEDUP_BAND = 0.10  # README: latency targets land within 10% of the speed-up asked
FAST = ["--dense-epochs", "2", "--epochs", "2", "--regrowth-epochs", "1", "--quiet"]


def test_plan_on_the_embedded_example(capsys):
    assert main([EXAMPLE, "--plan", "--granularity", "weight"]) == 0
    out = capsys.readouterr().out
    assert "10 weight tensors gated" in out and "layer3.conv2.weight" in out
    assert "bn1.weight" not in out and "9  normalisation parameter (BatchNorm2d)" in out  # counted by reason
    assert main([EXAMPLE, "--plan", "--granularity", "weight", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "bn1.weight" in out  # and listed one by one
    from hyperflux_fx.analysis.latency_model import cache_key, cache_path

    key = cache_key()  # the latency table's key, ISA flags included, and its file
    line = next(line for line in out.splitlines() if line.startswith("latency cache key"))
    assert f"isa {','.join(key['isa']) or '-'}," in line and f"onnxruntime {key['ort']}" in line
    assert f"NCHWc block {key['nchwc_block']}" in line and cache_path().name in line


def test_plan_channel_granularity_leads_with_the_groups(capsys):
    assert main([EXAMPLE, "--plan", "--granularity", "channel"]) == 0
    out = capsys.readouterr().out
    first = out.split("\n\n")[1].splitlines()[0]
    assert first.startswith("insert_gates: ") and "channel groups gated" in first and "0 weight tensors" not in first
    assert "gateable channel share 1.00" in out and "consumed by the graph output" in out


def test_plan_json(capsys):
    assert main([EXAMPLE, "--plan", "--json", "--granularity", "weight", "--exclude", "fc.*"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [g["name"] for g in data["gated"]]
    assert len(names) == 9 and "fc.weight" not in names
    assert set(data["latency_cache_key"]) >= {"cpu", "isa", "ort", "nchwc_block", "schema"}


RUNS = {"weight": ["--granularity", "weight", "--target-sparsity", "0.7"],
        "defaults": []}  # the defaults: channel gates, 0.5 of the MACs, round_to="auto"


def _run_under_a_restrictive_umask(out: Path, *args: str) -> None:
    old_umask = os.umask(0o027)  # every output must follow it (0o640), none be 0o600
    try:
        assert main([EXAMPLE, "--out", str(out), *args, *FAST]) == 0
    finally:
        os.umask(old_umask)


@pytest.fixture(scope="module")  # `make test` runs --dist loadfile: one worker runs this module, once
def default_run(tmp_path_factory) -> Path:
    """The CLI with its defaults and FAST's epochs, once (read, never written, by its users)."""
    out = tmp_path_factory.mktemp("default") / "run"
    _run_under_a_restrictive_umask(out, *RUNS["defaults"])
    return out


@pytest.mark.parametrize("run", sorted(RUNS))
def test_end_to_end_on_digits(tmp_path, run, request):
    if run == "defaults":
        out = request.getfixturevalue("default_run")
    else:
        out = tmp_path / "run"
        _run_under_a_restrictive_umask(out, *RUNS[run])
    for name in ("compact.onnx", "compact.pt", "summary.json", "metrics.jsonl", "report.html", "run.log",
                 "checkpoints/last.pt"):
        assert (out / name).exists(), name
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    assert not out.with_name("run.partial").exists()
    s = json.loads((out / "summary.json").read_text())
    for field in ("source", "target_sparsity", "achieved_sparsity", "granularity", "dense_accuracy", "pruned_accuracy",
                  "compact_accuracy", "params_dense", "params_compact", "macs_dense", "macs_compact",
                  "onnx_parity_max_abs_diff", "ort_latency_ms_dense", "ort_latency_ms_compact", "wall_seconds",
                  "sparsity_before_landing", "controller_lookahead", "epochs", "regrowth_epochs"):
        assert field in s and s[field] is not None, field
    granularity = s["granularity"]
    if run == "defaults":
        assert (granularity, s["target_measure"], s["target_sparsity"]) == ("channel", "macs", 0.5)
        assert (s["recipe"], s["epochs"], s["regrowth_epochs"]) == ("cnn", 2, 1)  # FAST's, as given
        assert s["round_to"] == (nchwc_block() or 1) and s["min_conv_channels"] == 16  # the same on every CPU
        assert (s["land_at"], s["regrowth_lr"]) == (0.0, pytest.approx(0.1))  # channel gates: land, fine-tune from lr
        # the exact cost model: what training reports is what the compact model measures, within 1 pt of the aim
        assert s["achieved_sparsity"] == pytest.approx(1 - s["macs_compact"] / s["macs_dense"], abs=1e-12)
        assert abs(s["achieved_sparsity"] - 0.5) <= 0.01
        assert s["onnx_file_bytes"] < 0.8 * s["onnx_file_bytes_dense"]  # smaller (faster: tools/bench_speed.py)
        # channel gates: decoupled pressure, no look-ahead, distillation from the dense model; the landing corrects
        # the last step only (the controller brought the pruning phase to the target itself)
        assert (s["pressure"], s["controller_lookahead"], s["distilled"]) == ("decoupled", 0, True)
        assert s["flux_normalization"] == "element"  # the paper's Adam (shared: only when asked)
        assert abs(s["sparsity_before_landing"] - 0.5) <= 0.03
    else:
        assert abs(s["achieved_sparsity"] - 0.7) <= 0.005
        assert (s["land_at"], s["regrowth_lr"]) == (0.5, pytest.approx(0.3 * 0.1))  # weight gates: landing mid-regrowth
        assert (s["pressure"], s["distilled"]) == ("coupled", False)  # the paper's dynamics and recipe
        assert s["flux_normalization"] == "element"  # the paper's Adam
        assert s["controller_lookahead"] >= 1
    assert s["law"] is None and s["law_note"].startswith("no law fitted")  # never a fit on a scheduled run
    assert 0.0 < s["sparsity_before_landing"] < 1.0
    assert s["params_compact"] < s["params_dense"]
    assert s["onnx_parity_max_abs_diff"] < 1e-3
    assert abs(s["compact_accuracy"] - s["pruned_accuracy"]) <= 1 / 360 + 1e-9  # at most one image flips
    if granularity == "channel":
        assert s["macs_compact"] < s["macs_dense"] and s["deleted_units"] > 0
        # the demo's unit timeline ends on exactly what the fold kept, group by group
        folded = json.loads((out / "reports.json").read_text())["fold"]["groups"]
        last = {name: int(rows[-1].sum()) for name, rows in hf.timeline(out).items()}
        assert last and all(last[g["name"]] == g["after"] for g in folded if g["name"] in last)
        assert set(last) <= {g["name"] for g in folded}
    else:  # 70% zeros overall: the tensors sparse enough are stored sparsely, and the file is smaller
        assert s["onnx_sparse_initializers"] > 0 and s["onnx_file_bytes"] < 0.9 * s["onnx_file_bytes_dense"]
        # the weight timeline ends on exactly the weights the compact model keeps, tensor by tensor
        state = torch.load(out / "compact.pt", weights_only=True)["state_dict"]
        numel = {name: int(h[0].sum()) for name, h in hf.flux_histograms(out)[1].items()}
        last = {name: round(float(rows[-1]) * numel[name]) for name, rows in hf.timeline(out).items()}
        assert last and all(last[name] == int(state[name].count_nonzero()) for name in last), last
    assert s["speedup"] == s["ort_latency_ms_dense"] / s["ort_latency_ms_compact"]
    assert s["faster_than_dense"] == (s["speedup"] >= 1.05) and (s["latency_note"] is None) == (s["speedup"] >= 0.95)
    saved = torch.load(out / "compact.pt", weights_only=True)
    assert "def forward" in saved["code"] and saved["state_dict"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["phase"] == "regrow"
    _check_report(out / "report.html", s)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.tables = 0
        self.rows_per_table: list[int] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables += 1
            self.rows_per_table.append(0)
        elif tag == "tr" and self.rows_per_table:
            self.rows_per_table[-1] += 1


def _check_report(path: Path, summary: dict) -> None:
    from PIL import Image

    text = path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    # figures that mean something for this run: the fold chart only where channels were deleted, the
    # law plot only with a law; the page opens on the headline and the asked/got table
    assert len(parser.imgs) >= 5
    assert ("Surviving channels per layer" in text) == (summary["deleted_units"] > 0)
    channel_run = summary["granularity"] != "weight"  # the unit timeline's figures: channel units only
    assert ("Kept fraction per group and interval" in text) == channel_run
    assert ("most active groups" in text) == channel_run
    assert "fitted law" not in text and "no law fitted" in text
    assert "Loss per interval" in text  # the learning beside the density trajectory: train and validation loss
    assert ("Per-group sensitivity" in text) == channel_run == (summary["sensitivity"] is not None)
    assert "<p class='headline'>" in text and "What you asked, what you got" in text
    # the figures by the question they answer, in the order a reader asks; the long tables folded
    at = [text.find(f"<h2>{section}</h2>") for section in SECTIONS]
    assert all(i >= 0 for i in at[1:]) and [i for i in at if i >= 0] == sorted(i for i in at if i >= 0)
    assert "Flux distribution of survivors and pruned units" in text and "Flux against pressure, per layer" in text
    assert "<details><summary><h2 style='display:inline'>Skipped parameters and ops" in text
    assert "0.43440999" not in text and str(summary["wall_seconds"]) not in text  # no raw float noise
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.verify()
        assert img.format == "PNG"
    assert parser.tables >= 4 and all(rows >= 2 for rows in parser.rows_per_table)  # header + at least one row


@pytest.mark.serial  # asserts a measured ORT speed-up: run alone (pyproject.toml)
def test_a_speedup_target_predicts_and_measures_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERFLUX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    # shorter than FAST (it runs alone): what is asserted is the latency model and the landing, not the training
    assert main([EXAMPLE, "--out", str(out), "--target-speedup", "1.5", "--dense-epochs", "1", "--epochs", "1",
                 "--regrowth-epochs", "0.5", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["target_measure"] == "latency" and s["target_speedup"] == 1.5
    assert s["target_sparsity"] == pytest.approx(1 - 1 / 1.5)
    table = s["latency_table"]
    assert table["measured"] > 0 and table["timed_ops"] > 0 and (tmp_path / "cache").exists()  # a cold cache
    assert s["latency_predicted_ms_compact"] > 0 and s["ort_latency_ms_compact"] > 0
    # the claim (README): a latency target lands within 10% of the speed-up asked, measured in ORT. One
    # retry for noise: the dense model exported again and timed side by side with compact.onnx
    measured = measured_speedup(s, out, EXAMPLE, lambda x: abs(x / 1.5 - 1) <= SPEEDUP_BAND)
    assert abs(measured / 1.5 - 1) <= SPEEDUP_BAND, (s["speedup"], measured)
    # what the predicted latency fraction says is what training reported (the measured one is benchmarked)
    assert s["achieved_sparsity"] == pytest.approx(1 - table["predicted_compact_ms"] / table["predicted_dense_ms"],
                                                   abs=1e-9)
    assert s["achieved_sparsity"] == pytest.approx(1 - 1 / s["latency_predicted_speedup"], abs=1e-9)
    # in ms, the prediction is anchored on the dense model measured beside the compact one
    anchored = s["ort_latency_ms_dense"] / s["latency_predicted_speedup"]
    assert s["latency_predicted_ms_compact"] == pytest.approx(anchored)
    assert len(table["calibration"]) == 10  # the dense model and nine compact ones, each timed beside the dense
    # warm: the table of the same gated model, the same batch and fold, is all read from the cache
    loaded = load_source(EXAMPLE)
    gated = insert_gates(loaded.model, GateConfig(granularity="channel"), example_inputs=loaded.example_inputs)
    fold = FoldConfig(round_to=s["round_to"], round_to_width=s["round_to_width"],
                      min_conv_channels=s["min_conv_channels"])
    warm = LatencyModel(CostModel(gated.graph_module, fold), cache_dir=tmp_path / "cache")
    assert warm.measured == 0 and len(warm.ops) == table["timed_ops"]


def _tree(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_resume_after_an_interrupted_run(tmp_path, capsys):
    """Interrupted after 5 intervals: a resume with other settings is refused before a byte is written;
    `report` renders what exists; a resume with the run's own settings finishes it (no export: what is
    resumed is the training; test_resume_after_the_landing_gives_the_uninterrupted_result exports)."""
    import re

    out = tmp_path / "run"
    assert main([EXAMPLE, "--out", str(out), "--max-intervals", "5", *FAST, "--no-export"]) == 0
    partial = out.with_name("run.partial")
    assert partial.exists() and not out.exists()
    assert torch.load(partial / "checkpoints" / "last.pt", weights_only=True)["intervals"] == 5
    before = _tree(partial)
    capsys.readouterr()
    assert main([EXAMPLE, "--out", str(out), "--resume", "--round-to", "4", *FAST, "--no-export"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperflux-compile: error: --resume:") and "\n" not in err, err
    assert "fold: checkpoint={" in err and "'round_to': 4" in err, err  # says which setting differs
    assert _tree(partial) == before and not out.exists()  # not a byte written, run.log included
    assert main(["report", str(out)]) == 0  # the interrupted run: what exists, and where it stopped
    page = (partial / "report.html").read_text()
    assert "stopped after interval 5" in page and "--resume" in page and "Kept fraction per group" in page
    assert main([EXAMPLE, "--out", str(out), "--resume", *FAST, "--no-export"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert abs(s["achieved_sparsity"] - 0.5) <= 0.01 and not partial.exists()  # the default: 0.5 of the MACs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["interval"] for r in records] == list(range(1, len(records) + 1))
    first = (out / "report.html").read_text()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0  # a finished run: the same figures and tables
    again = (out / "report.html").read_text()
    figures = re.compile(r"<img alt='([^']*)'")
    assert figures.findall(again) == figures.findall(first) and "Interrupted" not in again
    assert again.count("<tr>") == first.count("<tr>")
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_resume_after_the_landing_gives_the_uninterrupted_result(tmp_path, default_run):
    full = default_run
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    landed = next(r["interval"] for r in records if r["landing"])
    assert landed < len(records)  # there are intervals after the landing to interrupt
    out = tmp_path / "resumed"
    assert main([EXAMPLE, "--out", str(out), "--max-intervals", str(landed + 1), *FAST]) == 0
    ckpt = torch.load(out.with_name("resumed.partial") / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["frozen"] and ckpt["intervals"] == landed + 1
    assert main([EXAMPLE, "--out", str(out), "--resume", *FAST]) == 0
    timing = {"wall_seconds", "ort_latency_ms_dense", "ort_latency_ms_compact", "speedup", "faster_than_dense",
              "latency_note"}  # measured times and what is derived from them
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, out))
    for summary in (a, b):  # the per-group sensitivity runs under a time budget: a loaded machine measures fewer
        summary.pop("sensitivity")  # groups (the shared run and this one may have run under different loads)
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    ca, cb = (torch.load(d / "compact.pt", weights_only=True) for d in (full, out))
    assert ca["code"] == cb["code"] and ca["state_dict"].keys() == cb["state_dict"].keys()
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])


BAD_FILES = {
    "not_a_summary.json": ('{"accuracy": 0.9}', ""),
    "syntax.py": ("def build_model(:\n", "syntax error"),
    "nobuild.py": ("x = 1\n", "build_model"),
    "untraceable.py": (("import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                       "        self.fc = torch.nn.Linear(3, 3)\n    def forward(self, x):\n"
                       "        return self.fc(x) if x.sum() > 0 else x\n"
                       "def build_model():\n    return M()\ndef example_inputs():\n    return torch.ones(2, 3)\n"),
                       "cannot trace"),
    "random_eval.py": (("import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                        "        self.fc = torch.nn.Linear(3, 3)\n    def forward(self, x):\n"
                        "        return self.fc(torch.nn.functional.dropout(x, 0.5))\n"
                        "def build_model():\n    return M()\ndef example_inputs():\n    return torch.ones(2, 3)\n"),
                       "not deterministic in eval mode"),
    "nothing_gateable.py": (("import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n"
                             "        super().__init__()\n"
                             "        self.c = torch.nn.Conv2d(3, 8, 3)\n        self.fc = torch.nn.Linear(8, 3)\n"
                             "    def forward(self, x):\n"
                             "        return self.fc(torch.roll(self.c(x), 1, dims=1).mean((2, 3)))\n"
                             "def build_model():\n    return M()\n"
                             "def example_inputs():\n    return torch.ones(2, 3, 8, 8)\n"),
                            "roll over the channels (8 channels in 1 group, e.g. at roll). "
                            "Try --granularity weight"),
}


@pytest.mark.parametrize(("args", "match"), [
    (["missing_model.py"], "not found"),
    (["FILE:syntax.py"], "syntax error"),
    (["FILE:nobuild.py"], "build_model"),
    (["FILE:untraceable.py"], "cannot trace"),
    (["FILE:random_eval.py", "--data", "synthetic", "--num-classes", "3", "--granularity", "weight"],
     "not deterministic in eval mode"),
    (["FILE:nothing_gateable.py", "--data", "synthetic", "--num-classes", "3"],
     "nothing to prune at --granularity channel: no channel group can be gated: roll over the channels "
     "(8 channels in 1 group, e.g. at roll). Try --granularity weight"),
    ([EXAMPLE, "--input-shape", "2,3,9,9"], "does not run on example inputs"),
    ([EXAMPLE, "--target-sparsity", "1.5"], "--target-sparsity must be in (0, 1)"),
    ([EXAMPLE, "--target-sparsity", "0"], "--target-sparsity must be in (0, 1)"),
    (["torchvision:resnet18", "--num-classes", "10", "--input-shape", "2,3,32,32", "--data", "cifar10:/nonexistent"],
     "cifar-10-batches-py"),
    ([EXAMPLE, "--data", "imagenet"], "unknown dataset"),
    (["timm:resnet_18"], "did you mean"),
    # the argument parser's own paths
    ([EXAMPLE, "--input-shape", "2,x,y"], "not a shape"),
    ([EXAMPLE, "--input-shape", "2,0,8,8"], "positive integers"),
    ([EXAMPLE, "--granularity", "block"], "invalid choice: 'block'"),
    ([EXAMPLE, "--regrowth-epochs", "-1"], "--regrowth-epochs must be >= 0"),
    ([EXAMPLE, "--epochs", "0"], "--epochs must be positive"),
    ([EXAMPLE, "--epochs", "nan"], "not a number of epochs"),
    ([EXAMPLE, "--epochs", "two"], "not a number of epochs"),
    ([EXAMPLE, "--batch-size", "0"], "--batch-size must be positive"),
    ([EXAMPLE, "--granularity", "weight", "--target", "params"], "needs --granularity channel or hybrid"),
    ([EXAMPLE, "--target-speedup", "0.5"], "--target-speedup must be > 1"),
    ([EXAMPLE, "--target", "latency", "--no-export"], "drop --no-export"),
    ([EXAMPLE, "--target-speedup", "2", "--target-sparsity", "0.5"], "give one of them"),
    ([EXAMPLE, "--target-speedup", "2", "--target", "params"], "cannot go with --target params"),
    ([EXAMPLE, "--granularity", "weight", "--target", "latency"], "needs --granularity channel or hybrid"),
    # checks on the gated model before the dense training: the default 10 dense epochs never start
    ([EXAMPLE, "--dense-epochs", "10", "--target", "params", "--target-sparsity", "0.99", "--round-to", "16"],
     "out of reach"),
    ([EXAMPLE, "--round-to", "FILE:not_a_summary.json"], "not a summary.json with round_to"),
    ([EXAMPLE, "--round-to-width", "0"], "not a channel multiple"),
    ([EXAMPLE, "--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1]"),
    ([EXAMPLE, "--distill-temperature", "0"], "--distill-temperature must be > 0"),
    ([EXAMPLE, "--round-to", "0"], "not a channel multiple"),
    ([EXAMPLE, "--round-to", "eight"], "not a channel multiple"),
    ([EXAMPLE, "--uniform-layers"], "no repeated layers"),  # a CNN without numbered layers
    ([EXAMPLE, "--uniform-layers", "--granularity", "weight"], "uniform_layers needs target_measure"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, match):
    for name, (text, _) in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a[5:]) if a.startswith("FILE:") else a for a in args]
    out = tmp_path / "out"
    assert main(["--out", str(out), *FAST, *args]) == 2  # the case's own flags come last and win
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperflux-compile: error:") and match in err and "\n" not in err, err
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in BAD_FILES)
    assert not left, f"left in the parent directory: {left}"  # nothing written anywhere beside --out either


def test_existing_out_needs_resume_or_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([EXAMPLE, "--out", str(out), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_device_cuda_without_gpu(tmp_path, capsys):
    assert main([EXAMPLE, "--device", "cuda", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_nan_loss_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    model_py = tmp_path / "nan_model.py"
    model_py.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'examples')!r})\n"
        "from digits_cnn import build_model, example_inputs, datasets\n"
        "calls = [0]\n"
        "def loss_fn(out, y):\n"
        "    calls[0] += 1\n"
        "    loss = torch.nn.functional.cross_entropy(out, y)\n"
        "    return loss * float('nan') if calls[0] > 60 else loss\n")
    out = tmp_path / "out"
    assert main([str(model_py), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "loss became nan" in err and "--resume" in err
    ckpt = torch.load(out.with_name("out.partial") / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["intervals"] >= 1 and not out.exists()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "hyperflux_fx.cli", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0 and "--plan" in proc.stdout and "--target-sparsity" in proc.stdout


def test_round_to_from_a_summary_reuses_both_resolved_multiples(tmp_path):
    """A fold on another machine can reuse what a run resolved: --round-to OLD/summary.json."""
    from hyperflux_fx.cli import build_parser
    from hyperflux_fx.cli.args import fold_config

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"round_to": 8, "round_to_width": 1, "accuracy": 0.9}))
    args = build_parser().parse_args([EXAMPLE, "--round-to", str(summary)])
    assert fold_config(args) == FoldConfig(round_to=8, round_to_width=1)
    args = build_parser().parse_args([EXAMPLE, "--round-to", str(summary), "--round-to-width", "4"])
    assert fold_config(args) == FoldConfig(round_to=8, round_to_width=4)  # an explicit flag still wins
    assert fold_config(args).min_conv_channels == 1  # a summary from before the conv floor: the block was the floor
    summary.write_text(json.dumps({"round_to": 8, "round_to_width": 1, "min_conv_channels": 16}))
    args = build_parser().parse_args([EXAMPLE, "--round-to", str(summary)])
    assert fold_config(args) == FoldConfig(round_to=8, round_to_width=1, min_conv_channels=16)
    args = build_parser().parse_args([EXAMPLE, "--round-to", str(summary), "--min-conv-channels", "4"])
    assert fold_config(args).min_conv_channels == 4
    assert fold_config(build_parser().parse_args([EXAMPLE])) == FoldConfig()  # the defaults: all three "auto"


def test_a_calibration_from_another_machine_is_measured_again(tmp_path):
    from types import SimpleNamespace

    from hyperflux_fx.analysis.latency_model import cache_key
    from hyperflux_fx.cli.latency import CALIBRATION_FILE, _saved_calibration

    job = SimpleNamespace(partial=tmp_path, args=SimpleNamespace(quiet=True))
    points = [[{"0": 16}, 2.0], [{"0": 8}, 1.2]]
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"key": cache_key(), "points": points}))
    assert _saved_calibration(job) == [({0: 16}, 2.0), ({0: 8}, 1.2)]
    other = {**cache_key(), "isa": ["avx2", "fma"]}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"key": other, "points": points}))
    assert _saved_calibration(job) is None
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(points))  # the format before the key
    assert _saved_calibration(job) is None
