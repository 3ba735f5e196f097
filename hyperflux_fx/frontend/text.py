"""Text for language models: the user's corpus (``--data text:PATH``), or the offline default set.

**The user's corpus** (:func:`corpus_datasets`). PATH is a UTF-8 ``.txt`` file (documents separated
by a blank line), a ``.jsonl`` file (one document per line, in its ``text`` field), or a folder of
them (read recursively, in sorted path order). Each document goes to validation when the first 8 hex
digits of the SHA-1 of its UTF-8 bytes, as an integer, modulo 100 are below
:data:`VALIDATION_PERCENT` (10), else to training: a split by document that does not depend on the
order or the number of files. Documents are tokenised with the ``tokenizer.json`` of the ``hf:``
folder (the ``tokenizers`` library), or as bytes where there is none; each document ends with the
tokenizer's end-of-sequence token when it has one, and the token stream of each split is packed into
windows of ``length + 1`` tokens (the last partial window is dropped): ``(window[:-1], window[1:])``.

**The offline default set**: the docstrings of Python's standard library, as bytes.

Nothing is downloaded: the text ships with the interpreter. The corpus is the docstrings of the
modules in :data:`MODULES` and of their public functions and classes, in sorted order, joined by blank
lines (about 160 kB on CPython 3.11); the same interpreter gives the same bytes. Tokens are bytes
(0-255, so a model needs ``vocab_size >= 256``; no tokenizer file). The corpus is cut into windows of
``length + 1`` bytes: the first 90% of the windows train, the last 10% validate. A sample is
``(window[:-1], window[1:])``: next-byte prediction.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

__all__ = ["MODULES", "TEXT_VOCAB", "VALIDATION_PERCENT", "TextError", "Tokens", "corpus_datasets", "load_tokens",
           "read_documents", "split_documents", "text_corpus", "text_datasets"]

VALIDATION_PERCENT = 10  # documents whose hash falls below this (of 100) validate


class TextError(ValueError):
    """A corpus or tokenizer that cannot be used (the CLI's one-line error)."""

TEXT_VOCAB = 256  # byte-level tokens
MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "functools", "inspect", "itertools",
           "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string", "subprocess",
           "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile")


@functools.lru_cache(maxsize=1)
def text_corpus() -> bytes:
    """The corpus (see the module docstring)."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d).encode("utf-8")


def text_datasets(length: int = 64) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) next-byte datasets of ``length``-token windows (see the module docstring)."""
    data = torch.frombuffer(bytearray(text_corpus()), dtype=torch.uint8).long()
    windows = data[: (data.numel() // (length + 1)) * (length + 1)].view(-1, length + 1)
    cut = int(0.9 * len(windows))
    return (TensorDataset(windows[:cut, :-1].clone(), windows[:cut, 1:].clone()),
            TensorDataset(windows[cut:, :-1].clone(), windows[cut:, 1:].clone()))


def _txt_documents(path: Path) -> list[str]:
    return [d.strip() for d in _read_utf8(path).split("\n\n") if d.strip()]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(f"text:{path}: not UTF-8 (byte {exc.start}): give UTF-8 text") from exc


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise TextError(f"text:{path}: line {i} is not JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextError(f"text:{path}: line {i} has no \"text\" string field (a .jsonl corpus holds "
                            "one {\"text\": ...} object per line)")
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def read_documents(path: str | Path) -> list[str]:
    """The documents of a corpus (see the module docstring).

    Raises:
        TextError: no such path, no .txt/.jsonl file, a file that is not UTF-8, a .jsonl line without
            ``text``, or no text at all.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise TextError(f"text:{path}: no .txt or .jsonl file in that folder")
    elif path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise TextError(f"text:{path}: expected a .txt or .jsonl file, or a folder of them")
        files = [path]
    else:
        raise TextError(f"text:{path}: no such file or folder")
    docs = [d for f in files for d in (_jsonl_documents(f) if f.suffix == ".jsonl" else _txt_documents(f))]
    if not docs:
        raise TextError(f"text:{path}: no text (empty documents only)")
    return docs


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, validation) by each document's hash (see the module docstring)."""
    train, val = [], []
    for doc in docs:
        bucket = int(hashlib.sha1(doc.encode("utf-8")).hexdigest()[:8], 16) % 100
        (val if bucket < VALIDATION_PERCENT else train).append(doc)
    return train, val


@dataclass(frozen=True)
class Tokens:
    """How text becomes token ids."""

    encode: Callable[[str], list[int]]
    vocab_size: int
    eos_id: int | None
    name: str  # "tokenizer.json (N tokens)" or "bytes (no tokenizer.json in the folder)"


def load_tokens(folder: str | Path | None) -> Tokens:
    """The tokenizer of an ``hf:`` folder (its ``tokenizer.json``), or bytes when there is none."""
    path = Path(folder) / "tokenizer.json" if folder is not None else None
    if path is None or not path.is_file():
        return Tokens(lambda text: list(text.encode("utf-8")), TEXT_VOCAB, None,
                      "bytes (no tokenizer.json in the model's folder)")
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except ImportError as exc:
        raise TextError("a tokenizer.json needs the tokenizers library: pip install '.[hf]'") from exc
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        raise TextError(f"{path}: not a tokenizer the tokenizers library can load ({exc})") from exc
    eos = None
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        name = json.loads(config.read_text()).get("eos_token")
        name = name.get("content") if isinstance(name, dict) else name
        eos = tok.token_to_id(name) if isinstance(name, str) else None
    return Tokens(lambda text: tok.encode(text, add_special_tokens=False).ids, tok.get_vocab_size(), eos,
                  f"tokenizer.json ({tok.get_vocab_size()} tokens)")


def _pack(docs: list[str], tokens: Tokens, length: int) -> TensorDataset:
    ids: list[int] = []
    for doc in docs:
        ids += tokens.encode(doc) + ([tokens.eos_id] if tokens.eos_id is not None else [])
    data = torch.tensor(ids, dtype=torch.long)
    windows = data[: (data.numel() // (length + 1)) * (length + 1)].view(-1, length + 1)
    return TensorDataset(windows[:, :-1].clone(), windows[:, 1:].clone())


def corpus_datasets(path: str | Path, length: int, tokens: Tokens) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) next-token datasets of a corpus (see the module docstring).

    Raises:
        TextError: see :func:`read_documents`; a split without a whole window.
    """
    docs = read_documents(path)
    train_docs, val_docs = split_documents(docs)
    train, val = _pack(train_docs, tokens, length), _pack(val_docs, tokens, length)
    for name, ds, split in (("training", train, train_docs), ("validation", val, val_docs)):
        if len(ds) == 0:
            raise TextError(f"text:{path}: the {name} split ({len(split)} of {len(docs)} documents, by hash) holds "
                            f"no window of {length + 1} tokens: give more text or a shorter --seq-len")
    return train, val
