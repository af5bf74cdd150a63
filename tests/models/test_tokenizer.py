"""ember's Tokenizer against transformers' AutoTokenizer: the first load goes through transformers
and caches the Rust tokenizer; a cached load must encode, decode and template exactly the same
without building transformers' tokenizer at all."""
import os

import pytest

from ember.models.gguf_loader import default_gguf_path, load_gguf_tokenizer
from ember.models.loader import ModelSource
from ember.tokenizer import IncrementalDetokenizer, Tokenizer

try:
    GGUF_PATH = default_gguf_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

TEXTS = ["Hello world!", "  leading spaces and\ttabs\n", "<|im_start|>user\nWhat is 2+2?<|im_end|>",
         "Ünïcödé 日本語 🙂", "", "x" * 300, "don't , they're . ok ?"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]


def _assert_same(tok: Tokenizer, ref) -> None:
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert tok.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    ids = ref.encode(TEXTS[2] + TEXTS[3])
    assert tok.token_strings(ids) == [ref.decode([i]) for i in ids]
    assert tok.eos_token_ids == {ref.eos_token_id}
    assert tok.vocab_size == len(ref)
    assert tok.apply_chat_template(MESSAGES) == ref.encode(
        ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_cached_tokenizer_matches_transformers(kind, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    if kind == "gguf":
        source = ModelSource("gguf", GGUF_PATH, "default")
    else:
        folder = tmp_path / "model"
        load_gguf_tokenizer(GGUF_PATH).save_pretrained(folder)
        (folder / "model.safetensors").write_bytes(b"weights are not part of the key")
        source = ModelSource("hf", str(folder), "folder")
    ref = load_gguf_tokenizer(GGUF_PATH) if kind == "gguf" else AutoTokenizer.from_pretrained(source.path)

    cold = Tokenizer.load(source)
    assert cold._backend is not None and cold._hf is not None      # made by transformers
    entries = os.listdir(tmp_path / "cache" / "fast-tokenizers")
    assert len(entries) == 1 and not entries[0].startswith("."), entries
    _assert_same(cold, ref)

    warm = Tokenizer.load(source)
    assert warm._hf is None, "a cached load must not build transformers' tokenizer"
    for text in TEXTS:
        warm.encode(text)
        warm.decode(warm.encode(text))
    assert warm._hf is None, "encode/decode must not need transformers' tokenizer"
    _assert_same(warm, ref)                 # the chat template loads it now, on demand
    assert warm._hf is not None

    # the detokenizer streams the same text the reference decodes in one go
    ids = ref.encode(TEXTS[3] + " and more 日本")
    det = IncrementalDetokenizer(warm, ids[:2], True)
    assert "".join(det.add(i) for i in ids[2:]) == ref.decode(ids[2:], skip_special_tokens=True)


def test_cache_key_follows_the_tokenizer_files(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    load_gguf_tokenizer(GGUF_PATH).save_pretrained(folder)
    source = ModelSource("hf", str(folder), "folder")
    Tokenizer.load(source)
    (folder / "model.safetensors").write_bytes(b"new weights")       # not a tokenizer file
    assert Tokenizer.load(source)._hf is None
    cfg = folder / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"model_max_length": 123, ', 1))
    assert Tokenizer.load(source)._hf is not None                     # changed: rebuilt
    assert len(os.listdir(tmp_path / "cache" / "fast-tokenizers")) == 2


def test_tokenizer_that_cleans_up_spaces_goes_through_transformers(tmp_path, monkeypatch):
    """A WordPiece tokenizer with clean_up_tokenization_spaces: transformers edits the decoded
    text, so ember must not take the Rust-only path for it."""
    from transformers import BertTokenizerFast

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", ",", ".", "don", "'", "t"]
    ref = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, clean_up_tokenization_spaces=True)
    folder = tmp_path / "bert"
    ref.save_pretrained(folder)
    ref = type(ref).from_pretrained(folder)
    ids = ref.encode("don ' t")
    assert ref.decode(ids, skip_special_tokens=True) != ref.backend_tokenizer.decode(ids, True)
    for _ in range(2):
        tok = Tokenizer.load(ModelSource("hf", str(folder), "bert"))
        assert tok._backend is None
        for text in ("hello , world .", "don ' t"):
            ids = tok.encode(text)
            assert ids == ref.encode(text)
            assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert not (tmp_path / "cache" / "fast-tokenizers").exists()
