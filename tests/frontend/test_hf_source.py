"""``hf:DIR`` sources and the offline text set; the Hugging Face parts skip without ``pip install .[hf]``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from speedup import measured_speedup

from hyperflux_fx.cli import main
from hyperflux_fx.frontend import SourceError, load_source
from hyperflux_fx.frontend.text import TEXT_VOCAB, text_corpus, text_datasets
from hyperflux_fx.report.summary import FASTER

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = f"hf:{ROOT / 'examples' / 'hf_tiny_llama'}"


def test_text_set_is_offline_deterministic_next_byte_windows():
    train, val = text_datasets(32)
    assert len(train) > 1000 and len(val) > 100
    x, y = train[0]
    assert x.shape == y.shape == (32,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])  # the target is the input shifted by one byte
    assert int(train.tensors[0].max()) < TEXT_VOCAB
    assert text_corpus().startswith(b"Command-line parsing library")  # argparse's docstring comes first
    assert torch.equal(text_datasets(32)[1].tensors[1], val.tensors[1])


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        load_source(f"hf:{tmp_path}")


def test_hf_source_is_captured_with_export(capsys):
    pytest.importorskip("transformers")
    loaded = load_source(TINY_LLAMA)
    assert loaded.frontend == "export" and loaded.example_inputs[0].shape == (2, 64)
    assert main([TINY_LLAMA, "--plan", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["channel_groups"]
    gated = [g for g in groups if g["gated"]]
    assert any(g["unit"] == "head" for g in gated) and len(gated) >= 5  # width, heads and MLP units per layer


@pytest.mark.serial  # asserts a measured ORT speed-up: run alone (pyproject.toml)
def test_hf_end_to_end_gives_a_faster_compact_model(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert main([TINY_LLAMA, "--out", str(out), "--input-shape", "2,32", "--dense-epochs", "0", "--epochs", "0.5",
                 "--regrowth-epochs", "0.5", "--quiet"]) == 0  # short: what is asserted is the fold and its speed
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "compact.onnx").is_file()
    assert summary["macs_compact"] < 0.75 * summary["macs_dense"]
    assert summary["params_compact"] < summary["params_dense"]
    if summary["hf_folder"] is None:  # learned masks differ from layer to layer: said, and nothing written
        assert "layer" in summary["hf_folder_note"] and not (out / "compact_hf").exists()
    else:
        assert (out / "compact_hf" / "config.json").is_file() and summary["hf_folder_max_abs_diff"] < 1e-4
    tokens = 2 * 32  # one forward pass over the example batch, in ONNX Runtime
    assert summary["tokens_per_s_compact"] == pytest.approx(tokens / summary["ort_latency_ms_compact"] * 1e3)
    assert summary["tokens_per_s_dense"] == pytest.approx(tokens / summary["ort_latency_ms_dense"] * 1e3)
    speedup = measured_speedup(summary, out, TINY_LLAMA, lambda x: x >= FASTER, input_shape=(2, 32))
    assert speedup >= FASTER, (summary["speedup"], speedup)  # faster in ORT, as the name says


def test_hf_folder_with_safetensors_loads_its_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=24)
    config.architectures = ["LlamaForCausalLM"]
    saved = transformers.LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path)
    assert any(tmp_path.glob("*.safetensors"))
    loaded = load_source(f"hf:{tmp_path}")
    mine = dict(loaded.model.model.named_parameters())
    assert all(torch.equal(mine[n], p) for n, p in saved.named_parameters())
