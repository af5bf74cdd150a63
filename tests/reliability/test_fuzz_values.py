"""Fuzzing of field *values*, the complement of the schema fuzzing: schemathesis draws values
that fit each field's declared type, and rarely the extremes that break engines (integers past
int64, the largest floats, ids past the vocabulary). Here a deterministic sweep puts every
numeric field at every edge value, and hypothesis sets one to three fields at once to values
mostly of their own type, on top of a valid request. No answer
may be a 5xx, a stream must not fail, and no engine step may fail (such a failure would take
down every request in the batch)."""
from __future__ import annotations

import os

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from reliability_helpers import assert_allocator_idle, assert_openai_error

EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "30")) * 6
INT_EDGES = [0, -1, 1, 2, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64,
             -2 ** 63, -2 ** 63 - 1, 10 ** 30, -10 ** 30, 49151, 49152]
FLOAT_EDGES = [0.0, -0.0, 1.0, 0.5, 2.0, -2.0, 1e308, -1e308, 5e-324, 1e-300]
INTS = st.one_of(st.sampled_from(INT_EDGES), st.integers())
FLOATS = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=False,
                                                           allow_infinity=False))
ANY = st.one_of(
    INTS, FLOATS, st.booleans(), st.none(), st.text(max_size=8),
    st.lists(st.one_of(st.sampled_from(INT_EDGES), st.integers(-10, 60000)), max_size=4),
    st.lists(st.text(min_size=1, max_size=4), max_size=4),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.booleans()), max_size=2),
)


def _kind(model, field: str) -> str:
    kind = str(model.model_fields[field].annotation)
    if "list[" in kind and "int" in kind:
        return "int list"
    return "int" if "int" in kind else "float" if "float" in kind else "other"


def values_for(model, field: str):
    """Mostly values of the field's own type (so that the rest of the body stays valid and the
    request reaches the engine), sometimes anything."""
    typed = {"int": INTS, "float": FLOATS, "int list": st.lists(INTS, max_size=4),
             "other": ANY}[_kind(model, field)]
    return st.one_of(typed, typed, typed, ANY)


SKIP = {"prompt", "messages", "stream", "model"}     # kept valid: the point is the other fields
MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
FIELDS = {path: sorted(set(m.model_fields) - SKIP) for path, m in MODELS.items()}
BASE = {"/v1/completions": {"prompt": "Hello", "max_tokens": 4},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 4}}
SEEN = {"cases": 0, "2xx": 0, "sweep": 0}


@st.composite
def requests(draw):
    path = draw(st.sampled_from(sorted(FIELDS)))
    fields = draw(st.lists(st.sampled_from(FIELDS[path]), min_size=1, max_size=3, unique=True))
    body = {**BASE[path], **{f: draw(values_for(MODELS[path], f)) for f in fields}}
    for key in ("max_tokens", "max_completion_tokens"):     # keep generations short
        if type(body.get(key)) is int and 4 < body[key] < 40:
            body[key] = 4
    return path, body, draw(st.booleans())


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          derandomize=not os.environ.get("EMBER_FUZZ_RANDOM"),
          suppress_health_check=list(HealthCheck))
@given(case=requests())
def test_adversarial_field_values(small_server, case):
    path, body, stream = case
    if stream:
        body = {**body, "stream": True}
    r = _post(small_server, path, body)
    SEEN["cases"] += 1
    if r.status_code >= 400:
        assert_openai_error(r)                 # a 4xx in OpenAI's shape; a 5xx fails here
        return
    SEEN["2xx"] += 1
    assert r.status_code == 200
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-300:]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=120)


def test_every_numeric_field_at_every_edge(small_server):
    """The deterministic sweep: each integer and float field of both endpoints, alone, at each
    edge value (and integer lists holding each edge), on an otherwise valid request."""
    cases = 0
    for path, model in MODELS.items():
        for field in FIELDS[path]:
            kind = _kind(model, field)
            edges = {"int": INT_EDGES, "float": FLOAT_EDGES,
                     "int list": [[e] for e in INT_EDGES]}.get(kind, [])
            for value in edges:
                body = {**BASE[path], field: value}
                if field in ("max_tokens", "max_completion_tokens") and value == 49151:
                    body[field] = 3
                r = _post(small_server, path, body)
                assert r.status_code < 500, (path, field, value, r.text)
                if r.status_code >= 400:
                    assert_openai_error(r)
                cases += 1
    SEEN["sweep"] = cases
    assert cases > 300


def test_no_engine_step_failed(small_server):
    """Runs after the property test: it ran, some requests were served, none broke a step."""
    print(f"\nvalue fuzz: {SEEN}")
    assert SEEN["cases"] >= EXAMPLES // 2 and SEEN["2xx"] > 0, SEEN
    m = small_server.metrics()
    assert m["ember:engine_step_errors_total"] == 0 and m["ember:engine_healthy"] == 1
    assert_allocator_idle(small_server)
