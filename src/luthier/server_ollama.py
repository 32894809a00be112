"""Ollama's REST API on `luthier serve`, beside the OpenAI one: what Open WebUI, editor
plugins, LangChain's ChatOllama and the `ollama` Python client speak.

    GET  /api/version, /api/tags, /api/ps       the one served model
    POST /api/show                              its details and chat template
    POST /api/generate                          prompt (+ system) through the chat template, or raw
    POST /api/chat                              messages, tools, format
    POST /api/embed, /api/embeddings (legacy)   embed.py's vectors (mean-pooled, normalized)

Requests are translated into the OpenAI parameters (server_protocol) and run by the same
worker, so batching, prompt caching, structured output and tool calls behave alike.
What differs is Ollama's: streaming is on unless "stream": false, as newline-delimited
JSON; sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9,
repeat_penalty 1.1, num_predict -1 = to the context's end); `format` is "json" or a JSON
schema; tool calls carry their arguments as objects; errors are {"error": message}; the
final object has Ollama's counters (durations in ns). An empty prompt or message list
answers done_reason "load", as Ollama does when asked to load a model. Model names are
the served id, with or without ":latest". Options luthier cannot change per request
(num_ctx, num_thread, num_gpu, ...) are ignored; images are a 400 (text-only models).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import tools
from .server_protocol import APIError, json_line, parse_chat, parse_completion

# The Ollama API version whose shapes these endpoints follow (clients gate features on it)
OLLAMA_VERSION = "0.12.0"
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1, "num_predict": -1}
_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json_line(obj), status, media_type="application/json")


def _params(body: dict) -> dict:
    """The OpenAI-shaped sampling fields of an Ollama request's options and format."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'options' must be an object", param="options")
    out: dict[str, Any] = {}
    for k, v in {**DEFAULTS, **opts}.items():
        if k in _OPTIONS and v is not None:
            out[_OPTIONS[k]] = v
    n = {**DEFAULTS, **opts}.get("num_predict")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool)):
        raise APIError(400, "'num_predict' must be an integer", param="options.num_predict")
    out["max_tokens"] = None if n is None or n < 0 else n  # -1 / -2: to the context's end
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    elif fmt not in (None, ""):
        raise APIError(400, "'format' must be \"json\" or a JSON schema object", param="format")
    if body.get("images"):
        raise APIError(400, "images are not supported: luthier serves text-only models", param="images")
    return out


def _messages(msgs: Any) -> list[dict]:
    """Ollama messages (tool call arguments as objects, images) in the OpenAI shape."""
    if not isinstance(msgs, list):
        raise APIError(400, "'messages' must be an array", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        if m.get("images"):
            raise APIError(400, "images are not supported: luthier serves text-only models", param="images")
        msg = {k: m[k] for k in ("role", "content") if k in m}
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                       for c in calls):
                raise APIError(400, f"messages[{i}].tool_calls must be [{{\"function\": {{...}}}}]",
                               param="messages")
            msg["tool_calls"] = [{"type": "function", "function": {
                "name": c["function"].get("name"),
                "arguments": json.dumps(c["function"].get("arguments", {}), ensure_ascii=False)}} for c in calls]
        out.append(msg)
    return out


class Ollama:
    """The endpoints, on a server_app.Server (its worker, tokenizer, limits and key)."""

    def __init__(self, srv) -> None:
        self.srv = srv
        lm = srv.lm
        self.arch = str(lm.metadata.get("general.architecture", "llama"))
        try:
            st = os.stat(lm.path)
            self.size, mtime = st.st_size, st.st_mtime
        except OSError:
            self.size, mtime = 0, time.time()
        self.modified = datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        # an identifier of the file and its quantization, not a hash of the contents
        self.digest = hashlib.sha256(f"{lm.path}:{self.size}:{mtime}:{srv.fingerprint}".encode()).hexdigest()
        a = lm.args
        n = a.n_layers * (2 * a.dim * a.head_dim * (a.n_heads + a.n_kv_heads) + 3 * a.dim * a.ffn_dim)
        self.n_params = n + lm.model.vocab_size * a.dim
        q = lm.quant
        self.quant = "source" if q.bits == "source" else f"luthier-{q.bits}b-g{q.group_size}"

    # ------------------------------------------------------------------ model info

    def _details(self) -> dict:
        p = self.n_params
        size = f"{p / 1e9:.1f}B" if p >= 1e9 else f"{p / 1e6:.0f}M"
        return {"parent_model": "", "format": "gguf", "family": self.arch, "families": [self.arch],
                "parameter_size": size, "quantization_level": self.quant}

    def _card(self) -> dict:
        mid = self.srv.model_id
        return {"name": mid, "model": mid, "modified_at": self.modified, "size": self.size,
                "digest": self.digest, "details": self._details()}

    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is None:
            return
        mid = self.srv.model_id
        if not isinstance(m, str) or m not in (mid, f"{mid}:latest", "default"):
            raise APIError(404, f"model '{str(m)[:200]}' not found; this server serves '{mid}'", param="model")

    async def pull(self, request: Request) -> Response:
        """/api/pull of the served model succeeds at once (it is here already, as `ollama
        pull` of a present model); any other name is 404: this server runs one local model
        and fetches nothing."""
        self.srv.check_auth(request)
        body = await self.srv.read_json(request)
        name = body.get("model", body.get("name"))  # "name" is the older spelling
        if name is None:
            raise APIError(400, "'model' is required", param="model")
        self._check_model({"model": name})
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", param="stream")
        if not stream:
            return _json({"status": "success"})
        lines = ({"status": "pulling manifest"}, {"status": "success"})
        return Response("".join(json_line(x) + "\n" for x in lines), media_type="application/x-ndjson")

    def refuse(self, op: str):
        """/api/create, /api/copy, /api/delete, /api/push: a clear 400 (this server runs the one
        model it was started with), not the 404 of an unknown route."""
        async def handler(request: Request) -> Response:
            self.srv.check_auth(request)
            raise APIError(400, f"luthier serve runs the one model it was started with "
                                f"('{self.srv.model_id}'): /api/{op} is not supported")

        return handler

    async def version(self, request: Request) -> Response:
        return _json({"version": OLLAMA_VERSION})

    async def tags(self, request: Request) -> Response:
        self.srv.check_auth(request)
        return _json({"models": [self._card()]})

    async def ps(self, request: Request) -> Response:
        self.srv.check_auth(request)
        card = dict(self._card(), expires_at="9999-12-31T23:59:59Z", size_vram=0, context_length=self.srv.n_ctx)
        return _json({"models": [card]})

    async def show(self, request: Request) -> Response:
        self.srv.check_auth(request)
        body = await self.srv.read_json(request)
        self._check_model(body)
        tok, a = self.srv.tok, self.srv.lm.args
        info = {"general.architecture": self.arch, "general.parameter_count": self.n_params,
                f"{self.arch}.context_length": self.srv.n_ctx, f"{self.arch}.embedding_length": a.dim,
                f"{self.arch}.block_count": a.n_layers, f"{self.arch}.attention.head_count": a.n_heads,
                f"{self.arch}.attention.head_count_kv": a.n_kv_heads}
        return _json({"modelfile": "", "parameters": "", "license": "",
                      "template": tok.chat_template or tok.default_chat_template,
                      "details": self._details(), "model_info": info, "modified_at": self.modified,
                      "capabilities": ["completion", "tools"]})

    # ------------------------------------------------------------------ generation

    async def generate(self, request: Request) -> Response:
        srv = self.srv
        srv.check_auth(request)
        body = await srv.read_json(request)
        self._check_model(body)
        prompt, system = body.get("prompt", ""), body.get("system")
        if not isinstance(prompt, str) or not (system is None or isinstance(system, str)):
            raise APIError(400, "'prompt' and 'system' must be strings", param="prompt")
        if body.get("suffix"):
            raise APIError(400, "'suffix' (fill in the middle) is not supported", param="suffix")
        ctx = body.get("context") or []
        if not isinstance(ctx, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < srv.tok.vocab_size for t in ctx):
            raise APIError(400, "'context' must be an array of token ids", param="context")
        if not prompt and not ctx:
            return _json({"model": srv.model_id, "created_at": _now(), "response": "", "done": True,
                          "done_reason": "load"})
        raw = body.get("raw", False)
        fields = _params(body)
        if raw:
            req = parse_completion({"prompt": prompt or " ", **fields}, srv.tok.vocab_size, srv.n_ctx)
            encode = lambda: srv.tok.encode(prompt, add_bos=False if ctx else None)  # noqa: E731
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            req = parse_chat({"messages": msgs, **fields}, srv.tok.vocab_size, srv.n_ctx)
            encode = lambda: srv.tok.encode_chat(req.messages)  # noqa: E731
        ids = await srv.tokenize(encode)
        if ctx and ids and srv.tok.bos_id is not None and ids[0] == srv.tok.bos_id:
            ids = ids[1:]  # the earlier exchange already began with BOS
        return await self._run(request, body, list(ctx) + ids, req.params, None, chat=False)

    async def chat(self, request: Request) -> Response:
        srv = self.srv
        srv.check_auth(request)
        body = await srv.read_json(request)
        self._check_model(body)
        msgs = _messages(body.get("messages") or [])
        if not msgs:
            return _json({"model": srv.model_id, "created_at": _now(),
                          "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
        fields = _params(body)
        if body.get("tools") is not None:
            fields["tools"] = body["tools"]
        req = parse_chat({"messages": msgs, **fields}, srv.tok.vocab_size, srv.n_ctx)
        ids = await srv.tokenize(tools.encode, srv.tok, req.messages, req.tools)
        return await self._run(request, body, ids, req.params, req.tools, chat=True)

    async def _run(self, request: Request, body: dict, ids: list[int], p, spec, chat: bool) -> Response:
        srv = self.srv
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", param="stream")
        await srv.admit(p)
        budget = srv.context_check(ids, p.max_tokens, False, "prompt")
        t0 = time.perf_counter_ns()
        job = srv.submit([ids], p, [budget], None)

        def piece(text: str, calls: list | None = None) -> dict:
            out: dict = {"model": srv.model_id, "created_at": _now()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
                if calls:
                    out["message"]["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                                  "arguments": json.loads(c["function"]["arguments"])}}
                                                    for c in calls]
            else:
                out["response"] = text
            out["done"] = False
            return out

        def final(d, first_ns: int | None, text: str) -> dict:
            end = time.perf_counter_ns()
            first = first_ns or end
            out = piece("")
            out.update(done=True, done_reason=d.finish_reason if d.finish_reason == "length" else "stop",
                       total_duration=end - t0, load_duration=0, prompt_eval_count=d.prompt_tokens,
                       prompt_eval_duration=first - t0, eval_count=d.completion_tokens, eval_duration=end - first)
            if not chat:
                out["context"] = ids + srv.tok.encode(text, add_bos=False)
            return out

        async def pieces() -> AsyncIterator[dict]:
            held = tools.ToolStream(spec)
            first_ns, parts = None, []
            async for d in srv.events(job, None if stream else request):
                if first_ns is None and (d.text or d.finish_reason):
                    first_ns = time.perf_counter_ns()
                parts.append(d.text)
                text = held.feed(d.text)
                if text:
                    yield piece(text)
                if d.finish_reason:
                    rest, calls = held.finish()
                    if rest or calls:
                        yield piece(rest, calls)
                    yield final(d, first_ns, "".join(parts))

        if stream:
            async def lines() -> AsyncIterator[str]:
                try:
                    async for c in pieces():
                        yield json_line(c) + "\n"
                except APIError as e:
                    yield json_line({"error": e.message}) + "\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")
        text, calls, last = [], [], None
        async for c in pieces():
            if c["done"]:
                last = c
            elif chat:
                text.append(c["message"]["content"])
                calls += c["message"].get("tool_calls", [])
            else:
                text.append(c["response"])
        if chat:
            last["message"]["content"] = "".join(text)
            if calls:
                last["message"]["tool_calls"] = calls
        else:
            last["response"] = "".join(text)
        return _json(last)


async def _embed(o: "Ollama", request: Request, legacy: bool) -> Response:
    """/api/embed {input: str | [str], truncate} -> {embeddings}; the legacy /api/embeddings
    {prompt} -> {embedding}."""
    from .server_app import MAX_EMBED_INPUTS

    srv = o.srv
    srv.check_auth(request)
    body = await srv.read_json(request)
    o._check_model(body)
    t0 = time.perf_counter_ns()
    inputs = body.get("prompt") if legacy else body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not (isinstance(inputs, list) and 0 < len(inputs) <= MAX_EMBED_INPUTS
            and all(isinstance(x, str) for x in inputs)):
        name = "prompt" if legacy else "input"
        raise APIError(400, f"'{name}' must be a string or an array of 1 to {MAX_EMBED_INPUTS} strings", param=name)
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise APIError(400, "'truncate' must be a boolean", param="truncate")
    vectors, n = await srv.embed_texts(inputs, truncate, "input")
    if legacy:
        return _json({"embedding": vectors[0].tolist()})
    return _json({"model": srv.model_id, "embeddings": [v.tolist() for v in vectors],
                  "total_duration": time.perf_counter_ns() - t0, "load_duration": 0, "prompt_eval_count": n})


def _endpoint(fn):
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except APIError as e:
            return Response(json_line({"error": e.message}), e.status, e.headers or None,
                            media_type="application/json")

    return handler


def ollama_routes(srv) -> list[Route]:
    o = Ollama(srv)
    return [Route("/api/version", _endpoint(o.version), methods=["GET"]),
            Route("/api/tags", _endpoint(o.tags), methods=["GET"]),
            Route("/api/ps", _endpoint(o.ps), methods=["GET"]),
            Route("/api/show", _endpoint(o.show), methods=["POST"]),
            Route("/api/generate", _endpoint(o.generate), methods=["POST"]),
            Route("/api/chat", _endpoint(o.chat), methods=["POST"]),
            Route("/api/embed", _endpoint(lambda r: _embed(o, r, False)), methods=["POST"]),
            Route("/api/embeddings", _endpoint(lambda r: _embed(o, r, True)), methods=["POST"]),
            Route("/api/pull", _endpoint(o.pull), methods=["POST"])] + [
            Route(f"/api/{op}", _endpoint(o.refuse(op)), methods=[method])
            for op, method in (("create", "POST"), ("copy", "POST"), ("push", "POST"), ("delete", "DELETE"))]
