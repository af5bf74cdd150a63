"""/tokenize, /detokenize, /v1/models, /health and the chat page."""
from __future__ import annotations

import httpx


def test_tokenize_round_trip(server):
    text = "Hello, world! Ünïcödé and spaces."
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] > 0
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back["prompt"] == text
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400


def test_models_and_health(server, client):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_chat_page_served(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for marker in ('id="input"', 'id="send"', 'id="messages"', "/v1/chat/completions"):
        assert marker in r.text
