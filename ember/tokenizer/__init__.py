"""Tokenizer, chat templates, and incremental detokenization.

The model's tokenizer is whatever transformers' AutoTokenizer makes of it. Importing transformers
and building that tokenizer takes about a second, most of a server's start-up, while encoding and
decoding only need the Rust tokenizer inside it. So the first load of a model goes through
transformers and caches the resolved Rust tokenizer (exactly the state transformers left it in)
with the few facts ember needs (EOS, vocabulary size, whether there is a chat template); later
loads read that with the `tokenizers` library alone (~0.1 s). transformers comes back, lazily, for
chat templates and for `LLM.get_tokenizer()`. Tokenizers without a Rust backend, or whose decode
transformers post-processes (clean_up_tokenization_spaces), always go through transformers.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import threading
from typing import Any, Callable

from ember import disk_cache
from ember.models.source import ModelSource

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")


def _load_hf(source: ModelSource):
    if source.kind == "gguf":
        from ember.models.gguf_loader import load_gguf_tokenizer
        return load_gguf_tokenizer(source.path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)


def _cache_slot(source: ModelSource) -> tuple[str, str]:
    """Keyed by the files the tokenizer is made from and the library versions that made it."""
    if source.kind == "gguf":
        files = [source.path]
    else:
        files = sorted(os.path.join(source.path, f) for f in os.listdir(source.path)
                       if not f.endswith(_WEIGHT_SUFFIXES)
                       and os.path.isfile(os.path.join(source.path, f)))
    versions = [f"{lib} {importlib.metadata.version(lib)}" for lib in ("transformers", "tokenizers")]
    return disk_cache.slot("fast-tokenizers", *versions, *map(disk_cache.file_key, files))


class Tokenizer:
    def __init__(self, backend, eos_token_id: int | None, vocab_size: int, has_chat_template: bool,
                 load_hf: Callable[[], Any], extra_eos: tuple[int, ...] = (), hf=None) -> None:
        """backend: a `tokenizers.Tokenizer`, or None to encode/decode with the transformers one."""
        self._backend = backend
        self._load_hf, self._hf, self._hf_lock = load_hf, hf, threading.Lock()
        self.eos_token_ids = frozenset({*extra_eos, *([] if eos_token_id is None else [eos_token_id])})
        self.vocab_size = vocab_size
        self.has_chat_template = has_chat_template

    @staticmethod
    def is_cached(source: ModelSource) -> bool:
        """Whether `load` reads the fast tokenizer from ember's cache (rather than building it
        with transformers, which takes seconds)."""
        return os.path.isdir(_cache_slot(source)[0])

    @staticmethod
    def cached_eos_token_ids(source: ModelSource, extra_eos: tuple[int, ...] = ()
                             ) -> frozenset[int] | None:
        """The eos_token_ids `load` gives, read from ember's cache without loading the tokenizer
        (the engine process needs no more); None when the cache does not hold it yet."""
        try:
            with open(os.path.join(_cache_slot(source)[0], "meta.json")) as f:
                eos = json.load(f)["eos_token_id"]
        except FileNotFoundError:
            return None
        return frozenset({*extra_eos, *([] if eos is None else [eos])})

    @classmethod
    def load(cls, source: ModelSource, extra_eos: tuple[int, ...] = ()) -> "Tokenizer":
        cached, root = _cache_slot(source)
        load_hf = lambda: _load_hf(source)          # noqa: E731
        if os.path.isdir(cached):
            from tokenizers import Tokenizer as RustTokenizer
            with open(os.path.join(cached, "meta.json")) as f:
                meta = json.load(f)
            return cls(RustTokenizer.from_file(os.path.join(cached, "tokenizer.json")),
                       meta["eos_token_id"], meta["vocab_size"], meta["has_chat_template"],
                       load_hf, extra_eos)
        hf = load_hf()
        backend = getattr(hf, "backend_tokenizer", None)
        if getattr(hf, "clean_up_tokenization_spaces", False):
            backend = None                           # transformers edits decoded text: keep it
        tok = cls(backend, hf.eos_token_id, len(hf), bool(getattr(hf, "chat_template", None)),
                  load_hf, extra_eos, hf=hf)
        if backend is not None:
            meta = {"eos_token_id": hf.eos_token_id, "vocab_size": len(hf),
                    "has_chat_template": tok.has_chat_template}

            def write(tmp: str) -> None:
                backend.save(os.path.join(tmp, "tokenizer.json"))
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(meta, f)

            disk_cache.write_atomically(cached, root, write)
        return tok

    @property
    def hf_loaded(self) -> bool:
        return self._hf is not None

    @property
    def hf(self):
        """transformers' tokenizer for this model (loaded on first use)."""
        with self._hf_lock:
            if self._hf is None:
                self._hf = self._load_hf()
            return self._hf

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._backend is None:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend is None:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's own text (for logprobs), bytes that split a character shown as-is."""
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use completions with a plain prompt")
        text = self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, **kwargs)
        # The template already wrote any BOS it wants.
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Text deltas for a growing token list, correct when a character spans several tokens.

    Decodes a short window [prefix_offset, end) and emits what it adds beyond [prefix_offset,
    read_offset); an incomplete UTF-8 sequence (U+FFFD at the end) waits for the next token.
    The window starts inside the prompt so that tokenizers which drop a leading space see context.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-5:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        after = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""
