"""Tool (function) calling, as the OpenAI chat API spells it: `tools`, `tool_choice`,
`parallel_tool_calls` in; `message.tool_calls` and finish_reason "tool_calls" out.

The model writes calls in the Hermes convention that Qwen 2.5/3, Hermes and SmolLM3
were trained on, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

How the tools reach the prompt depends on the chat template:
- a template that reads `tools` (a tool-aware one) gets them as transformers passes
  them, and the conversation's calls with their arguments as objects (as vLLM and
  llama.cpp hand them to templates);
- any other template (SmolLM2's, Gemma 3's) gets a system message describing the tools
  and the convention above; earlier calls are written back as such blocks and tool
  results become a user turn of <tool_response> blocks (Gemma's template allows only
  user/assistant turns).

tool_choice "required" or a named function constrains the output with a grammar
(grammar.py, llguidance): one or more blocks whose JSON is a call of a listed function
with arguments matching its parameters' schema. "auto" (the default) leaves the model
free until it writes "<tool_call>" (a lazy grammar, as llama.cpp's trigger words): what
follows must then be such a call. Its output is parsed: blocks that do not parse (cut
by max_tokens), or come with response_format's own grammar, are returned as content, as
vLLM's Hermes parser does. "none" shows no tools and parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .grammar import JSON_OPTIONS, GrammarError, LazyGrammar, _llg, closed_objects, validated

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function name rule (plus '.')
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)

SYSTEM_PROMPT = (
    "You can call functions to help answer. Their signatures are within <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object of its name and arguments within "
    "<tool_call></tool_call> tags, one block per call:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments object>}}\n</tool_call>\n"
    "Each result comes back within <tool_response></tool_response> tags."
)


@dataclass
class ToolSpec:
    """A request's tools, checked. choice: "auto", "required", "none", or the name of the
    function the model must call."""

    tools: list[dict]  # [{"type": "function", "function": {"name", "description"?, "parameters"}}]
    choice: str = "auto"
    parallel: bool = True
    constrained: bool = False  # set by constraint(): the calls run under this spec's grammar

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")

    def _body(self) -> str:
        """The Lark rule `body`: the JSON of one call of a function `choice` allows."""
        fns = [t["function"] for t in self.tools
               if self.choice in ("auto", "required") or t["function"]["name"] == self.choice]
        alts = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                 "properties": {"name": {"const": f["name"]}, "arguments": closed_objects(f["parameters"])}}
                for f in fns]
        schema = dict(alts[0]) if len(alts) == 1 else {"anyOf": alts}
        schema["x-guidance"] = JSON_OPTIONS
        return f"body: %json {json.dumps(schema)}\n"

    def grammar(self) -> str:
        """The llguidance grammar of the calls `choice` allows (required or named)."""
        # no separator between calls: after "</tool_call>" a model trained on turn
        # markers ends its turn, where a newline invited it to call again (and again)
        more = "+" if self.parallel and self.choice == "required" else ""
        lark = (f"start: call{more}\n"
                f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n' + self._body())
        return validated(_llg().LLMatcher.grammar_from_lark(lark), "tools", "the tools' parameter schemas")

    def lazy_grammar(self) -> str:
        """tool_choice "auto": the model writes freely until it writes the opening tag;
        from there on what follows must be a call of a listed function (then more calls,
        if parallel, or the end). llama.cpp's lazy grammars do this with trigger words;
        here one llguidance grammar: the free text is either the whole answer (PROSE) or a
        lexeme that ends where the model writes the tag (`stop`)."""
        more = f' ("{OPEN}" call)*' if self.parallel else ""
        lark = (f"start: PROSE | prose call{more}\n"
                "PROSE: /(.|\\n)*/\n"
                f'prose[stop="{OPEN}"]: /(.|\\n)*/\n'
                f'call: "\\n" body "\\n{CLOSE}"\n' + self._body())
        return LazyGrammar(validated(_llg().LLMatcher.grammar_from_lark(lark), "tools",
                                     "the tools' parameter schemas"), OPEN)

    def constraint(self, grammar: str | None) -> str | None:
        """The grammar a request runs under: the calls' grammar when the choice forces a
        call (it cannot be combined with another constraint); with "auto" and no other
        constraint, the lazy grammar (free text, or well-formed calls once one starts);
        else `grammar` as it was."""
        if not self.forced:
            if self.choice == "auto" and grammar is None:
                self.constrained = True
                return self.lazy_grammar()
            return grammar
        if grammar is not None:
            raise GrammarError("tool_choice", f"tool_choice {self.choice!r} constrains the output itself; "
                                              "it cannot be combined with response_format or a grammar")
        self.constrained = True
        return self.grammar()


def _check_tool(t: Any, i: int) -> dict:
    p = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise GrammarError(p, f"'{p}' must be {{\"type\": \"function\", \"function\": {{...}}}}")
    f = t["function"]
    name = f.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise GrammarError(f"{p}.function.name", f"'{p}.function.name' must be 1-64 letters, digits, "
                                                 "'_', '-' or '.'")
    desc = f.get("description")
    if desc is not None and not isinstance(desc, str):
        raise GrammarError(f"{p}.function.description", "a function's description must be a string")
    params = f.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise GrammarError(f"{p}.function.parameters", "a function's parameters must be a JSON schema object")
    out = {"name": name, "parameters": params}
    if desc is not None:
        out["description"] = desc
    return {"type": "function", "function": out}


def from_request(body: dict) -> ToolSpec | None:
    """The tools a chat request offers, or None. Raises GrammarError naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise GrammarError("functions", "'functions' / 'function_call' (deprecated by OpenAI) "
                                        "are not supported; send 'tools' / 'tool_choice'")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise GrammarError("tool_choice", "'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise GrammarError("tools", f"'tools' must be an array of at most {MAX_TOOLS} functions")
    checked = [_check_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise GrammarError("tools", f"two tools are named {dup!r}")
    if choice is None or choice in ("auto", "none", "required"):
        choice = choice or "auto"
    elif (isinstance(choice, dict) and choice.get("type") == "function"
          and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)):
        choice = choice["function"]["name"]
        if choice not in names:
            raise GrammarError("tool_choice", f"'tool_choice' names {choice[:64]!r}, which is not in 'tools'")
    else:
        raise GrammarError("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                          "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise GrammarError("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
    return ToolSpec(checked, choice, parallel)


def check_tool_calls(calls: Any, param: str) -> list[dict]:
    """An assistant message's earlier `tool_calls`, checked and normalized (arguments
    kept as the JSON text the API carries)."""
    if not isinstance(calls, list):
        raise GrammarError(param, f"'{param}' must be an array")
    out = []
    for i, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise GrammarError(f"{param}[{i}]", f"'{param}[{i}]' must be {{\"type\": \"function\", "
                                                "\"function\": {\"name\", \"arguments\"}}")
        args = f.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise GrammarError(f"{param}[{i}]", "a call's arguments must be a JSON string")
        call = {"type": "function", "function": {"name": f["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


# ---------------------------------------------------------------------- the prompt


def _arguments(s: Any) -> Any:
    """A call's arguments as templates want them: the object, not its JSON text."""
    if isinstance(s, str):
        try:
            return json.loads(s)
        except ValueError:
            return s
    return s


def _block(call: dict) -> str:
    f = call["function"]
    body = json.dumps({"name": f["name"], "arguments": _arguments(f.get("arguments", {}))}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def template_reads_tools(tok) -> bool:
    src = tok.chat_template or tok.default_chat_template
    return isinstance(src, str) and "tools" in src


def prepare(tok, messages: list[dict], spec: ToolSpec | None) -> tuple[list[dict], dict]:
    """Messages and extra template variables for rendering a conversation with tools.
    Without tools and tool turns, the messages are returned as they are."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of objects")
    offered = spec is not None and spec.choice != "none"
    has_turns = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if not offered and not has_turns:
        return messages, {}
    if template_reads_tools(tok):
        out = []
        for m in messages:
            if m.get("tool_calls"):
                m = dict(m, tool_calls=[{"id": c.get("id"), "type": "function",
                                         "function": {"name": c["function"]["name"],
                                                      "arguments": _arguments(c["function"].get("arguments"))}}
                                        for c in m["tool_calls"]])
            out.append(m)
        return out, ({"tools": spec.tools} if offered else {})
    out: list[dict] = []
    for m in messages:
        if m.get("role") == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):  # results of one turn's calls: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif m.get("tool_calls"):
            blocks = "\n".join(_block(c) for c in m["tool_calls"])
            text = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_results", None)
    if offered:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in spec.tools)
        system = SYSTEM_PROMPT.format(tools=listing)
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{system}")
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, {}


def encode(tok, messages: list[dict], spec: ToolSpec | None) -> list[int]:
    """Token ids of a conversation that may offer tools or carry tool turns."""
    msgs, extra = prepare(tok, messages, spec)
    return tok.encode_chat(msgs, **extra)


# ---------------------------------------------------------------------- the output


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse(text: str, spec: ToolSpec | None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer. Calls come from <tool_call> blocks
    (the last may lack its closing tag); the text before the first block is the content.
    If any block fails to parse or names an unknown function, the whole text is content."""
    start = text.find(OPEN) if spec is not None and spec.choice != "none" else -1
    if start < 0:
        return text, []
    calls = []
    for m in _CALL.finditer(text, start):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return text, []
        if not isinstance(obj, dict):
            return text, []
        args = obj.get("arguments", obj.get("parameters", {}))
        if obj.get("name") not in spec.names or not isinstance(args, dict):
            return text, []
        calls.append({"id": new_call_id(), "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return (text[:start].strip() or None), calls


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')  # a call's JSON up to its arguments


class ToolStream:
    """Streams an answer's content while holding back its tool calls: `feed` returns the
    text that is surely content (a tail that may begin "<tool_call>" waits), `finish`
    returns (the rest of the content, the calls).

    `deltas` gives the same as OpenAI chunk deltas. When the spec's grammar checks the
    calls as they are written (spec.constrained: forced or auto), each call streams as it
    comes, as OpenAI streams them: a first delta with its index, id and name once the name
    is written, then pieces of its arguments' JSON. Otherwise the calls wait for the end
    (`final_deltas`), when they can still be parsed or given back as content."""

    def __init__(self, spec: ToolSpec | None):
        self.spec = spec
        self.held = ""  # a tail that is a prefix of OPEN
        self.calls: str | None = None  # the text from the first OPEN on
        self.live = spec is not None and spec.constrained  # never for "none" (no grammar)
        # live scan of self.calls: position, calls begun, their phase ("head": before the
        # arguments, "args": in them, "tail": after them) and the JSON scanner's state
        self.pos, self.begun, self.phase = 0, 0, "tail"
        self.depth, self.in_str, self.esc = 0, False, False

    def feed(self, text: str) -> str:
        if self.spec is None or self.spec.choice == "none":
            return text
        if self.calls is not None:
            self.calls += text
            return ""
        s = self.held + text
        i = s.find(OPEN)
        if i >= 0:
            self.held, self.calls = "", s[i:]
            return s[:i]
        k = next((k for k in range(min(len(OPEN) - 1, len(s)), 0, -1) if s.endswith(OPEN[:k])), 0)
        self.held = s[len(s) - k:]
        return s[: len(s) - k]

    def deltas(self, text: str) -> list[dict]:
        """feed(text) as chunk deltas: its content, then (live) the calls' progress."""
        content = self.feed(text)
        out = [{"content": content}] if content else []
        return out + self._scan() if self.live and self.calls is not None else out

    def _scan(self) -> list[dict]:
        """Deltas for what self.calls gained since the last scan (live mode)."""
        out, c = [], self.calls
        while True:
            if self.phase == "tail":  # wait for the next call's tag
                i = c.find(OPEN, self.pos)
                if i < 0:
                    return out
                self.pos, self.phase = i + len(OPEN), "head"
            if self.phase == "head":  # wait for the name; then the first delta of the call
                m = _HEAD.match(c, self.pos)
                if m is None:
                    return out
                self.pos, self.phase = m.end(), "args"
                self.depth, self.in_str, self.esc = 0, False, False
                out.append({"tool_calls": [{"index": self.begun, "id": new_call_id(), "type": "function",
                                            "function": {"name": m.group(1), "arguments": ""}}]})
                self.begun += 1
            start = self.pos  # phase "args": the arguments' JSON up to its closing bracket
            while self.pos < len(c) and self.phase == "args":
                ch = c[self.pos]
                self.pos += 1
                if self.in_str:
                    self.esc, self.in_str = (False, True) if self.esc else (ch == "\\", ch != '"')
                elif ch == '"':
                    self.in_str = True
                elif ch in "{[":
                    self.depth += 1
                elif ch in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        self.phase = "tail"
            if self.pos > start:
                out.append({"tool_calls": [{"index": self.begun - 1, "function": {"arguments": c[start:self.pos]}}]})
            if self.phase == "args":
                return out

    def finish(self) -> tuple[str, list[dict]]:
        if self.calls is None:
            out, self.held = self.held, ""
            return out, []
        _, calls = parse(self.calls, self.spec)
        return ("", calls) if calls else (self.calls, [])

    def final_deltas(self, finish_reason: str) -> tuple[list[dict], str]:
        """The OpenAI chunk deltas that end a streamed choice and its finish reason: the
        rest of the content, then one `tool_calls` delta per call not streamed yet;
        "tool_calls" if the answer's calls are all complete."""
        out = self._scan() if self.live and self.calls is not None else []
        if self.begun:  # streamed as they came; complete unless cut inside the arguments
            return out, "tool_calls" if self.phase == "tail" else finish_reason
        rest, calls = self.finish()
        deltas = [{"content": rest}] if rest else []
        deltas += [{"tool_calls": [dict(c, index=k)]} for k, c in enumerate(calls)]
        return deltas, "tool_calls" if calls else finish_reason
