"""The garbage collector while ember starts.

A start makes ~170k objects that live as long as the process: the modules of torch, FastAPI and
pydantic, then the model's layers. Each full collection walks every one of them, and a start
triggers several: on this machine they took ~0.3 s of `import torch, fastapi` (1.2 s without the
collector against 1.5 s with it, medians of 10 starts) and 0.1-0.25 s of building SmolLM2's 277
modules, 0.01 s without it. So the engine pauses the collector while it builds, and `ember`'s
commands pause it from their first line until they are ready to serve. Then `gc.freeze()` moves
everything made so far into the permanent generation, which no later collection walks: a full
collection while serving would otherwise walk those 170k objects between two decode steps.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def paused():
    """No collection inside (also usable as a decorator); the collector's state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def started() -> None:
    """End of a command's start-up: keep what it made out of every later collection, and collect
    again from here on."""
    gc.freeze()
    gc.enable()
