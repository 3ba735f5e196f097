"""--data text:PATH: the user's corpus, split by document, tokenised with the hf: folder's tokenizer."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from hyperflux_fx.cli import main
from hyperflux_fx.frontend.hf import quietly
from hyperflux_fx.frontend.text import (
    VALIDATION_PERCENT,
    TextError,
    corpus_datasets,
    load_tokens,
    read_documents,
    split_documents,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past", "fields", "of", "green", "grass",
         "under", "blue", "skies", "and", "children", "laughed", "at", "kites", "flying", "high", "above", "old",
         "stone", "walls"]


def _documents(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + "." for _ in range(n)]


def _tokenizer_folder(folder, vocab_extra: int = 0):
    """A word-level tokenizer trained offline on the corpus's words, with an end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = [f"w{i}" for i in range(vocab_extra)]
    tok.train_from_iterator([" ".join(WORDS + extra) + " ."],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return tok


def test_documents_from_txt_jsonl_and_a_folder(tmp_path):
    docs = _documents(6)
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:3]) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i})
                                                        for i, d in enumerate(docs[3:])) + "\n")
    assert read_documents(tmp_path / "a.txt") == docs[:3]
    assert read_documents(tmp_path / "sub" / "b.jsonl") == docs[3:]
    assert read_documents(tmp_path) == docs  # recursively, in sorted path order


@pytest.mark.parametrize(("content", "name", "match"), [
    (b"", "empty.txt", "no text"),
    (b"\n\n  \n", "blank.txt", "no text"),
    (b"caf\xe9 au lait", "latin1.txt", "not UTF-8"),
    (b'{"body": "hello"}\n', "nofield.jsonl", 'no "text" string field'),
    (b"hello", "notes.md", "expected a .txt or .jsonl"),
])
def test_bad_corpora_are_one_clear_error(tmp_path, content, name, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TextError, match=match):
        read_documents(tmp_path / name)


def test_the_split_is_by_document_hash_whatever_the_order():
    docs = _documents(400)
    train, val = split_documents(docs)
    assert len(train) + len(val) == 400 and not set(train) & set(val)
    assert abs(len(val) / 400 - VALIDATION_PERCENT / 100) < 0.05
    shuffled = docs[::-1]
    assert sorted(split_documents(shuffled)[1]) == sorted(val)  # each document decides for itself


def test_corpus_is_tokenised_with_the_folders_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    tok = _tokenizer_folder(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text("\n\n".join(_documents()))
    tokens = load_tokens(tmp_path / "model")
    assert tokens.vocab_size == tok.get_vocab_size() and tokens.eos_id == tok.token_to_id("</s>")
    train, val = corpus_datasets(tmp_path / "corpus.txt", 16, tokens)
    x, y = train[0]
    assert x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])
    ids = torch.cat([train.tensors[0].flatten(), val.tensors[0].flatten()])
    assert int(ids.max()) < tok.get_vocab_size() and tokens.eos_id in ids.tolist()  # documents end with </s>
    assert tok.token_to_id("[UNK]") not in ids.tolist()  # every word is known to the tokenizer
    assert load_tokens(tmp_path / "nothing").name.startswith("bytes")  # no tokenizer.json: bytes, and it says so


def _tiny_llama(folder, vocab: int, arch: str = "Llama"):
    """A saved two-layer causal LM of ``arch`` (Llama, Qwen2 or Mistral: GQA, RMSNorm, SwiGLU)."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, max_position_embeddings=64)
    config.architectures = [f"{arch}ForCausalLM"]
    quietly(lambda: getattr(transformers, f"{arch}ForCausalLM")(config).save_pretrained(folder))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A saved tiny Llama whose vocabulary is its tokenizer's, and a corpus of 60 documents."""
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("text")
    tok = _tokenizer_folder(root / "llama")
    _tiny_llama(root / "llama", tok.get_vocab_size())
    (root / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in _documents()) + "\n")
    return root


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Mistral"])
def test_a_language_model_trains_on_the_users_text(llama, tmp_path, arch):
    source = llama / "llama"
    if arch != "Llama":  # the same tokenizer and corpus, another architecture
        source = tmp_path / arch.lower()
        _tokenizer_folder(source)
        _tiny_llama(source, json.loads((llama / "llama" / "config.json").read_text())["vocab_size"], arch)
    out = tmp_path / "run"
    assert main([f"hf:{source}", "--data", f"text:{llama / 'corpus.jsonl'}", "--seq-len", "16", "--uniform-layers",
                 "--target", "params", "--target-sparsity", "0.5", "--dense-epochs", "1", "--epochs", "1",
                 "--regrowth-epochs", "1", "--no-export", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # --uniform-layers: every layer kept the same counts, so the folder is written, loaded back with no
    # missing or unexpected key, and its logits checked against the compact graph (export/hf_folder.py)
    assert summary["uniform_layers"] and summary["hf_folder"] == "compact_hf"
    assert summary["hf_folder_max_abs_diff"] < 1e-4
    assert (out / "compact_hf" / "config.json").is_file() and (out / "compact_hf" / "tokenizer.json").is_file()
    assert abs(summary["achieved_sparsity"] - 0.5) < 0.1  # balancing the layers moves the landing a little
    assert summary["data"] == f"text:{llama / 'corpus.jsonl'}"
    assert summary["macs_compact"] < summary["macs_dense"]
    for stage in ("dense", "pruned", "compact"):  # a language model's figures: loss per token and perplexity
        assert summary[f"perplexity_{stage}"] == pytest.approx(math.exp(summary[f"val_loss_{stage}"]))
    assert summary["perplexity_compact"] == pytest.approx(summary["perplexity_pruned"], rel=1e-4)  # exact fold
    vocab = json.loads((llama / "llama" / "config.json").read_text())["vocab_size"]
    assert summary["perplexity_dense"] < 1.2 * vocab  # per token: at most about a uniform guess after one epoch
    # a causal LM gets the language-model recipe by default (AdamW, warm-up, cosine, clipping)
    assert (summary["recipe"], summary["lr"], summary["dense_epochs"]) == ("lm", 1e-3, 1)  # width 16: the cap


@pytest.mark.parametrize(("case", "match"), [
    ("empty", "no text"),
    ("latin1", "not UTF-8"),
    ("nofield", 'no "text" string field'),
    ("cnn", "trains a language model"),
    ("long", "--seq-len 65: the model takes 1 to 64 positions"),
    ("vocab", "the tokenizer has"),
])
def test_bad_text_input_is_one_line_exit_2_and_writes_nothing(llama, tmp_path, capsys, case, match):
    source, data, extra = f"hf:{llama / 'llama'}", tmp_path / "corpus.txt", ["--seq-len", "16"]
    data.write_text("\n\n".join(_documents()))
    if case == "empty":
        data.write_text("")
    elif case == "latin1":
        data.write_bytes(b"caf\xe9\n")
    elif case == "nofield":
        data = tmp_path / "corpus.jsonl"
        data.write_text('{"body": "x"}\n')
    elif case == "cnn":
        source, extra = "examples/digits_cnn.py", []
    elif case == "long":
        extra = ["--seq-len", "65"]
    elif case == "vocab":  # a tokenizer with more tokens than the model's embedding
        _tokenizer_folder(tmp_path / "big", vocab_extra=40)
        _tiny_llama(tmp_path / "big", 20)
        source = f"hf:{tmp_path / 'big'}"
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([source, "--data", f"text:{data}", *extra, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperflux-compile: error:") and match in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, --out and OUT.partial included
