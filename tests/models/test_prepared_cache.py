"""The prepared-weights cache: a model mapped from it is the model loaded and packed anew."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from ember import LLM, SamplingParams
from ember.kernels import cpu
from ember.models.loader import resolve_model
from ember.models import prepared_cache


@pytest.fixture(scope="module")
def folder(tmp_path_factory, save_random_model):
    from transformers import LlamaConfig
    path = str(tmp_path_factory.mktemp("tiny-llama-prepared"))
    save_random_model(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
                      path)
    return path


@pytest.fixture
def restores(tmp_path, monkeypatch):
    """The cache in a fresh folder, on for every model; returns the list of restore() results."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBER_PREPARED_CACHE", "1")
    seen, restore = [], prepared_cache.restore

    def spy(model, slot):
        seen.append(restore(model, slot))
        return seen[-1]

    monkeypatch.setattr(prepared_cache, "restore", spy)
    return seen


def _load(folder, **opts):
    return LLM(folder, kv_cache_memory=1 << 24, **opts)


def _run(llm):
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                         ignore_eos=True), use_tqdm=False)[0]
    c = out.outputs[0]
    return c.token_ids, [{t: lp.logprob for t, lp in d.items()} for d in c.logprobs]


def _entries(tmp_path):
    root = tmp_path / "cache" / "prepared"
    return sorted(p for model in (root.iterdir() if root.exists() else ()) if model.is_dir()
                  for p in model.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("quantization", [None, "int8", "w8a8"])
def test_a_model_mapped_from_the_cache_is_the_model_prepared_anew(folder, restores, tmp_path,
                                                                   monkeypatch, quantization):
    if quantization == "w8a8" and not cpu.has_w8a8():
        pytest.skip("W8A8 needs AVX-512 VNNI")
    opts = dict(dtype="bfloat16", quantization=quantization)
    first = _load(folder, **opts)              # prepares and writes the entry
    second = _load(folder, **opts)             # maps it
    assert restores == [False, True]
    assert len(_entries(tmp_path)) == 1
    a, b = prepared_cache._tensors(first.engine.model), prepared_cache._tensors(second.engine.model)
    assert a.keys() == b.keys()
    if cpu.has_linear_bf16():                   # the packed weights came from the file too
        assert any(name.endswith(".packed") for name in b)
    if quantization == "w8a8":                  # and W8A8's offsets
        assert any(name.endswith(".offsets") for name in b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    monkeypatch.setenv("EMBER_PREPARED_CACHE", "0")
    fresh = _load(folder, **opts)               # no cache at all
    assert len(restores) == 2
    assert _run(second) == _run(first) == _run(fresh)


def test_dtype_and_quantization_key_separate_entries(folder, restores, tmp_path):
    _load(folder, dtype="bfloat16")
    _load(folder, dtype="float32")
    _load(folder, dtype="bfloat16", quantization="int8")
    assert restores == [False, False, False]
    assert len(_entries(tmp_path)) == 3


def test_a_damaged_entry_is_prepared_anew(folder, restores, tmp_path):
    reference = _run(_load(folder, dtype="bfloat16"))
    [entry] = _entries(tmp_path)
    blob = entry / "tensors.bin"
    os.truncate(blob, blob.stat().st_size // 2)
    again = _load(folder, dtype="bfloat16")
    assert restores == [False, False]
    assert _run(again) == reference


def test_writing_a_mapped_weight_leaves_the_file_alone(folder, restores, tmp_path):
    _load(folder, dtype="bfloat16")
    [entry] = _entries(tmp_path)
    digest = hashlib.sha256((entry / "tensors.bin").read_bytes()).hexdigest()
    mapped = _load(folder, dtype="bfloat16")
    assert restores == [False, True]
    for p in mapped.engine.model.parameters():
        p.data.add_(1)
    assert hashlib.sha256((entry / "tensors.bin").read_bytes()).hexdigest() == digest


def test_a_new_entry_replaces_the_stale_ones_of_its_model(folder, restores, tmp_path, monkeypatch):
    _load(folder, dtype="bfloat16")
    [old] = _entries(tmp_path)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")   # new code, same model
    _load(folder, dtype="bfloat16")
    assert restores == [False, False]
    [new] = _entries(tmp_path)
    assert new.parent == old.parent and new != old


def test_auto_mode_stores_no_entry_above_its_size_cap(folder, restores, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_cache, "_AUTO_MAX_BYTES", 1 << 20)
    source = resolve_model(folder)
    cpu_dev = torch.device("cpu")
    assert prepared_cache.slot_for(source, cpu_dev, torch.bfloat16, None).max_bytes is None
    monkeypatch.setenv("EMBER_PREPARED_CACHE", "auto")         # the tiny model holds ~7 MB
    assert prepared_cache.slot_for(source, cpu_dev, torch.bfloat16, None) is None   # not a GGUF
    model = _load(folder, dtype="bfloat16").engine.model
    slot = prepared_cache.Slot(str(tmp_path / "e" / "entry"), str(tmp_path / "e"), 1 << 20)
    prepared_cache.store(model, slot)
    assert not os.path.exists(slot.entry)
    prepared_cache.store(model, prepared_cache.Slot(slot.entry, slot.root, 1 << 30))
    assert os.path.isdir(slot.entry)


@pytest.mark.parametrize("damage", ["a parameter missing", "a name of nothing"])
def test_an_entry_that_does_not_fit_is_refused_and_replaced(folder, restores, tmp_path, damage):
    reference = _run(_load(folder, dtype="bfloat16"))
    [entry] = _entries(tmp_path)
    index = json.loads((entry / "index.json").read_text())
    if damage == "a parameter missing":
        del index[next(n for n in index if n.endswith("down_proj.weight"))]
    else:
        name = next(n for n in index if n.endswith(".packed"))
        index[name.replace(".packed", ".stray")] = index.pop(name)
    (entry / "index.json").write_text(json.dumps(index))
    again = _load(folder, dtype="bfloat16")      # refuses the entry, prepares anew, rewrites it
    third = _load(folder, dtype="bfloat16")
    assert restores == [False, False, True]
    assert _run(again) == _run(third) == reference
