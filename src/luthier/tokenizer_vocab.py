"""How a GGUF vocabulary becomes a `tokenizers.Tokenizer`: token types, llama.cpp's
pre-tokenizer regexes, byte-level and SentencePiece pieces, typed metadata access.
Split from tokenizer.py, which holds the Tokenizer class and streaming detokenization."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers


class TokenType(IntEnum):
    """Values of GGUF ``tokenizer.ggml.token_type`` (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN)

# Pre-tokenizer regexes from llama.cpp's llm_tokenizer_bpe. Each is applied in turn to
# the pieces of the previous one; text between matches stays a piece of its own.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGITS_GPT2 = (r"\p{N}", _GPT2)  # digits one by one, then GPT-2's split
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# name -> (regexes, ignore_merges, add_bos default), with llama.cpp's names.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
for _names, _spec in (
    ("default", (_DEFAULT, False, False)),
    ("gpt2 gpt-2 phi-2 mpt olmo jais exaone4", ((_GPT2,), False, False)),
    ("smollm starcoder refact command-r codeshell exaone minerva-7b", (_DIGITS_GPT2, False, False)),
    ("llama3 llama-v3 llama-bpe falcon3 pixtral", ((_LLAMA3,), True, True)),
    ("dbrx smaug-bpe", ((_LLAMA3,), False, False)),
    ("qwen2 deepseek-r1-qwen stablelm2 megrez", ((_QWEN2,), False, False)),
):
    _PRE_TOKENIZERS.update(dict.fromkeys(_names.split(), _spec))

# Token texts llama.cpp makes end-of-generation (and control) whatever their declared
# type ("special_eog_ids"); FIM pad/repo/file-separator markers are included as well.
_EOG_TEXTS = frozenset(
    "<|eot_id|> <|im_end|> <|end|> <end_of_turn> <|endoftext|> <|eom_id|> <EOT> _<EOT> "
    "<|end_of_text|> <end_of_utterance> <eos> <|fim_pad|> <fim-pad> <fim_pad> <PAD> "
    "<|fim_repo|> <|repo_name|> <fim-repo> <REPO> <reponame> <|file_sep|>".split()
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table of byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    rest = [b for b in range(256) if b not in bs]
    return {b: chr(c) for b, c in zip(bs + rest, bs + [256 + k for k in range(len(rest))])}


_BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_to_bytes(token: str) -> bytes:
    # A character outside the table cannot come from byte-level encoding; keep its
    # UTF-8 rather than fail (llama.cpp would print an "[UNK_BYTE_...]" marker).
    return b"".join(
        bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode("utf-8") for c in token
    )


def _byte_token_value(token: str) -> int | None:
    """The byte of an SPM byte-fallback token "<0xNN>", else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _piece(token: str, ttype: int, normal_to_bytes: Callable[[str], bytes]) -> bytes:
    """What llama.cpp's token_to_piece(special=true) renders for one token."""
    if ttype == TokenType.NORMAL:
        return normal_to_bytes(token)
    if ttype in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
        return token.encode("utf-8")
    if ttype == TokenType.BYTE and (b := _byte_token_value(token)) is not None:
        return bytes([b])
    return b""  # unused / undefined render as nothing


def _spm_to_bytes(token: str) -> bytes:
    return token.replace("▁", " ").encode("utf-8")


# --- metadata readers: GGUF values are untrusted, check each type before use ---


def _is_int(v: Any) -> bool:
    try:
        return not isinstance(v, bool) and operator.index(v) is not None
    except TypeError:
        return False


_ELEMENT_OK = {
    str: lambda x: isinstance(x, str),
    int: _is_int,
    float: lambda x: _is_int(x) or isinstance(x, float),
}


def _meta_array(meta: Mapping[str, Any], key: str, kind: type, n: int | None = None) -> Any:
    """A checked array value (list of `kind`), truncated to `n` entries; None if absent."""
    v = meta.get(key)
    if v is None:
        return None
    dt = getattr(v, "dtype", None)
    # a numeric numpy array (the GGUF loader's): its dtype is the check, not 262144 calls
    by_dtype = dt is not None and getattr(v, "ndim", 0) == 1 and dt.kind in {int: "iu", float: "iuf"}.get(kind, "")
    if not by_dtype and hasattr(v, "tolist") and not isinstance(v, (list, tuple)):
        v = v.tolist()  # other numpy arrays: checked element by element
    if not by_dtype and not isinstance(v, (list, tuple)):
        raise ValueError(f"GGUF key {key!r} must be an array, got {type(v).__name__}")
    if n is not None and len(v) < n:  # llama.cpp rejects short arrays too
        raise ValueError(f"GGUF key {key!r} has {len(v)} entries for {n} tokens")
    v = v[:n] if n is not None else v
    if by_dtype:
        return (v.astype("f8") if kind is float else v).tolist()
    if not all(map(_ELEMENT_OK[kind], v)):
        raise ValueError(f"GGUF key {key!r} must be an array of {kind.__name__}")
    return [kind(x) for x in v]


def _meta_scalar(meta: Mapping[str, Any], key: str, kind: type) -> Any:
    v = meta.get(key)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()  # numpy scalar
    ok = (
        v is None
        or (kind is bool and (isinstance(v, bool) or (_is_int(v) and int(v) in (0, 1))))
        or (kind is int and _is_int(v))
        or (kind is str and isinstance(v, str))
    )
    if not ok:
        raise ValueError(f"GGUF key {key!r} must be a {kind.__name__}, got {v!r:.40}")
    return v if v is None else kind(v)


# --- building the tokenizers.Tokenizer ---


def _spm_merges(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of every token into two vocab tokens, best merged score first.

    llama.cpp's SPM merges the adjacent pair whose concatenation scores highest
    (ties: leftmost); BPE ranks ordered by merged score make the same choices. Merges
    of *different* tokens with equal scores are ordered by token id here, where
    llama.cpp would take the leftmost; real vocabularies give normal tokens distinct
    scores.
    """
    # Every split of every token is sliced: bound the work a hostile vocabulary (one
    # huge token) can demand; real ones cost ~1e7 (Gemma 3: 262k tokens, <= 31 chars).
    if sum(len(t) ** 2 for t in vocab) > 1_000_000_000:
        raise ValueError("vocabulary tokens are too long to derive SentencePiece merges")
    merges = [
        (-scores[tid], tid, -k, token[:k], token[k:])
        for token, tid in vocab.items()
        for k in range(1, len(token))
        if token[:k] in vocab and token[k:] in vocab
    ]
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def _byte_level_bpe(
    vocab: dict[str, int], merge_lines: list[str], regexes: Sequence[str], ignore_merges: bool
) -> tokenizers.Tokenizer:
    merges = []
    for m in merge_lines:
        pos = m.find(" ", 1)  # from 1, as llama.cpp: the left part may itself be " "
        a, b = m[:pos], m[pos + 1 :]
        # tokenizers refuses merges outside the vocab; llama.cpp can never emit their
        # result as one token either.
        if pos > 0 and a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def _spm_bpe(
    vocab: dict[str, int], scores: Sequence[float], unk: str | None, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    merges = _spm_merges(vocab, scores)
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token=unk))
    norm: list[Any] = [normalizers.Replace(" ", "▁")]
    dec: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        # Normalizers run on each fragment between added tokens, which is where
        # llama.cpp prepends its space ("prefix with space if previous is special").
        norm.insert(0, normalizers.Prepend("▁"))
        dec.append(decoders.Strip(" ", 1, 0))
    hf.normalizer = normalizers.Sequence(norm)
    hf.decoder = decoders.Sequence(dec)
    return hf


def _add_vocab_specials(hf: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain
    added tokens; normalized=False because llama.cpp finds them in the raw text."""
    for special, kinds in ((True, _SPECIAL_TYPES), (False, (TokenType.USER_DEFINED,))):
        added = [
            AddedToken(t, special=special, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in kinds
        ]
        (hf.add_special_tokens if special else hf.add_tokens)(added)
