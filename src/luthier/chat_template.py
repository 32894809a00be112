"""Chat templates: render a model's Jinja chat template, sandboxed.

Chat templates come from model files, i.e. from strangers. Rendering one with a
plain ``jinja2.Environment`` is remote code execution (``{{ ''.__class__.__mro__
... }}``), so every template here is compiled by an ``ImmutableSandboxedEnvironment``
that also *raises* on unsafe attribute access instead of quietly rendering nothing.

The rendering context follows Hugging Face transformers' ``apply_chat_template`` so
that templates written for it work unchanged: ``messages``, ``add_generation_prompt``,
``bos_token``/``eos_token`` (and the other special tokens the caller passes),
``raise_exception``, ``strftime_now``, a ``tojson`` filter that does not HTML-escape,
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension and the
``{% generation %}`` tag.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

__all__ = [
    "CHATML_TEMPLATE",
    "GEMMA_TEMPLATE",
    "ChatTemplateError",
    "MAX_RENDERED_CHARS",
    "compile_chat_template",
    "render_chat_template",
]

# A rendered prompt longer than this is refused: a template is untrusted input, and
# nested loops could otherwise fill memory. 8 M characters is far above any context.
MAX_RENDERED_CHARS = 8_000_000

# The fallback when a model ships no template and its vocabulary has ChatML markers
# (or nothing better is known). Same text as transformers' old default ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3's published template, text-only parts. Gemma GGUFs are often converted
# without `tokenizer.chat_template`; ChatML would be the wrong turn format for them.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, raised on purpose
    (`raise_exception`), or tried something the sandbox forbids."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The stock sandbox turns an unsafe attribute into an `Undefined` that prints
    as "" and only fails when used further; a template probing for escapes should
    fail loudly at the first attempt, so raise right away. It also bounds `**` and
    sequence `*`, which the stock sandbox lets a template use to exhaust CPU/memory."""

    intercepted_binops = frozenset(["**", "*"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            # Bound the result's size (bits), not just the exponent: (2**4096)**4096
            # is as costly as 2**(2**24).
            if abs(left) > 1 and left.bit_length() * right > 65536:
                raise SecurityError(
                    f"a power of a {left.bit_length()}-bit base to exponent {right} "
                    "is too large for a chat template"
                )
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > MAX_RENDERED_CHARS:
                        raise SecurityError("sequence repetition is too large for a chat template")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:  # type: ignore[override]
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training
    masks in transformers; for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(f"chat template raised: {message}")


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson HTML-escapes `<>&'`, which would corrupt prompts; this is
    # the override transformers installs.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_env() -> _StrictSandbox:
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_env()
_TEMPLATE_FAILURES = (
    TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError
)  # fmt: skip


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text (templates are a few KB and
    compiling costs milliseconds, which matters per server request)."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(source).__name__}")
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    max_chars: int = MAX_RENDERED_CHARS,
    **context: Any,
) -> str:
    """Render `source` for `messages`. `context` carries bos_token, eos_token, tools,
    documents or any template-specific variable, as in transformers."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts")
    template = compile_chat_template(source)
    parts: list[str] = []
    size = 0
    try:
        # generate() yields chunks, so a runaway template is stopped near the cap
        # instead of after it has built the whole string.
        for chunk in template.generate(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        ):
            size += len(chunk)
            if size > max_chars:
                raise ChatTemplateError(
                    f"rendered chat template exceeds {max_chars} characters; refusing"
                )
            parts.append(chunk)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e
    except _TEMPLATE_FAILURES as e:
        # Errors raised inside the template (bad message shapes, bad arithmetic, runaway
        # recursion) are the template's failure, not the caller's bug: report them alike.
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
    return "".join(parts)
