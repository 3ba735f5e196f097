"""A compact language model back as a Hugging Face folder that ``from_pretrained`` loads.

The fold keeps Hugging Face's parameter names (the capture of an ``hf:`` source holds the model under
``model.``), so the compact weights map back one to one. What changes is the config: ``hidden_size``
(the residual width), ``num_attention_heads`` and ``num_key_value_heads`` (query and KV heads kept, at
the unchanged ``head_dim``, which is written out) and ``intermediate_size`` (MLP units), read off the
compact weights. A Hugging Face config has one value of each for every layer, so a folder is written
only when every decoder layer kept the same numbers; otherwise :class:`NotUniform` says which layer
differs. Llama-shaped decoders (Llama, Qwen2, Mistral: ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``) are supported; other architectures raise :class:`NotUniform` saying so.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperflux_fx.frontend.hf import quietly

__all__ = ["HF_DECODERS", "HFFolder", "NotUniform", "check_hf_folder", "compact_config", "save_hf_folder"]

HF_DECODERS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class NotUniform(ValueError):
    """The compact model has no single Hugging Face config: why."""


@dataclass(frozen=True)
class HFFolder:
    """What :func:`save_hf_folder` wrote."""

    path: Path
    config: dict  # the changed fields: hidden_size, heads, KV heads, intermediate_size, head_dim


def _stripped(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, by their Hugging Face names (no copy)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _per_layer(weights: dict[str, torch.Tensor], head_dim: int) -> dict[int, tuple[int, int, int]]:
    """Per decoder layer: (query heads, KV heads, MLP units) kept."""
    layers: dict[int, dict[str, int]] = {}
    for name, w in weights.items():
        if (m := _LAYER.match(name)) is not None and name.endswith(".weight"):
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = int(w.shape[0])
    out = {}
    for i, rows in sorted(layers.items()):
        try:
            q, k, mlp = rows["self_attn.q_proj.weight"], rows["self_attn.k_proj.weight"], rows["mlp.gate_proj.weight"]
        except KeyError as exc:
            raise NotUniform(f"layer {i} has no {exc.args[0]}: not a Llama-shaped decoder layer") from exc
        out[i] = (q // head_dim, k // head_dim, mlp)
    return out


def compact_config(config: dict, state: Mapping[str, torch.Tensor], prefix: str = "model.") -> dict:
    """The changed config fields of the compact model whose weights are ``state`` (see the module
    docstring). Raises :class:`NotUniform`."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in HF_DECODERS:
        raise NotUniform(f"{arch}: a Hugging Face folder is written for {', '.join(HF_DECODERS)} only")
    weights = _stripped(state, prefix)  # only their shapes are read
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    layers = _per_layer(weights, head_dim)
    if not layers:
        raise NotUniform("no decoder layer found under model.layers")
    first = layers[min(layers)]
    for i, kept in layers.items():
        if kept != first:
            what = ("query heads", "KV heads", "MLP units")
            j = next(n for n in range(3) if kept[n] != first[n])
            raise NotUniform(f"layer {i} keeps {kept[j]} {what[j]}, layer {min(layers)} keeps {first[j]}: a Hugging "
                             "Face config has one number per model (--uniform-layers keeps every layer alike)")
    heads, kv_heads, mlp = first
    if heads % kv_heads:
        raise NotUniform(f"{heads} query heads over {kv_heads} KV heads: not a whole number per KV head")
    return {"hidden_size": int(weights["model.embed_tokens.weight"].shape[1]), "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": mlp, "head_dim": head_dim}


def save_hf_folder(state: Mapping[str, torch.Tensor], source: str | Path, out: str | Path,
                   prefix: str = "model.") -> HFFolder:
    """Write the compact model whose weights are ``state`` (the compact graph's state dict) as a Hugging
    Face folder ``out``: config.json from ``source``'s with the kept sizes, model.safetensors, and
    ``source``'s tokenizer files. Raises :class:`NotUniform` (nothing written) when there is no single
    config for it."""
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    config = json.loads((source / "config.json").read_text())
    changed = compact_config(config, state, prefix)
    weights = {k: v.detach().cpu().contiguous() for k, v in _stripped(state, prefix).items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" in weights:
        weights.pop("lm_head.weight")  # tied: the embedding is the head
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, **changed}, indent=2, sort_keys=True))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return HFFolder(out, changed)


def check_hf_folder(path: str | Path, compact: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """Load ``path`` with ``AutoModelForCausalLM.from_pretrained`` and return the largest difference of
    its logits from the compact graph's on ``inputs``. Raises :class:`NotUniform` when loading reports
    missing, unexpected or mismatched keys."""
    import transformers

    model, info = quietly(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        str(path), output_loading_info=True, local_files_only=True))
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise NotUniform(f"from_pretrained({path}) reports {problems or info['error_msgs']}")
    with torch.no_grad():
        theirs = model.eval()(*inputs, use_cache=False).logits
        ours = compact.eval()(*inputs)
    return float((theirs.float() - ours.float()).abs().max())
