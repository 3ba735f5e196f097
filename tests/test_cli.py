"""hyperflux-compile --plan: the one thing the command does until training lands; bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hyperflux_fx.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_plan_on_the_embedded_example(capsys):
    assert main([str(ROOT / "examples" / "digits_cnn.py"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "10 tensors gated" in out and "layer3.conv2.weight" in out and "bn1.weight" in out


def test_plan_channel_granularity_lists_groups(capsys):
    assert main([str(ROOT / "examples" / "digits_cnn.py"), "--plan", "--granularity", "channel"]) == 0
    out = capsys.readouterr().out
    assert "channel groups" in out and "consumed by the graph output" in out


def test_plan_json(capsys):
    assert main([str(ROOT / "examples" / "digits_cnn.py"), "--plan", "--json", "--exclude", "fc.*"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [g["name"] for g in data["gated"]]
    assert len(names) == 9 and "fc.weight" not in names
    assert data["gated_elements"] == sum(g["numel"] for g in data["gated"])


@pytest.mark.parametrize(("args", "match"), [
    (["missing_model.py", "--plan"], "not found"),
    (["timm:resnet_18", "--plan"], "did you mean"),
    (["EXAMPLE", "--plan", "--input-shape", "2,3,9,9"], "does not run on example inputs"),
    (["EXAMPLE"], "only --plan"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, match):
    args = [str(ROOT / "examples" / "digits_cnn.py") if a == "EXAMPLE" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperflux-compile: error:") and match in err and "\n" not in err


def test_untraceable_model_file(tmp_path, capsys):
    f = tmp_path / "model.py"
    f.write_text("import torch\n"
                 "class M(torch.nn.Module):\n"
                 "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(3, 3)\n"
                 "    def forward(self, x):\n        return self.fc(x) if x.sum() > 0 else x\n"
                 "def build_model():\n    return M()\n"
                 "def example_inputs():\n    return torch.ones(2, 3)\n")
    assert main([str(f), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "cannot trace" in err and "leaf_modules" in err


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "hyperflux_fx.cli", "--help"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0 and "--plan" in proc.stdout and "--input-shape" in proc.stdout
