"""Entries derived from a model (dequantized GGUF weights, tokenizers) cached under cache_dir().

An entry is a folder named by a hash of what it was derived from (file paths, sizes, mtimes,
library versions), written into a temporary folder and renamed into place: readers never see a
half-written entry, and of two concurrent writers the loser discards its copy. A cache that cannot
be written is not an error; the caller just derives again next time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Callable

from ember.config import cache_dir


def file_key(path: str) -> str:
    """What identifies a file's contents cheaply: absolute path, size, modification time."""
    path = os.path.abspath(path)
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def slot(kind: str, *key_parts: str) -> tuple[str, str]:
    """(the entry's folder, the folder of all `kind` entries) for this key."""
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:24]
    root = os.path.join(cache_dir(), kind)
    return os.path.join(root, key), root


def write_atomically(target: str, root: str, write: Callable[[str], None]) -> None:
    """write(tmp_dir), then rename tmp_dir to target."""
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    except OSError:
        return
    try:
        write(tmp)
        os.rename(tmp, target)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
