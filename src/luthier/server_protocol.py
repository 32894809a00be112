"""The OpenAI wire format: request bodies checked into parameters, and the shapes of
responses, chunks and errors. No model and no I/O here (server_app does the HTTP).

Every check raises `APIError` with a 4xx status: nothing a client sends may become a
5xx, which the `openai` client would retry and so multiply the load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .grammar import GrammarError
from .grammar import from_request as grammar_from_request
from .tools import ToolSpec, check_tool_calls
from .tools import from_request as tools_from_request

MAX_BODY_BYTES = 1 << 20  # request bodies over this get 413
MAX_PROMPTS = 64  # prompts in one /v1/completions request (a batch, as lm-eval sends)
MAX_N = 16  # choices per prompt (n): pass@k evaluations sample several
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 512
MAX_TOP_LOGPROBS = 20
MAX_MESSAGES = 4096
MAX_LOGIT_BIAS = 1024
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


# Characters that JSON leaves unescaped but str.splitlines() and some NDJSON/SSE readers
# take as line breaks: escaped, a streamed record stays one line for every reader
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_line(obj: Any, **kw: Any) -> str:
    """json.dumps(obj, ensure_ascii=False, **kw) on one line for any line splitter (the
    same JSON value: these characters only occur inside strings, where the escape means them)."""
    return json.dumps(obj, ensure_ascii=False, **kw).translate(_LINE_BREAKS)


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------- field checks


def _type_name(v: Any) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number",
                                     str: "string", list: "array", dict: "object"}.get(type(v), "value")


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():  # 16.0 from a loosely typed client
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"'{name}' must be an integer, got {_type_name(v)}", "invalid_type")
    if not lo <= v <= hi:
        raise _bad(name, f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float,
           lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"'{name}' must be a number, got {_type_name(v)}", "invalid_type")
    v = float(v)  # a huge JSON integer becomes inf here, and fails the range check
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(name, f"'{name}' must be in {rng}, got {v:g}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"'{name}' must be a boolean, got {_type_name(v)}", "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", "'stop' must be a string or an array of strings", "invalid_type")
    if len(items) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in items):
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} strings of {MAX_STOP_CHARS} characters")
    return [s for s in items if s]  # an empty stop string would end every generation at once


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad("logit_bias", "'logit_bias' must be an object of token id -> bias", "invalid_type")
    if len(v) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"'logit_bias' takes at most {MAX_LOGIT_BIAS} entries")
    out = {}
    for k, b in v.items():
        try:
            tid = int(k)
        except ValueError:
            raise _bad("logit_bias", f"'logit_bias' keys must be token ids, got {k!r}") from None
        if not 0 <= tid < vocab_size:
            raise _bad("logit_bias", f"'logit_bias' token id {tid} is outside the vocabulary")
        out[tid] = _float({"b": b}, "b", 0.0, -100.0, 100.0) if b is not None else 0.0
    return out


def check_model(body: dict, served: str) -> None:
    """The served id and "default" are accepted, as is no model at all; else 404."""
    m = body.get("model")
    if m is None:
        return
    if not isinstance(m, str):
        raise _bad("model", f"'model' must be a string, got {_type_name(m)}", "invalid_type")
    if m not in (served, "default"):
        raise APIError(404, f"The model '{m[:200]}' does not exist; this server serves "
                            f"'{served}' (or say 'default')", param="model", code="model_not_found")


# ---------------------------------------------------------------------- parameters


@dataclass
class GenParams:
    """What one generation request asks for, checked. max_tokens None = to the context's end."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top-n alternatives per token; None = no logprobs
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's and llama-server's extension: only max_tokens and stop end it
    grammar: str | None = None  # llguidance grammar of response_format & co. (grammar.py)
    n: int = 1  # choices per prompt: choice i * n + j is sample j of prompt i


def _common_params(body: dict, vocab_size: int, n_ctx: int, default_max: int | None) -> GenParams:
    p = GenParams()
    p.n = _int(body, "n", 1, 1, MAX_N)
    if _int(body, "best_of", 1, 1, 1 << 30) not in (1, p.n):
        raise _bad("best_of", "best_of other than 1 (or n) is not supported")
    # max_completion_tokens is the chat API's newer name for max_tokens
    mt = _int(body, "max_completion_tokens", None, 0, n_ctx)
    p.max_tokens = mt if mt is not None else _int(body, "max_tokens", default_max, 0, n_ctx)
    p.temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    if p.temperature < MIN_TEMPERATURE:  # logits / 1e-320 overflow; the limit is greedy anyway
        p.temperature = 0.0
    p.top_p = _float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", 0, -1, 1 << 30)
    p.top_k = max(top_k, 0)  # -1 = off, as vLLM spells it
    p.min_p = _float(body, "min_p", 0.0, 0.0, 1.0)
    p.repetition_penalty = _float(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    p.frequency_penalty = _float(body, "frequency_penalty", 0.0, -2.0, 2.0)
    p.presence_penalty = _float(body, "presence_penalty", 0.0, -2.0, 2.0)
    p.logit_bias = _logit_bias(body, vocab_size)
    seed = _int(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    p.seed = None if seed is None else seed % (1 << 64)  # numpy wants a non-negative seed
    p.stop = _stop(body)
    p.stream = _bool(body, "stream", False)
    p.ignore_eos = _bool(body, "ignore_eos", False)
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
        p.include_usage = _bool(so, "include_usage", False)
    for name in ("suffix",):
        if body.get(name):
            raise _bad(name, f"'{name}' is not supported")
    try:
        p.grammar = grammar_from_request(body)
    except GrammarError as e:
        raise _bad(e.param, str(e)) from None
    return p


def _no_tools(body: dict) -> None:
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name):
            raise _bad(name, f"'{name}' belongs to /v1/chat/completions")


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]  # each a text or a list of token ids
    params: GenParams


def parse_completion(body: dict, vocab_size: int, n_ctx: int) -> CompletionRequest:
    p = _common_params(body, vocab_size, n_ctx, default_max=16)  # OpenAI's default
    _no_tools(body)
    p.echo = _bool(body, "echo", False)
    p.logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, list) for t in prompt):
        for ids in prompt:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise _bad("prompt", "token id prompts must be arrays of integers", "invalid_type")
        prompts = list(prompt)
    else:
        raise _bad("prompt", "'prompt' must be a string, an array of strings, an array of token "
                             "ids or an array of arrays of token ids (non-empty)", "invalid_type")
    if len(prompts) > MAX_PROMPTS:
        raise _bad("prompt", f"at most {MAX_PROMPTS} prompts per request")
    if len(prompts) * p.n > MAX_PROMPTS:
        raise _bad("n", f"at most {MAX_PROMPTS} choices (prompts x n) per request")
    for ids in prompts:
        if isinstance(ids, list):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise _bad("prompt", f"token id {bad} is outside the vocabulary (size {vocab_size})")
    return CompletionRequest(prompts, p)


@dataclass
class ChatRequest:
    messages: list[dict]
    params: GenParams
    tools: ToolSpec | None = None


def _message_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise _bad(f"messages[{i}].content", "only text content parts "
                           "({\"type\": \"text\", \"text\": ...}) are supported")
        return "\n".join(texts)
    raise _bad(f"messages[{i}].content", "content must be a string or an array of text parts",
               "invalid_type")


def parse_chat(body: dict, vocab_size: int, n_ctx: int) -> ChatRequest:
    p = _common_params(body, vocab_size, n_ctx, default_max=None)  # chat: to the context's end
    try:
        tools = tools_from_request(body)
        if tools is not None:
            p.grammar = tools.constraint(p.grammar)
    except GrammarError as e:
        raise _bad(e.param, str(e)) from None
    if _bool(body, "logprobs", False):
        p.logprobs = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty array", "invalid_type")
    if len(msgs) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "each message must be an object", "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"role must be one of {', '.join(CHAT_ROLES)}")
        msg = {"role": "system" if role == "developer" else role,
               "content": _message_text(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "assistant" and m.get("tool_calls") is not None:
            try:
                msg["tool_calls"] = check_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
            except GrammarError as e:
                raise _bad(e.param, str(e)) from None
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return ChatRequest(out, p, tools)


def check_strings(obj: Any) -> None:
    """Reject lone UTF-16 surrogates ("\\ud800" is valid JSON but no text): they cannot be
    encoded, so the tokenizer would fail on them. Iterative: nesting depth is the parser's."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "strings must be valid Unicode (no lone surrogates)",
                               code="invalid_json") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


# ---------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from prompt caching."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -Infinity


def completion_logprobs(tok, infos: list, offset: int) -> dict:
    """The legacy completions shape for TokenInfos; offsets count characters of the text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for info in infos:
        piece = tok.token_to_piece(info.token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(None if info.logprob is None else _finite(info.logprob))
        out["top_logprobs"].append(None if info.top is None else
                                   {tok.token_to_piece(t): _finite(lp) for t, lp in info.top})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tok, infos: list) -> dict:
    def entry(t: int, lp: float) -> dict:
        b = tok.token_to_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": _finite(lp), "bytes": list(b)}

    content = []
    for info in infos:
        e = entry(info.token, info.logprob)
        e["top_logprobs"] = [entry(t, lp) for t, lp in (info.top or [])]
        content.append(e)
    return {"content": content}
