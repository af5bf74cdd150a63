"""Tokenizer (transformers' fast tokenizers), chat templates, and incremental detokenization."""
from __future__ import annotations

from typing import Any

from ember.models.loader import ModelSource


class Tokenizer:
    def __init__(self, hf_tokenizer, extra_eos: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        eos = set(extra_eos)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.vocab_size = len(hf_tokenizer)

    @classmethod
    def load(cls, source: ModelSource, extra_eos: tuple[int, ...] = ()) -> "Tokenizer":
        if source.kind == "gguf":
            from ember.models.gguf_loader import load_gguf_tokenizer
            return cls(load_gguf_tokenizer(source.path), extra_eos)
        from transformers import AutoTokenizer
        return cls(AutoTokenizer.from_pretrained(source.path, trust_remote_code=False), extra_eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's own text (for logprobs), bytes that split a character shown as-is."""
        return [self.hf.decode([i]) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
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
