"""`ember generate` and `ember chat` as a user runs them (each loads the model once)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ember(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=180)


def test_generate_prints_the_completion():
    r = _ember("generate", "The capital of France is", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "ember:" in r.stderr          # the engine summary goes to stderr, not the output


def test_chat_keeps_history_and_exits():
    turns = "What is the capital of France?\nWhat did I just ask you about?\n/exit\n"
    r = _ember("chat", "--temperature", "0", "--max-tokens", "30", stdin=turns)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stdout.count("> ") >= 3      # two answers, then the prompt /exit was typed at
    eof = _ember("chat", "--max-tokens", "4", stdin="")
    assert eof.returncode == 0, eof.stderr
