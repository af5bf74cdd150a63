"""A loaded model's tensors, as the CPU kernels read them, cached on disk and mapped back on the
next start instead of being loaded, converted and packed again.

What a CPU start costs without it (SmolLM2-135M, bf16): copying the checkpoint into the bf16
parameters, 0.25-0.3 s, then packing every linear weight into the kernel's layout, 0.1 s. With it:
mapping one file, ~10 ms; the pages then come in from the page cache as the first forward touches
them. Only touched pages count in RSS, so the plain copies of the linear weights, which only the
torch fallback reads, stay on disk.

An entry holds every parameter (after loading and, for int8, after quantizing) and every
PackedWeight's `packed` and `scales`: one raw file with each tensor at a 4 KiB-aligned offset (the
kernels stream the packed panels; an unaligned start would split every load across two cache
lines), and index.json for names, dtypes, shapes and offsets. It is mapped private
(copy-on-write): a later write into a parameter never reaches the file.

The key is the checkpoint's files (path, size, mtime), the dtype and the quantization (a folder),
then the torch version, whether the CPU has the bf16 linear kernel, and the modules whose code
decides these tensors (loading, packing, quantizing): an entry in that folder. A new entry
replaces the folder's older ones, so upgrades and edits leave no stale copies behind.

Default: on for GGUF checkpoints on the CPU (ember already keeps a dequantized copy of those; a
model from a safetensors folder is mapped from its own files and only packed). EMBER_PREPARED_CACHE
is 1 to cache every CPU model, 0 for none.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch

from ember import disk_cache
from ember.config import cache_dir, env_str
from ember.layers.linear import PackedWeight

_ALIGN = 4096
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8)}


def _code_files() -> list[str]:
    """The modules whose code decides the cached tensors."""
    from ember import kernels
    from ember.layers import embedding, linear
    from ember.models import gguf_loader, llama, loader
    return [m.__file__ for m in (kernels, linear, embedding, llama, loader, gguf_loader)]


def slot_for(source, device: torch.device, dtype: torch.dtype,
             quantization: str | None) -> tuple[str, str] | None:
    """(entry folder, its parent) for this model as it will be prepared, or None where this start
    should neither read nor write the cache."""
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
    model_key = disk_cache.slot("prepared", str(dtype), str(quantization),
                                *map(disk_cache.file_key, files))[0]
    return disk_cache.slot(os.path.relpath(model_key, cache_dir()), torch.__version__,
                           f"linear_bf16={cpu.has_linear_bf16()}", sys.byteorder,
                           *map(disk_cache.file_key, _code_files()))


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())          # a tied weight once
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):
            for attr in ("packed", "scales"):
                t = getattr(module, attr)
                if t is not None:
                    out[f"{name}.{attr}"] = t
    return out


def store(model: torch.nn.Module, entry: str, root: str) -> None:
    """Write the model's prepared tensors as a cache entry (atomically; a failure only means the
    next start prepares them again)."""
    tensors = _tensors(model)

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


def restore(model: torch.nn.Module, entry: str) -> bool:
    """Point the model's parameters and packed weights at a mapped cache entry. False (and the model
    untouched) when there is no entry or it does not fit this model."""
    try:
        with open(os.path.join(entry, "index.json")) as f:
            index = json.load(f)
        path = os.path.join(entry, "tensors.bin")
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    except (OSError, ValueError, RuntimeError):
        return False
    params = dict(model.named_parameters())
    if not set(params) <= set(index):
        return False
    mapped = {}
    for name, (dtype, shape, offset) in index.items():
        dtype = _DTYPES.get(dtype)
        if dtype is None or offset % dtype.itemsize:
            return False
        try:
            t = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
        except RuntimeError:             # runs past the end of the file: a damaged entry
            return False
        if name in params and (t.shape != params[name].shape or t.dtype != params[name].dtype):
            return False
        mapped[name] = t
    for name, t in mapped.items():
        if name in params:
            params[name].data = t
        else:
            module_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(module_name), attr, t)
    return True
