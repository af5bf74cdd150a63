"""A loaded model's tensors, as the CPU kernels read them, cached on disk and mapped back on the
next start instead of being loaded, converted and packed again.

What a CPU start costs without it (SmolLM2-135M, bf16): copying the checkpoint into the bf16
parameters, 0.25-0.3 s, then packing every linear weight into the kernel's layout, 0.1 s. With it:
mapping one file, ~10 ms; the pages then come in from the page cache as the first forward touches
them. Only touched pages count in RSS, so the plain copies of the linear weights, which only the
torch fallback reads, stay on disk.

An entry holds every parameter (after loading and, for int8 and w8a8, after quantizing) and every
PackedWeight's `packed`, `scales` and `offsets`: one raw file with each tensor at a 4 KiB-aligned
offset (the kernels stream the packed panels; an unaligned start would split every load across two
cache lines), and index.json for names, dtypes, shapes and offsets. It is mapped private
(copy-on-write): a later write into a parameter never reaches the file.

The key is the checkpoint's files (path, size, mtime), the dtype and the quantization (a folder),
then the torch version, whether the CPU has the bf16 linear kernel, and the modules whose code
decides these tensors (loading, packing, quantizing): an entry in that folder. A new entry
replaces the folder's older ones, so upgrades and edits leave no stale copies behind.

Default: on for GGUF checkpoints on the CPU whose prepared tensors take at most 4 GiB (ember
already keeps a dequantized copy of those; a model from a safetensors folder is mapped from its own
files and only packed). EMBER_PREPARED_CACHE is 1 to cache every CPU model, of any size, 0 for none.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from ember import disk_cache
from ember.config import env_str
from ember.layers.linear import PackedWeight

_ALIGN = 4096
_AUTO_MAX_BYTES = 4 << 30
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8,
                                       torch.int32)}


def _code_files() -> list[str]:
    """The modules whose code decides the cached tensors."""
    from ember import kernels
    from ember.layers import embedding, linear
    from ember.models import gguf_loader, llama, loader
    return [m.__file__ for m in (kernels, linear, embedding, llama, loader, gguf_loader)]


@dataclass(frozen=True)
class Slot:
    entry: str                 # the folder of this model's entry
    root: str                  # the folder of all entries for this model preparation
    max_bytes: int | None      # store no entry larger than this


def slot_for(source, device: torch.device, dtype: torch.dtype,
             quantization: str | None) -> Slot | None:
    """Where this model, as it will be prepared, is cached; None where this start should neither
    read nor write the cache."""
    mode = env_str("EMBER_PREPARED_CACHE", "auto")
    if device.type != "cpu" or mode == "0" or (mode != "1" and source.kind != "gguf"):
        return None
    from ember.kernels import cpu
    if source.kind == "gguf":
        files = [source.path]
    else:
        files = sorted(os.path.join(source.path, f) for f in os.listdir(source.path)
                       if f.endswith((".safetensors", ".json")))
    # one folder per model preparation, holding one entry per version of the code that prepares
    # it: writing an entry removes the others, which no start of this code would read
    model_root, _ = disk_cache.slot("prepared", str(dtype), str(quantization),
                                    *map(disk_cache.file_key, files))
    entry, root = disk_cache.slot(os.path.join("prepared", os.path.basename(model_root)),
                                  torch.__version__, f"linear_bf16={cpu.has_linear_bf16()}",
                                  sys.byteorder, *map(disk_cache.file_key, _code_files()))
    return Slot(entry, root, None if mode == "1" else _AUTO_MAX_BYTES)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())          # a tied weight once
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):
            for attr in ("packed", "scales", "offsets"):
                t = getattr(module, attr)
                if t is not None:
                    out[f"{name}.{attr}"] = t
    return out


def store(model: torch.nn.Module, slot: Slot) -> None:
    """Write the model's prepared tensors as a cache entry (atomically; a failure only means the
    next start prepares them again), unless they are larger than the slot allows."""
    tensors = _tensors(model)
    if slot.max_bytes is not None and sum(
            t.numel() * t.element_size() for t in tensors.values()) > slot.max_bytes:
        return
    entry, root = slot.entry, slot.root

    def write(tmp: str) -> None:
        index, offset = {}, 0
        with open(os.path.join(tmp, "tensors.bin"), "wb") as f:
            for name, t in tensors.items():
                offset = -(-offset // _ALIGN) * _ALIGN
                f.seek(offset)
                raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
                f.write(memoryview(raw.numpy()))
                index[name] = [str(t.dtype), list(t.shape), offset]
                offset += raw.numel()
            f.truncate(max(offset, 1))
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f)

    disk_cache.write_atomically(entry, root, write)
    if os.path.isdir(entry):
        for name in os.listdir(root):
            if not name.startswith(".") and name != os.path.basename(entry):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def restore(model: torch.nn.Module, slot: Slot) -> bool:
    """Point the model's parameters and packed weights at a mapped cache entry. False (and the model
    untouched) when there is no entry or it does not fit this model."""
    try:
        with open(os.path.join(slot.entry, "index.json")) as f:
            text = f.read()
        path = os.path.join(slot.entry, "tensors.bin")
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    except (OSError, RuntimeError):
        return False                     # no entry (or one being replaced)
    params = dict(model.named_parameters())
    try:
        mapped = _map(model, params, json.loads(text), storage)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError):
        mapped = None                    # damaged (e.g. cut short)
    if mapped is None:                   # let this start write a good one in its place
        shutil.rmtree(slot.entry, ignore_errors=True)
        return False
    for name, t in mapped.items():
        if name in params:
            params[name].data = t
        else:
            module_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(module_name), attr, t)
    return True


def _map(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], index: dict,
         storage) -> dict[str, torch.Tensor] | None:
    """The entry's tensors as views of the mapped file, or None if they do not fit this model
    (whose named parameters are `params`)."""
    if not set(params) <= set(index):
        return None
    mapped = {}
    for name, (dtype, shape, offset) in index.items():
        dtype = _DTYPES.get(dtype)
        if dtype is None or offset % dtype.itemsize:
            return None
        if name in params:
            if list(shape) != list(params[name].shape) or dtype != params[name].dtype:
                return None
        else:
            module_name, attr = name.rsplit(".", 1)
            if (attr not in ("packed", "scales", "offsets")
                    or not isinstance(model.get_submodule(module_name), PackedWeight)):
                return None
        # past the file's end (an entry cut short) this raises
        mapped[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
    return mapped
