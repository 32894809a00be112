"""Structured output: generation constrained to a JSON schema, a regex or a grammar.

The constraint is compiled by llguidance (the grammar engine llama.cpp, vLLM and SGLang
use) into a matcher that, before every sampled token, gives the set of tokens that keep
the output inside the language; the sampler only sees those (the others' logits become
-inf), and the matcher then consumes the sampled token. When the output is complete and
nothing may follow, the generation stops ("stop").

Requests spell constraints the way the APIs people use do:
    OpenAI       response_format {"type": "json_object"} | {"type": "json_schema",
                 "json_schema": {"schema": {...}}}
    llama.cpp    "json_schema": {...}, "grammar": "<GBNF>"
    vLLM         "guided_json", "guided_regex", "guided_choice": [...], "guided_grammar" (Lark)
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import numpy as np


class GrammarError(ValueError):
    """A constraint that cannot be compiled; `param` names the request field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a declared dependency
        raise GrammarError("response_format", "structured output needs the llguidance package "
                                              "(pip install llguidance)") from None
    return llguidance


# JSON as json.dumps writes it ('{"a": 1, "b": [2, 3]}'): free whitespace lets a small model
# spend its tokens on newlines; keywords llguidance does not implement (e.g. "format") are
# ignored instead of failing the request (a schema may override both under "x-guidance")
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": True}

FIELDS = ("response_format", "json_schema", "grammar", "guided_json", "guided_regex",
          "guided_choice", "guided_grammar")


def closed_objects(schema: Any) -> Any:
    """`schema` with "additionalProperties": false added to every object schema that lists
    its properties and says nothing about others, as llama.cpp's schema converter (and
    so Ollama's `format`) reads them: JSON Schema's default lets a small model pad the
    answer with keys nobody asked for. A schema that allows them explicitly keeps them."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
            out[k] = {n: closed_objects(s) for n, s in v.items()} if isinstance(v, dict) else v
        elif k in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties",
                   "contains", "if", "then", "else"):
            out[k] = closed_objects(v)
        else:
            out[k] = v
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _schema(param: str, schema: Any) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(param, f"'{param}' is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(param, f"'{param}' must be a JSON schema object")
    try:
        return _llg().LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(param, f"'{param}': {e}") from None


def from_request(body: dict) -> str | None:
    """The llguidance grammar a request body asks for (at most one of FIELDS), or None
    for free text. Raises GrammarError on a malformed or unsupported constraint."""
    given = [k for k in FIELDS if body.get(k) is not None]
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise GrammarError("response_format", "'response_format' must be an object with a 'type'")
        if rf["type"] == "text":
            given.remove("response_format")
    if len(given) > 1:
        raise GrammarError(given[1], f"give one of {', '.join(given)}, not several")
    if not given:
        return None
    name = given[0]
    v = body[name]
    llg = _llg()
    if name == "response_format":
        if v["type"] == "json_object":
            # llama-cpp-python's spelling may carry a schema here
            g = _schema(name, v.get("schema", {"type": "object"}))
        elif v["type"] == "json_schema":
            js = v.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise GrammarError(name, "response_format json_schema needs {'json_schema': {'schema': {...}}}")
            g = _schema(name, js["schema"])
        else:
            raise GrammarError(name, f"response_format type must be text, json_object or json_schema, "
                                     f"got {v['type'][:40]!r}")
    elif name in ("json_schema", "guided_json"):
        g = _schema(name, v)
    elif name == "grammar":
        if not isinstance(v, str):
            raise GrammarError(name, "'grammar' must be a GBNF grammar string")
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            g = llg.LLMatcher.grammar_from_lark(gbnf_to_lark(v))
        except Exception as e:  # noqa: BLE001 - the converter's own parse errors
            raise GrammarError(name, f"'grammar' is not a GBNF grammar luthier reads: {e}") from None
    elif name == "guided_grammar":
        if not isinstance(v, str):
            raise GrammarError(name, "'guided_grammar' must be a Lark grammar string")
        g = llg.LLMatcher.grammar_from_lark(v)
    elif name == "guided_regex":
        if not isinstance(v, str):
            raise GrammarError(name, "'guided_regex' must be a string")
        g = llg.LLMatcher.grammar_from_regex(v)
    else:  # guided_choice
        if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
            raise GrammarError(name, "'guided_choice' must be a non-empty array of strings")
        g = llg.LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in v))
    return validated(g, name, f"'{name}'")


def validated(g: str, param: str, what: str) -> str:
    """g, once llguidance accepts it (warnings pass); else GrammarError(param) saying that
    `what` cannot be compiled."""
    err = _llg().LLMatcher.validate_grammar(g)
    if err and not err.startswith("WARNING"):
        raise GrammarError(param, f"{what} cannot be compiled: {err}")
    return g


_TOK_LOCK = threading.Lock()


def llg_tokenizer(lm):
    """llguidance's view of the model's tokenizer (every token's bytes, which ids are
    special and which end generation), built once per LoadedModel."""
    with _TOK_LOCK:
        cached = getattr(lm, "_llg_tokenizer", None)
        if cached is None:
            llg = _llg()
            from .tokenizer import _SPECIAL_TYPES

            tok = lm.tokenizer

            class _Vocab:  # what llguidance.TokenizerWrapper reads
                eos_token_id = tok.eos_id
                bos_token_id = tok.bos_id
                tokens = list(tok._pieces)
                special_token_ids = [i for i, t in enumerate(tok._types) if t in _SPECIAL_TYPES]

                def __call__(self, s):
                    text = s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s
                    return tok.encode(text, add_bos=False)

            cached = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()), n_vocab=int(lm.model.vocab_size),
                                     eos_token=sorted(tok.eos_ids) or None)
            lm._llg_tokenizer = cached
        return cached


class LazyGrammar(str):
    """A grammar that allows any text until the model writes `trigger` (tools.py's
    tool_choice "auto"): GrammarSampler computes no masks before that."""

    def __new__(cls, grammar: str, trigger: str):
        obj = super().__new__(cls, grammar)
        obj.trigger = trigger
        return obj


class GrammarSampler:
    """Wraps a sampler (anything with sample(logits, previous) -> id): it samples among
    the tokens the grammar allows next and feeds the choice to the grammar. `done` turns
    true when the output is complete and only the end of generation may follow.

    With a LazyGrammar, until the output contains its trigger, a token is drawn from the
    unmasked logits and kept if the grammar accepts it (as llama.cpp's lazy grammars skip
    the grammar until a trigger word); only a refused one is drawn again among the allowed
    tokens. Greedy picks the same token either way; a draw is from the masked distribution
    too (P(t) + (1 - Z) P(t) / Z = P(t) / Z, Z the allowed mass), up to top-k/top-p cutting
    at other places. Free text then costs a 4 us check a token instead of a mask (~36 us
    to compute on SmolLM2's vocabulary, more to apply)."""

    def __init__(self, inner, lm, grammar: str):
        llg = _llg()
        self.inner = inner
        self.matcher = llg.LLMatcher(llg_tokenizer(lm), grammar)
        if self.matcher.is_error():
            raise GrammarError("grammar", self.matcher.get_error())
        self.vocab = int(lm.model.vocab_size)
        trigger = getattr(grammar, "trigger", None)
        self.trigger = trigger.encode() if trigger else None  # None: masks from the start
        self.tail = b""  # the output's last bytes while waiting for the trigger
        self.piece = lm.tokenizer.decode_bytes

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar accepts next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)  # 1 bit per token, LSB first
        return np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool)

    def sample(self, logits: np.ndarray, previous) -> int:
        if self.trigger is not None:
            tok = int(self.inner.sample(logits, previous))
            if self.matcher.validate_tokens([tok]) == 1:
                self.matcher.consume_token(tok)
                self.tail = (self.tail + self.piece([tok]))[-4 * len(self.trigger):]
                if self.trigger in self.tail:  # the constrained part begins: masks from here on
                    self.trigger = None
                return tok
            self.trigger = None  # refused: the grammar has a say from here on
        z = np.where(self.allowed(), np.asarray(logits, np.float32).reshape(-1), -np.inf)  # [vocab]
        tok = int(self.inner.sample(z, previous))
        if not self.matcher.consume_token(tok):
            raise RuntimeError(f"the grammar refused token {tok}: {self.matcher.get_error()}")
        return tok
