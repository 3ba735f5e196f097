"""The compact language model back as a Hugging Face folder (export/hf_folder.py); skips without [hf]."""

from __future__ import annotations

import json

import pytest
import torch

import hyperflux_fx as hf
from hyperflux_fx.export.hf_folder import NotUniform, check_hf_folder, save_hf_folder
from hyperflux_fx.frontend.hf import quietly
from hyperflux_fx.frontend.sources import load_source

transformers = pytest.importorskip("transformers")


def _folder(tmp_path, kind: str):
    """A saved tiny decoder of ``kind`` with grouped-query attention (4 query heads over 2 KV heads)."""
    cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
                "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[kind]
    config = cfg(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=48, max_position_embeddings=64)
    config.architectures = [cls.__name__]
    torch.manual_seed(0)
    quietly(lambda: cls(config).save_pretrained(tmp_path / kind))
    return tmp_path / kind


def _folded(folder, keep_per_gate):
    loaded = load_source(f"hf:{folder}", input_shape=(2, 12))
    gm = hf.insert_gates(loaded.model, hf.GateConfig(granularity="channel"), example_inputs=loaded.example_inputs,
                         frontend="export").graph_module
    with torch.no_grad():
        for i, g in enumerate(hf.gates(gm)):
            g.flow.copy_(torch.where(torch.arange(g.numel) < keep_per_gate(i, g.numel), 1.0, -1.0))
    return loaded, hf.fold_masks(gm, hf.FoldConfig(round_to=1)).graph_module


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_a_uniform_compact_model_loads_with_from_pretrained_and_generates(tmp_path, kind):
    source = _folder(tmp_path, kind)
    loaded, compact = _folded(source, lambda i, n: max(1, n * 3 // 4))  # the same share of every gate
    out = save_hf_folder(compact.state_dict(), source, tmp_path / "compact_hf")
    config = json.loads((out.path / "config.json").read_text())
    assert config["hidden_size"] < 32 and config["intermediate_size"] < 48 and config["head_dim"] == 8
    # the head gate's 2 query positions keep 1 (3/4 of 2, rounded down): one query head per KV group
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 2
    diff = check_hf_folder(out.path, compact, loaded.example_inputs)  # no missing / unexpected / mismatched key
    spread = float(compact(*loaded.example_inputs).abs().max())
    assert diff <= 1e-5 * spread
    model = transformers.AutoModelForCausalLM.from_pretrained(out.path).eval()
    prompt = loaded.example_inputs[0][:1, :6]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)  # the KV cache gives the same greedy tokens


def test_a_model_whose_layers_differ_has_no_folder_and_says_which(tmp_path):
    source = _folder(tmp_path, "llama")
    # the MLP gate of the second layer keeps fewer units than the first's
    _, compact = _folded(source, lambda i, n: n // 2 if (n == 48 and i > 3) else n)
    with pytest.raises(NotUniform, match=r"layer 1 keeps \d+ MLP units, layer 0 keeps 48: .*--uniform-layers keeps"):
        save_hf_folder(compact.state_dict(), source, tmp_path / "compact_hf")
    assert not (tmp_path / "compact_hf").exists()


def test_a_folder_transformers_refuses_is_a_note_not_a_failed_run(tmp_path, monkeypatch):
    # LlamaConfig's validation raises huggingface_hub's StrictDataclassClassValidationError (an Exception,
    # not a ValueError) for a width that is no multiple of the heads: the run's other files must stand
    from types import SimpleNamespace

    from hyperflux_fx.cli import export as stage
    from hyperflux_fx.frontend.hf import language_model_loss
    from hyperflux_fx.frontend.sources import LoadedModel

    class Refused(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Refused("The hidden size (145) is not a multiple of the number of attention heads (4).")

    monkeypatch.setattr(stage, "save_hf_folder", refuse)
    job = SimpleNamespace(loaded=LoadedModel(torch.nn.Linear(2, 2), (), "hf:somewhere", loss_fn=language_model_loss),
                          partial=tmp_path,
                          args=SimpleNamespace(source="hf:somewhere", uniform_layers=False, quiet=True))
    out = stage.hf_folder(job, torch.nn.Linear(2, 2))
    assert out["hf_folder"] is None and "not a multiple of the number of attention heads" in out["hf_folder_note"]
    assert "--uniform-layers" in out["hf_folder_note"] and not (tmp_path / stage.HF_FOLDER).exists()
