"""Security promises of SECURITY.md, checked: the API key guards every endpoint but /health (and
the static chat page), and is never logged; a request's `model` is a name, never a path; no URL
reaches a file; loading a model folder runs none of its code and unpickles nothing."""
from __future__ import annotations

import json
import pickle
import shutil

import httpx
import pytest

from reliability_helpers import SMALL_KEY, assert_openai_error

OPEN_PATHS = {"/health", "/"}          # the chat page is static HTML; it calls the API with a key


def _routes(server) -> list[tuple[str, str]]:
    spec = httpx.get(f"{server.url}/openapi.json", headers=server.headers).json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]
    return routes + [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nonexistent")]


def test_every_endpoint_but_health_requires_the_key(small_server):
    routes = _routes(small_server)
    assert ("POST", "/v1/completions") in routes and ("GET", "/debug/engine") in routes
    body = {"prompt": "hi", "max_tokens": 1}
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer not-the-key"},
                        {"Authorization": f"Basic {SMALL_KEY}"},
                        {"Authorization": f"Bearer {SMALL_KEY[:-1]}"},
                        {"Authorization": f"Bearer {SMALL_KEY}x"}):
            r = httpx.request(method, f"{small_server.url}{path}", headers=headers, json=body,
                              timeout=30)
            if path in OPEN_PATHS:
                assert r.status_code != 401, (method, path)
            else:
                err = assert_openai_error(r, 401)
                assert err["code"] == "invalid_api_key" and SMALL_KEY not in r.text
        r = httpx.request(method, f"{small_server.url}{path}", headers=small_server.headers,
                          json=body, timeout=30)
        assert r.status_code != 401, (method, path, r.text)


def test_the_key_is_not_logged(small_server):
    httpx.post(f"{small_server.url}/v1/completions", headers=small_server.headers,
               json={"prompt": "hi", "max_tokens": 1, "bogus": 1})        # logged as a 400
    log = small_server.log()
    assert "POST /v1/completions" in log, "info-level access log expected"
    assert SMALL_KEY not in log and SMALL_KEY[:12] not in log
    assert "not-the-key" not in log                   # nor what clients sent as their key


TRAVERSALS = ["../../../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "..", ".",
              "file:///etc/passwd", "SmolLM2-135M-Instruct/../../etc/passwd",
              "..%2F..%2Fetc%2Fpasswd", "C:\\Windows\\win.ini", "\u0000"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_model_names_are_names_not_paths(small_server, name):
    user = [{"role": "user", "content": "hi"}]
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"messages": user, "max_tokens": 1}),
                       ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        r = httpx.post(f"{small_server.url}{path}", headers=small_server.headers,
                       json={**body, "model": name}, timeout=30)
        err = assert_openai_error(r, 404)
        assert err["code"] == "model_not_found" and "root:" not in r.text


def test_the_served_file_path_is_not_a_model_name(small_server):
    """Even the real path of the loaded weights is no alias: only the served name matches."""
    root = httpx.get(f"{small_server.url}/v1/models", headers=small_server.headers).json()
    real = root["data"][0]["root"]
    for name in {real, small_server.model + "/", small_server.model.upper()} - {
            small_server.model}:
        r = httpx.post(f"{small_server.url}/v1/completions", headers=small_server.headers,
                       json={"prompt": "hi", "max_tokens": 1, "model": name}, timeout=30)
        assert_openai_error(r, 404)


@pytest.mark.parametrize("path", ["/../../../etc/passwd", "/static/../api_server.py",
                                  "/%2e%2e/%2e%2e/etc/passwd", "/index.html", "/static/index.html",
                                  "/..%2f..%2fember%2fserver%2fapi_server.py"])
def test_no_url_reaches_a_file(small_server, path):
    r = httpx.get(f"{small_server.url}{path}", headers=small_server.headers)
    assert r.status_code == 404 and "import" not in r.text and "root:" not in r.text


class _Payload:
    """Unpickling this creates the marker file: it proves code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


EVIL_MODULE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def booby_trapped_folder(tmp_path_factory, save_random_model):
    """A loadable tiny Llama folder that also carries every way a folder can smuggle code: custom
    modeling and tokenizer classes through auto_map, and a pickled .bin next to the safetensors."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("trapped")
    marker = str(folder.parent / "CODE_RAN")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    save_random_model(cfg, str(folder))
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(EVIL_MODULE.format(marker=marker))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, f)
    return folder, marker


def _load(folder):
    from ember import LLM
    try:
        return LLM(str(folder), dtype="float32", kv_cache_memory=1 << 24)
    except (ValueError, FileNotFoundError, OSError) as e:    # refusing is fine; running is not
        return e


def test_loading_a_folder_runs_none_of_its_code(booby_trapped_folder):
    folder, marker = booby_trapped_folder
    loaded = _load(folder)
    assert not (folder.parent / "CODE_RAN").exists(), "code from the model folder ran"
    assert not isinstance(loaded, Exception), loaded       # the safetensors weights are used


def test_a_pickle_only_folder_is_refused_unopened(booby_trapped_folder, tmp_path):
    folder, marker = booby_trapped_folder
    only_pickle = tmp_path / "only-pickle"
    shutil.copytree(folder, only_pickle)
    (only_pickle / "model.safetensors").unlink()
    loaded = _load(only_pickle)
    assert isinstance(loaded, FileNotFoundError) and "safetensors" in str(loaded)
    assert not (folder.parent / "CODE_RAN").exists(), "the pickle was opened"
