"""What the server test modules share: a BackgroundServer on an ephemeral loopback port
with a small model, the `openai` client on it, and helpers."""

import json
import time

import httpx
import openai

from luthier.engine import QuantConfig, load_model
from luthier.generate import generate
from luthier.sample import Sampler
from luthier.server import BackgroundServer

KEY = "test-key"
CTX = 512
PARALLEL = 4
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_server():
    lm = load_model(None, QuantConfig(bits=4, group_size=128), n_threads=1, ctx=CTX, n_seq=PARALLEL + 1)
    return BackgroundServer(lm, api_key=KEY, max_queue=32, batch_tokens=64)


def make_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(server, ids, max_tokens, **kw):
    """generate() on the model thread (the model is not thread-safe)."""
    return server.worker.call(lambda lm: generate(lm, ids, max_tokens=max_tokens,
                                                  sampler=Sampler(temperature=0.0), **kw))


def post(server, path, body, headers=AUTH, timeout=60):
    content = body if isinstance(body, (bytes, str)) or hasattr(body, "__next__") else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


def wait_idle(server, timeout=10.0):
    t0 = time.monotonic()
    while server.worker.busy or server.worker.queued:
        assert time.monotonic() - t0 < timeout, "the worker did not go idle"
        time.sleep(0.02)
