"""The HTTP side of the server: a Starlette app speaking the OpenAI API.

The event loop only parses, checks, tokenizes (in a thread) and streams; the model runs
on server_worker's thread. Errors are always {"error": {...}} with a 4xx for anything the
client sent wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import __version__, tools
from .server_protocol import (MAX_BODY_BYTES, APIError, GenParams, chat_logprobs, check_model,
                              check_strings, completion_logprobs, error_body, json_line,
                              parse_chat, parse_completion, usage)
from .grammar import llg_tokenizer
from .server_ollama import ollama_routes
from .server_worker import Delta, GenJob, JobFailed, Worker

BODY_TIMEOUT_S = 60.0  # a client that never finishes sending its body gets 408
POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
MAX_EMBED_INPUTS = 256  # inputs per /v1/embeddings or /api/embed request


def dumps(obj: Any) -> str:
    return json_line(obj, separators=(",", ":"), allow_nan=False)


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status, headers, media_type="application/json")


def error_response(e: APIError) -> Response:
    return json_response(e.body(), e.status, e.headers)


def served_model_id(lm) -> str:
    name = os.path.basename(os.path.normpath(lm.path))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class Server:
    """State shared by the endpoints: the model's worker, its id, the limits."""

    def __init__(self, lm, model_id: str | None, api_key: str | None, max_queue: int,
                 max_body_bytes: int, batch_tokens: int | None = None, cache_tokens: int | None = None,
                 lookup=None):
        self.lm, self.tok = lm, lm.tokenizer
        self.model_id = model_id or served_model_id(lm)
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.n_ctx = int(lm.extra.get("ctx") or lm.args.max_seq_len)
        self.worker = Worker(lm, max_queue, batch_tokens, cache_tokens, lookup)
        self.created = int(time.time())
        self.fingerprint = f"luthier-{__version__}-b{lm.quant.bits}g{lm.quant.group_size}"

    # ------------------------------------------------------------------ plumbing

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, key = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def generation_request(self, request: Request, parse: Callable[[dict, int, int], Any]) -> Any:
        """A completion or chat request, authorized, parsed and checked against this model
        and the queue's capacity (before tokenizing: a flood is turned away cheaply)."""
        self.check_auth(request)
        body = await self.read_json(request)
        check_model(body, self.model_id)
        req = parse(body, self.tok.vocab_size, self.n_ctx)
        await self.admit(req.params)
        return req

    async def admit(self, p: GenParams) -> None:
        """Checks before tokenizing a generation (a flood is turned away cheaply): room in
        the queue; under a grammar, llguidance's view of the vocabulary, built once, here in
        a thread rather than on the model thread, where it would stall every running stream
        (~1 s for Gemma 3's 262k tokens)."""
        self.worker.check_capacity()
        if p.grammar is not None:
            await run_in_threadpool(llg_tokenizer, self.lm)

    async def read_json(self, request: Request) -> dict:
        limit = self.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > limit):
            raise APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        parts, n = [], 0

        async def read() -> None:
            nonlocal n
            async for part in request.stream():
                n += len(part)
                if n > limit:
                    raise APIError(413, f"the request body exceeds {limit} bytes",
                                   code="request_too_large")
                parts.append(part)

        try:
            await asyncio.wait_for(read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(408, "the request body did not arrive in time", code="timeout") from None
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the body") from None
        try:
            body = json.loads(b"".join(parts), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        check_strings(body)
        return body

    def context_check(self, ids: list[int], max_tokens: int | None, echo: bool, param: str) -> int:
        """The tokens this prompt may generate; 400 when the prompt does not fit."""
        n = len(ids)
        if n == 0:
            raise APIError(400, "the prompt is empty (no tokens)", param=param)
        room = self.n_ctx - n
        if room <= 0 and not (room == 0 and max_tokens == 0 and echo):
            raise APIError(400, f"the prompt has {n} tokens; the context holds {self.n_ctx} "
                                "(prompt and completion together)",
                           param=param,
                           code="context_length_exceeded")
        return room if max_tokens is None else min(max_tokens, room)

    async def tokenize(self, fn, *args) -> Any:
        """Tokenizer or chat-template work in a thread; its ValueErrors are the client's."""
        try:
            return await run_in_threadpool(fn, *args)
        except (ValueError, TypeError, UnicodeError, RecursionError) as e:
            raise APIError(400, f"{type(e).__name__}: {str(e)[:500]}") from None

    def submit(self, prompts: list[list[int]], p: GenParams, max_tokens: list[int],
               echo_texts: list[str] | None) -> GenJob:
        """A job of n choices per prompt: its sequence i * n + j is sample j of prompt i."""
        def rep(xs):
            return None if xs is None else [x for x in xs for _ in range(p.n)]

        job = GenJob(rep(prompts), p, rep(max_tokens), rep(echo_texts), asyncio.get_running_loop())
        self.worker.submit(job)
        return job

    async def events(self, job: GenJob, request: Request | None) -> AsyncIterator[Delta]:
        """The job's Deltas until it ends; cancels it if the consumer stops early or
        (request given) the client disconnects while it waits."""
        finished = False
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:  # an event already queued needs no timer task (one per token otherwise)
                    ev = job.events.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        ev = await asyncio.wait_for(job.events.get(), POLL_S)
                    except asyncio.TimeoutError:
                        ev = False
                if request is not None and loop.time() - checked >= POLL_S:
                    checked = loop.time()
                    if await request.is_disconnected():
                        return
                if ev is False:
                    continue
                if ev is None:
                    finished = True
                    return
                if isinstance(ev, JobFailed):
                    raise APIError(500, ev.message, "server_error", code="internal_error")
                yield ev
        finally:
            if not finished:
                self.worker.cancel(job)

    # ------------------------------------------------------------------ endpoints

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        card = {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "luthier", "max_model_len": self.n_ctx}
        if "model_id" in request.path_params:
            if request.path_params["model_id"] not in (self.model_id, "default"):
                raise APIError(404, "no such model", param="model", code="model_not_found")
            return json_response(card)
        return json_response({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        w = self.worker
        return json_response({"status": "ok", "model": self.model_id, "busy": w.busy,
                              "queued": w.queued, "max_queue": w.max_queue})

    async def metrics(self, request: Request) -> Response:
        """Prometheus text format (as vLLM's and llama-server's /metrics): requests,
        tokens, prompt caching, the queue. Needs the API key when one is set."""
        self.check_auth(request)
        w = self.worker
        m = {"requests_finished_total": ("counter", "requests answered", w.n_done),
             "requests_cancelled_total": ("counter", "requests whose client went away", w.n_cancelled),
             "requests_held": ("gauge", "requests waiting or running", w.held),
             "requests_max_queue": ("gauge", "requests held at most before 503", w.max_queue)}
        if w.sched is not None:
            m.update(w.sched.metrics())
        lines = []
        for name, (kind, text, value) in m.items():
            lines += [f"# HELP luthier_{name} {text}", f"# TYPE luthier_{name} {kind}",
                      f'luthier_{name}{{model="{self.model_id}"}} {value}']
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def tokenize_endpoint(self, request: Request) -> Response:
        self.check_auth(request)
        body = await self.read_json(request)
        add_special = body.get("add_special", body.get("add_special_tokens", True))
        if not isinstance(add_special, bool):
            raise APIError(400, "'add_special' must be a boolean", param="add_special")
        if "messages" in body:
            req = parse_chat({"messages": body["messages"]}, self.tok.vocab_size, self.n_ctx)
            ids = await self.tokenize(self.tok.encode_chat, req.messages)
        else:
            text = body.get("content", body.get("prompt"))
            if not isinstance(text, str):
                raise APIError(400, "'content' must be a string", param="content", code="invalid_type")
            ids = await self.tokenize(lambda: self.tok.encode(text, add_bos=None if add_special else False))
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": self.n_ctx})

    async def detokenize_endpoint(self, request: Request) -> Response:
        self.check_auth(request)
        body = await self.read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be an array of token ids", param="tokens", code="invalid_type")
        text = await self.tokenize(self.tok.decode, ids)
        return json_response({"content": text})

    async def completions(self, request: Request) -> Response:
        req = await self.generation_request(request, parse_completion)
        p = req.params

        def encode_all() -> tuple[list[list[int]], list[str]]:
            ids = [self.tok.encode(x) if isinstance(x, str) else list(x) for x in req.prompts]
            texts = [x if isinstance(x, str) else self.tok.decode(x) for x in req.prompts] if p.echo else []
            return ids, texts

        prompts, texts = await self.tokenize(encode_all)
        budgets = [self.context_check(ids, p.max_tokens, p.echo, "prompt") for ids in prompts]
        job = self.submit(prompts, p, budgets, texts or None)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if p.stream:
            return self.sse(self.completion_chunks(job, cid, p, [len(x) for x in prompts]))
        choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": None}
                   for i in range(len(prompts) * p.n)]
        ctoks = cached = 0
        async for d in self.events(job, request):
            c = choices[d.index]
            if p.logprobs is not None and d.tokens:
                lp = completion_logprobs(self.tok, d.tokens, len(c["text"]))
                if c["logprobs"] is None:
                    c["logprobs"] = lp
                else:
                    for k in lp:
                        c["logprobs"][k] += lp[k]
            c["text"] += d.text
            if d.finish_reason:
                c["finish_reason"] = d.finish_reason
                ctoks += d.completion_tokens
                cached += d.cached_tokens if d.index % p.n == 0 else 0
        for c in choices:
            if p.logprobs is not None and c["logprobs"] is None:
                c["logprobs"] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        return json_response({"id": cid, "object": "text_completion", "created": int(time.time()),
                              "model": self.model_id, "system_fingerprint": self.fingerprint,
                              "choices": choices,
                              "usage": usage(sum(len(x) for x in prompts), ctoks, cached)})  # a prompt counts once

    async def completion_chunks(self, job: GenJob, cid: str, p: GenParams,
                                n_prompt: list[int]) -> AsyncIterator[dict]:
        created = int(time.time())
        offsets = [0] * (len(n_prompt) * p.n)
        ctoks = cached = 0
        async for d in self.events(job, None):
            lp = None
            if p.logprobs is not None:
                lp = completion_logprobs(self.tok, d.tokens, offsets[d.index])
            offsets[d.index] += len(d.text)
            if d.finish_reason:
                ctoks += d.completion_tokens
                cached += d.cached_tokens if d.index % p.n == 0 else 0
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": self.model_id,
                     "system_fingerprint": self.fingerprint,
                     "choices": [{"index": d.index, "text": d.text, "logprobs": lp,
                                  "finish_reason": d.finish_reason}]}
            if p.include_usage:
                chunk["usage"] = None
            yield chunk
        if p.include_usage:
            yield {"id": cid, "object": "text_completion", "created": created, "model": self.model_id,
                   "system_fingerprint": self.fingerprint, "choices": [], "usage": usage(sum(n_prompt), ctoks, cached)}

    async def chat(self, request: Request) -> Response:
        req = await self.generation_request(request, parse_chat)
        p = req.params
        ids = await self.tokenize(tools.encode, self.tok, req.messages, req.tools)
        budget = self.context_check(ids, p.max_tokens, False, "messages")
        job = self.submit([ids], p, [budget], None)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if p.stream:
            return self.sse(self.chat_chunks(job, cid, p, len(ids), req.tools))
        texts = [[] for _ in range(p.n)]
        infos: list[list] = [[] for _ in range(p.n)]
        finish: list[str | None] = [None] * p.n
        ctoks = cached = 0
        async for d in self.events(job, request):
            texts[d.index].append(d.text)
            infos[d.index] += d.tokens
            if d.finish_reason:
                finish[d.index] = d.finish_reason
                ctoks += d.completion_tokens
                cached = d.cached_tokens if d.index == 0 else cached
        choices = []
        for j in range(p.n):
            content, calls = tools.parse("".join(texts[j]), req.tools)
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": j, "message": message,
                            "logprobs": chat_logprobs(self.tok, infos[j]) if p.logprobs is not None else None,
                            "finish_reason": "tool_calls" if calls else finish[j]})
        return json_response({"id": cid, "object": "chat.completion", "created": int(time.time()),
                              "model": self.model_id, "system_fingerprint": self.fingerprint,
                              "choices": choices, "usage": usage(len(ids), ctoks, cached)})

    async def chat_chunks(self, job: GenJob, cid: str, p: GenParams, n_prompt: int,
                          spec: tools.ToolSpec | None) -> AsyncIterator[dict]:
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None, index: int = 0) -> dict:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                 "system_fingerprint": self.fingerprint,
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if p.include_usage:
                c["usage"] = None
            return c

        for j in range(p.n):
            yield chunk({"role": "assistant", "content": ""}, index=j)
        # tool calls stream as they are written when a grammar checks them (tools.ToolStream);
        # otherwise they are held back until their choice ends, then sent whole
        streams = [tools.ToolStream(spec) for _ in range(p.n)]
        ctoks = cached = 0
        async for d in self.events(job, None):
            lp = chat_logprobs(self.tok, d.tokens) if p.logprobs is not None else None
            deltas = streams[d.index].deltas(d.text)
            if not deltas and d.tokens:
                deltas = [{"content": ""}]
            for k, delta in enumerate(deltas):  # the step's logprobs go with its first delta
                yield chunk(delta, None, lp if k == 0 else None, d.index)
            if d.finish_reason:
                ctoks += d.completion_tokens
                cached = d.cached_tokens if d.index == 0 else cached
                deltas, finish = streams[d.index].final_deltas(d.finish_reason)
                for delta in deltas:
                    yield chunk(delta, index=d.index)
                yield chunk({}, finish, index=d.index)
        if p.include_usage:
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                   "system_fingerprint": self.fingerprint, "choices": [], "usage": usage(n_prompt, ctoks, cached)}

    async def embed_texts(self, inputs: list, truncate: bool, param: str) -> tuple[list, int]:
        """Each input (text or token ids) through embed.embed_ids on the model thread, one
        job per input so that running streams go on between them; (vectors, tokens)."""
        from . import embed

        def ids_of(x) -> list[int]:
            ids = self.tok.encode(x) if isinstance(x, str) else list(x)
            return embed.fit_context(ids, self.n_ctx, truncate)

        vectors, n = [], 0
        for x in inputs:
            try:
                ids = await run_in_threadpool(ids_of, x)
                if not ids:
                    raise ValueError("an input is empty (no tokens)")
            except ValueError as e:
                raise APIError(400, str(e), param=param) from None
            n += len(ids)
            self.worker.check_capacity()
            vectors.append(await run_in_threadpool(self.worker.call, lambda lm, ids=ids: embed.embed_ids(lm, ids)))
        return vectors, n

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's /v1/embeddings: input a string, strings, token ids or lists of them;
        encoding_format float or base64 (the openai client's default)."""
        from .embed import as_base64

        self.check_auth(request)
        body = await self.read_json(request)
        check_model(body, self.model_id)
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and
                                       all(isinstance(t, int) and not isinstance(t, bool) for t in inputs)):
            inputs = [inputs]
        ok = isinstance(inputs, list) and 0 < len(inputs) <= MAX_EMBED_INPUTS and all(
            isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               and 0 <= t < self.tok.vocab_size for t in x))
            for x in inputs)
        if not ok:
            raise APIError(400, f"'input' must be a string, token ids, or an array of 1 to {MAX_EMBED_INPUTS} "
                                "of either (ids within the vocabulary)", param="input", code="invalid_type")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be float or base64", param="encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != self.lm.args.dim:
            raise APIError(400, f"this model's embeddings have {self.lm.args.dim} dimensions; "
                                "'dimensions' cannot change that", param="dimensions")
        vectors, n = await self.embed_texts(inputs, False, "input")
        data = [{"object": "embedding", "index": i,
                 "embedding": as_base64(v) if fmt == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        return json_response({"object": "list", "data": data, "model": self.model_id,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})

    def sse(self, chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            # If the client disconnects, Starlette cancels this generator; `events`'s
            # finally then cancels the job on the model thread.
            try:
                async for c in chunks:
                    yield f"data: {dumps(c)}\n\n"
            except APIError as e:  # the model thread failed after the headers went out
                yield f"data: {dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _endpoint(fn):
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except APIError as e:
            return error_response(e)

    return handler


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return json_response(error_body(msg, code=code), exc.status_code)
    return json_response(error_body("internal server error", "server_error", code="internal_error"), 500)


def chat_page_endpoint():
    """GET / : the chat page (chat_page.html, read once per app), public like llama-server's
    web UI; its API calls carry the key the user types into it."""
    from importlib.resources import files

    html = files("luthier").joinpath("chat_page.html").read_bytes()

    async def chat_page(request: Request) -> Response:
        return Response(html, 200, {"Cache-Control": "no-cache"}, media_type="text/html; charset=utf-8")

    return chat_page


def _warm_grammar(lm) -> None:
    from .grammar import GrammarError, llg_tokenizer

    try:
        llg_tokenizer(lm)
    except GrammarError:  # no llguidance: structured output answers a clear error instead
        pass


def make_app(lm, model_id: str | None = None, api_key: str | None = None, max_queue: int = 64,
             max_body_bytes: int = MAX_BODY_BYTES, batch_tokens: int | None = None,
             cache_tokens: int | None = None, lookup=None) -> Starlette:
    """The ASGI app serving `lm`. Its model thread starts and stops with the app's
    lifespan; `app.state.server` holds the Server (and `.worker`)."""
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    srv = Server(lm, model_id, api_key, max_queue, max_body_bytes, batch_tokens, cache_tokens, lookup)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.worker.start()
        # llguidance's view of the vocabulary takes ~0.3-0.5 s to build: build it now, beside
        # the first requests, so the first one with tools or a schema does not wait for it
        threading.Thread(target=_warm_grammar, args=(lm,), name="luthier-grammar-warmup", daemon=True).start()
        try:
            yield
        finally:
            await run_in_threadpool(srv.worker.stop)

    routes = []
    for path, fn, methods in (
        ("/", chat_page_endpoint(), ["GET"]),
        ("/health", srv.health, ["GET"]),
        ("/metrics", srv.metrics, ["GET"]),
        ("/v1/models", srv.models, ["GET"]),
        ("/v1/models/{model_id:path}", srv.models, ["GET"]),
        ("/v1/completions", srv.completions, ["POST"]),
        ("/v1/chat/completions", srv.chat, ["POST"]),
        ("/v1/embeddings", srv.embeddings, ["POST"]),
        ("/tokenize", srv.tokenize_endpoint, ["POST"]),
        ("/detokenize", srv.detokenize_endpoint, ["POST"]),
    ):
        routes.append(Route(path, _endpoint(fn), methods=methods))
        if path.startswith("/v1/"):  # llama.cpp's server also answers without /v1
            routes.append(Route(path[3:], _endpoint(fn), methods=methods))
    routes += ollama_routes(srv)  # Ollama's /api/... (server_ollama.py)
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _http_error})
    app.state.server = srv
    return app
