"""Tokenizer built from GGUF metadata or a Hugging Face ``tokenizer.json``.

Encoding runs in the Hugging Face ``tokenizers`` library, set up to tokenize the way
llama.cpp does (llama-vocab.cpp):

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE with the file's merges, split first
  by the regexes llama.cpp uses for ``tokenizer.ggml.pre``.
- ``"llama"``: SentencePiece BPE. llama.cpp ignores merges and repeatedly merges the
  adjacent pair that forms the vocab token with the highest score: a BPE whose merges
  are every two-part split of every token, ranked by score; characters outside the
  vocab fall back to ``<0xNN>`` byte tokens; spaces become "▁".
- Control/unknown tokens are special added tokens, matched only with ``special=True``
  (llama.cpp's ``parse_special``); user-defined tokens are always split out.

Decoding maps every id to the exact bytes of llama.cpp's ``token_to_piece``, so a token
holding part of a UTF-8 character stays partial until the rest arrives.
"""

from __future__ import annotations

import codecs
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from .chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, render_chat_template

__all__ = ["StreamDetokenizer", "Tokenizer", "TokenType"]


from .tokenizer_vocab import (  # noqa: F401  (TokenType is public here too)
    TokenType,
    _EOG_TEXTS,
    _PRE_TOKENIZERS,
    _SPECIAL_TYPES,
    _add_vocab_specials,
    _byte_level_bpe,
    _byte_level_to_bytes,
    _byte_token_value,
    _is_int,
    _meta_array,
    _meta_scalar,
    _piece,
    _spm_bpe,
    _spm_to_bytes,
)


class Tokenizer:
    """Text <-> token ids, and chat templates. Build with `from_gguf_metadata` or
    `from_file`. `eos_ids` holds every id that ends generation (EOS, end of turn)."""

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        tokens: list[str],
        token_types: list[int],
        pieces: list[bytes],
        *,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: Iterable[int] = (),
        add_bos: bool = False,
        add_eos: bool = False,
        add_space_prefix: bool = False,
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        if (add_bos and bos_id is None) or (add_eos and eos_id is None):
            raise ValueError("the tokenizer should add a BOS/EOS token but has no id for it")
        self._hf = hf
        # `encode_special_tokens` is a switch on the shared HF object: the lock keeps
        # another thread from flipping it in the middle of an encode.
        self._lock = threading.Lock()
        self._tokens = tokens
        self._token_to_id = {t: i for i, t in enumerate(tokens) if t}
        self._types = token_types
        self._pieces = pieces
        # Control/unknown tokens render as "" when special tokens are skipped, as in
        # llama.cpp's token_to_piece(special=false).
        self._pieces_plain = [
            b"" if t in _SPECIAL_TYPES else p for p, t in zip(pieces, token_types)
        ]
        self.bos_id, self.eos_id = bos_id, eos_id
        n = len(tokens)
        self.eos_ids: frozenset[int] = frozenset(
            i for i in (eos_id, *eos_ids) if i is not None and 0 <= i < n
        )
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        self.chat_template = chat_template
        self._template_tokens = dict(template_tokens or {})

    def __repr__(self) -> str:
        ids = f"bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}"
        return f"Tokenizer(vocab_size={self.vocab_size}, {ids})"

    # ------------------------------------------------------------------ building

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (key -> python value), as llama.cpp reads it."""
        model = _meta_scalar(meta, "tokenizer.ggml.model", str)
        tokens = _meta_array(meta, "tokenizer.ggml.tokens", str)
        if model is None or not tokens:
            raise ValueError("GGUF metadata lacks tokenizer.ggml.model or tokenizer.ggml.tokens")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"unsupported tokenizer model {model!r} (supported: gpt2, llama)")
        n = len(tokens)
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp
        types = _meta_array(meta, "tokenizer.ggml.token_type", int, n) or [1] * n
        types = [t if 0 <= t <= 6 else TokenType.UNDEFINED for t in types]
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if vocab.setdefault(t, i) != i:
                raise ValueError(f"duplicate token {t!r} in vocabulary (ids {vocab[t]}, {i})")
        eog = {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
        for i in eog:
            types[i] = TokenType.CONTROL  # llama.cpp overrides their declared type

        def special_id(key: str, default: int | None) -> int | None:
            v = _meta_scalar(meta, f"tokenizer.ggml.{key}", int)
            return v if v is not None and 0 <= v < n else default  # bad id: keep default

        if model == "gpt2":
            pre = _meta_scalar(meta, "tokenizer.ggml.pre", str) or "default"
            if pre not in _PRE_TOKENIZERS:
                raise ValueError(f"unknown pre-tokenizer {pre!r}; known: {sorted(_PRE_TOKENIZERS)}")
            regexes, ignore_merges, add_bos = _PRE_TOKENIZERS[pre]
            merges = _meta_array(meta, "tokenizer.ggml.merges", str) or []
            hf = _byte_level_bpe(vocab, merges, regexes, ignore_merges)
            bos, eos, add_space_prefix = None, None, False
            pieces = [_piece(t, ty, _byte_level_to_bytes) for t, ty in zip(tokens, types)]
        else:
            bos, eos, add_bos = 1, 2, True  # llama.cpp's SPM defaults
            unk = special_id("unknown_token_id", 0)
            scores = _meta_array(meta, "tokenizer.ggml.scores", float, n) or [0.0] * n
            add_space_prefix = _meta_scalar(meta, "tokenizer.ggml.add_space_prefix", bool)
            add_space_prefix = True if add_space_prefix is None else add_space_prefix
            hf = _spm_bpe(vocab, scores, tokens[unk] if unk is not None else None, add_space_prefix)
            pieces = [_piece(t, ty, _spm_to_bytes) for t, ty in zip(tokens, types)]
        _add_vocab_specials(hf, tokens, types)
        add_bos_meta = _meta_scalar(meta, "tokenizer.ggml.add_bos_token", bool)
        return cls(
            hf,
            tokens,
            types,
            pieces,
            bos_id=special_id("bos_token_id", bos),
            eos_id=special_id("eos_token_id", eos),
            eos_ids=eog | {special_id(k, None) for k in ("eot_token_id", "eom_token_id")} - {None},
            add_bos=add_bos if add_bos_meta is None else add_bos_meta,
            add_eos=bool(_meta_scalar(meta, "tokenizer.ggml.add_eos_token", bool)),
            add_space_prefix=add_space_prefix,
            chat_template=_meta_scalar(meta, "tokenizer.chat_template", str),
        )

    @classmethod
    def from_file(
        cls,
        tokenizer_json_path: str | Path,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """Build from a Hugging Face tokenizer.json. A missing `tokenizer_config` or
        `generation_config` is read from the file of that name beside it, if any; a
        chat_template.jinja there serves when the config has no template."""
        path = Path(tokenizer_json_path)
        folder = path.parent

        def sibling(name: str) -> dict[str, Any]:
            f = folder / name
            return json.loads(f.read_text("utf-8")) if f.is_file() else {}

        config = sibling("tokenizer_config.json") if tokenizer_config is None else tokenizer_config
        gen = sibling("generation_config.json") if generation_config is None else generation_config
        spec = json.loads(path.read_text("utf-8"))
        hf = tokenizers.Tokenizer.from_str(json.dumps(spec))

        vocab = hf.get_vocab(with_added_tokens=True)
        n = hf.get_vocab_size(with_added_tokens=True)
        tokens = [""] * n
        for t, i in vocab.items():
            if 0 <= i < n:
                tokens[i] = t
        added = {i: a for i, a in hf.get_added_tokens_decoder().items() if 0 <= i < n}
        types = [
            (TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added
            else TokenType.BYTE if _byte_token_value(t) is not None
            else TokenType.NORMAL
            for i, t in enumerate(tokens)
        ]  # fmt: skip
        decoder_nodes = _json_nodes(spec.get("decoder"))
        decoder = {d.get("type") for d in decoder_nodes}
        if "ByteLevel" in decoder:
            pieces = [_piece(t, ty, _byte_level_to_bytes) for t, ty in zip(tokens, types)]
        elif decoder & {"Metaspace", "ByteFallback", "Replace"}:  # SentencePiece style
            pieces = [_piece(t, ty, _spm_to_bytes) for t, ty in zip(tokens, types)]
        else:  # e.g. WordPiece: let the library render each token
            pieces = [hf.decode([i], skip_special_tokens=False).encode("utf-8") for i in range(n)]

        def config_token(name: str) -> str | None:
            v = config.get(name)
            v = v.get("content") if isinstance(v, Mapping) else v
            return v if isinstance(v, str) else None

        bos = vocab.get(config_token("bos_token") or "")
        eos = vocab.get(config_token("eos_token") or "")
        # The post-processor may add BOS/EOS: ask it whether it does, then always
        # encode without it and add them ourselves.
        with_sp = hf.encode("a", add_special_tokens=True).ids
        without_sp = hf.encode("a", add_special_tokens=False).ids
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos is not None and with_sp[:1] == [bos] != without_sp[:1]
        if not isinstance(add_eos, bool):
            add_eos = eos is not None and with_sp[-1:] == [eos] != without_sp[-1:]
        gen_eos = gen.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        eog = {i for i, t in enumerate(tokens) if types[i] == TokenType.CONTROL and t in _EOG_TEXTS}

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text("utf-8")
        metaspace = [d for d in decoder_nodes if d.get("type") == "Metaspace"]
        return cls(
            hf,
            tokens,
            types,
            pieces,
            bos_id=bos,
            eos_id=eos,
            eos_ids=eog | {int(i) for i in gen_eos if _is_int(i)},
            add_bos=add_bos,
            add_eos=add_eos,
            # A Strip of the leading space, or a Metaspace decoder that prepends, is
            # how tokenizer.json spells add_space_prefix.
            add_space_prefix="Strip" in decoder or any(_prepends(d) for d in metaspace),
            chat_template=template if isinstance(template, str) else None,
            template_tokens={
                k: v
                for k in ("pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
                if (v := config_token(k)) is not None
            },
        )

    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json that
        `from_file` reads back as an equal tokenizer (e.g. an HF folder from a GGUF)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"add_bos_token": self.add_bos, "add_eos_token": self.add_eos}
        for name, tid in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if tid is not None:
                config[name] = self._tokens[tid]
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
        gen = {"eos_token_id": sorted(self.eos_ids)}
        (folder / "generation_config.json").write_text(json.dumps(gen))

    # ------------------------------------------------------------------ encoding

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        special: bool = True,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of `text`; `add_bos`/`add_eos` default to the model's flags.
        `special=True` turns control-token text like "<|im_start|>" into its id
        (llama.cpp's parse_special); False tokenizes it as plain text, which is what
        untrusted user content wants."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = []
        if add_bos or (add_bos is None and self.add_bos):
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids.append(self.bos_id)
        if text:
            with self._lock:
                self._hf.encode_special_tokens = not special
                ids += self._hf.encode(text, add_special_tokens=False).ids
        if add_eos or (add_eos is None and self.add_eos):
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    # ------------------------------------------------------------------ decoding

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = len(self._pieces)
        if len(ids) and (min(ids) < 0 or max(ids) >= n):
            bad = next(i for i in ids if not 0 <= i < n)
            raise ValueError(f"token id {bad} is outside the vocabulary (size {n})")

    def _piece_table(self, skip_special: bool) -> list[bytes]:
        return self._pieces_plain if skip_special else self._pieces

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        """The exact bytes the ids stand for (may end inside a UTF-8 character)."""
        ids = list(ids)
        self._check_ids(ids)
        # As llama.cpp's detokenize: with skip_special, drop the BOS/EOS that the
        # tokenizer itself adds.
        if skip_special and self.add_bos and ids[:1] == [self.bos_id]:
            ids = ids[1:]
        if skip_special and self.add_eos and ids[-1:] == [self.eos_id]:
            ids = ids[:-1]
        table = self._piece_table(skip_special)
        out = b"".join([table[i] for i in ids])
        # Drop the space encode() prepends (add_space_prefix) when the text starts
        # with it. llama.cpp keeps it after a dropped BOS; transformers and a clean
        # round trip do not.
        if self.add_space_prefix and ids and self._types[ids[0]] == TokenType.NORMAL:
            out = out[1:] if out.startswith(b" ") else out
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def token_to_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token renders to (llama.cpp's token_to_piece)."""
        self._check_ids([token_id])
        return self._piece_table(not special)[token_id]

    def token_to_piece(self, token_id: int, special: bool = True) -> str:
        """One token's text. A token holding part of a UTF-8 character gives U+FFFD:
        to print generated tokens use `stream()`."""
        return self.token_to_bytes(token_id, special).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry itself, e.g. "Ġthe", "▁the" or "<0x0A>"."""
        self._check_ids([token_id])
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def token_type(self, token_id: int) -> TokenType:
        self._check_ids([token_id])
        return TokenType(self._types[token_id])

    def stream(self, skip_special: bool = True) -> StreamDetokenizer:
        """A detokenizer for generated ids. It hides control tokens by default, as
        llama.cpp does when printing generated text."""
        return StreamDetokenizer(self, skip_special=skip_special)

    # ------------------------------------------------------------------ chat

    @property
    def default_chat_template(self) -> str:
        """For models without a template: Gemma's turn format when the vocabulary
        has its markers, else ChatML."""
        if "<start_of_turn>" in self._token_to_id and "<end_of_turn>" in self._token_to_id:
            return GEMMA_TEMPLATE
        return CHATML_TEMPLATE

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages with the model's template in a sandbox, like transformers'
        apply_chat_template(tokenize=False); kwargs reach the template (tools, ...)."""
        template = chat_template or self.chat_template or self.default_chat_template
        context: dict[str, Any] = dict(self._template_tokens)
        context["bos_token"] = self._tokens[self.bos_id] if self.bos_id is not None else ""
        context["eos_token"] = self._tokens[self.eos_id] if self.eos_id is not None else ""
        context.update(kwargs)
        return render_chat_template(template, messages, add_generation_prompt, **context)

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat with a single BOS: templates that print
        bos_token themselves (Gemma's) would otherwise get a second one."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        bos_text = self._tokens[self.bos_id] if self.bos_id is not None else None
        if self.add_bos and bos_text and text.startswith(bos_text):
            text = text[len(bos_text) :]
        return self.encode(text, add_bos=self.add_bos, special=True, add_eos=False)


def _prepends(metaspace: Mapping[str, Any]) -> bool:
    # Older tokenizer.json files spell prepend_scheme as add_prefix_space.
    legacy = "always" if metaspace.get("add_prefix_space", True) else "never"
    return metaspace.get("prepend_scheme", legacy) != "never"


def _json_nodes(node: Any) -> list[Mapping[str, Any]]:
    """Every mapping in a tokenizer.json component, depth first."""
    if isinstance(node, Mapping):
        return [node] + [m for v in node.values() for m in _json_nodes(v)]
    if isinstance(node, list):
        return [m for v in node for m in _json_nodes(v)]
    return []


class StreamDetokenizer:
    """Generated token ids to text, as they arrive. `feed` returns only complete
    UTF-8 characters: bytes of a character split across tokens wait for the rest.
    Bytes that can never form a character become U+FFFD as in `Tokenizer.decode`, so
    all `feed`s plus the final `flush` equal decode(ids) (without the leading-space
    strip: a stream continues a prompt)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._pieces = tokenizer._piece_table(skip_special)
        # Python's incremental UTF-8 decoder holds an incomplete trailing sequence and
        # replaces invalid bytes exactly as a one-shot decode does.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the vocabulary")
        return self._decoder.decode(self._pieces[token_id])

    def flush(self) -> str:
        """End of stream: an incomplete character still held back comes out as U+FFFD."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out
