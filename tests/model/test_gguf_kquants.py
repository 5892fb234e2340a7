"""GGUF K-quants (Q4_K, Q5_K, Q6_K) and Q5_0/Q5_1 load packed: blocks against the gguf package, tiny files end to end.

The gguf package dequantizes K-quants but cannot quantize to them, so the blocks here are built
directly: random bytes with finite fp16 scales (any such bytes are a valid block), or, for the model
files, codes and 6-bit sub-block scales chosen to give weights of a trained model's size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagellm.model.loader.gguf_loader import _k_scale_mins, decode_blocks, packed_scheme

QK = 256  # weights in a K-quant super-block


def _qtype(kind: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, kind)


def _random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """[rows, bytes] of random `kind` blocks whose fp16 fields (d, and dmin for Q4_K/Q5_K) are finite."""
    import gguf

    rng = np.random.default_rng(seed)
    per_block, nbytes = gguf.GGML_QUANT_SIZES[_qtype(kind)]
    b = rng.integers(0, 256, size=(rows, cols // per_block, nbytes), dtype=np.uint8)
    fp16_at = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [nbytes - 2]}[kind]
    for at in fp16_at:
        b[..., at:at + 2] = _fp16_bytes(rng.uniform(2e-4, 2e-3, b.shape[:2]))
    return b.reshape(rows, -1)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _dequantized(blocks: np.ndarray, kind: str) -> torch.Tensor:
    import gguf

    return torch.from_numpy(np.asarray(gguf.quants.dequantize(blocks, _qtype(kind)), dtype=np.float32))


def test_q4_k_decodes_exactly_like_the_gguf_package():
    blocks = _random_blocks("Q4_K", 48, 4 * QK)
    qw = decode_blocks(blocks, "Q4_K")
    assert qw.scheme == "int4" and qw.group_size == 32 and qw.qweight.dtype == torch.uint8
    assert qw.shape == (48, 4 * QK) and qw.scales.shape == qw.mins.shape == (48, 4 * QK // 32)
    assert int(qw.qweight.max()) <= 15
    reference = _dequantized(blocks, "Q4_K")
    # the same float32 products as ggml's: equal but for rounding (in practice bit for bit)
    torch.testing.assert_close(qw.dequantize(), reference, atol=1e-6 * float(reference.abs().max()), rtol=0)


def _pack_k_scale_mins(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[..., 8] six-bit scales and mins -> their 12 packed bytes (the inverse of _k_scale_mins)."""
    lo = np.concatenate([(sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6),
                         (m[..., :4] & 0x3F) | ((m[..., 4:] >> 4) << 6)], axis=-1)
    return np.concatenate([lo, (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], axis=-1).astype(np.uint8)


def test_k_scale_mins_unpack_six_bit_fields():
    rng = np.random.default_rng(1)
    sc, m = rng.integers(0, 64, (2, 5, 8), dtype=np.uint8)
    got_sc, got_m = _k_scale_mins(_pack_k_scale_mins(sc, m))
    assert np.array_equal(got_sc, sc) and np.array_equal(got_m, m)


@pytest.mark.parametrize("kind", ["Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_5_and_6_bit_types_requantize_to_int8_per_row(kind):
    import gguf

    if kind.endswith("_K"):
        blocks = _random_blocks(kind, 40, 2 * QK, seed=2)
    else:  # the gguf package quantizes these itself
        w = np.random.default_rng(2).normal(0, 0.05, (40, 2 * QK)).astype(np.float32)
        blocks = np.asarray(gguf.quants.quantize(w, _qtype(kind)), dtype=np.uint8)
    reference = _dequantized(blocks, kind)
    qw = decode_blocks(blocks, kind)
    assert qw.scheme == "int8" and qw.qweight.dtype == torch.int8 and qw.scales.shape == (40,)
    # the only loss: rounding to the row's int8 grid (scale = max|w| / 127)
    torch.testing.assert_close(qw.scales, reference.abs().amax(1) / 127)
    assert ((qw.dequantize() - reference).abs() <= qw.scales.unsqueeze(1) / 2 + 1e-7).all()


def test_requantizing_in_row_chunks_changes_nothing(monkeypatch):
    import pagellm.model.loader.gguf_loader as gguf_loader

    blocks = _random_blocks("Q6_K", 37, 2 * QK, seed=3)
    whole = decode_blocks(blocks, "Q6_K")
    monkeypatch.setattr(gguf_loader, "_REQUANT_CHUNK", 5 * 2 * QK)  # 5 rows a time, the last chunk 2
    chunked = decode_blocks(blocks, "Q6_K")
    assert torch.equal(chunked.qweight, whole.qweight) and torch.equal(chunked.scales, whole.scales)


@pytest.mark.parametrize(("types", "scheme"), [
    ({"Q4_1"}, "int4"), ({"Q4_0", "Q4_1"}, "int4"), ({"Q4_K", "Q6_K", "F32"}, "int4"),
    ({"Q4_K", "Q6_K", "Q5_0", "Q8_0"}, "int4"),  # Q4_K_M with llama.cpp's fallbacks for odd shapes
    ({"Q8_0"}, "int8"), ({"Q6_K"}, "int8"), ({"Q5_K", "Q6_K"}, "int8"), ({"Q5_1", "F32"}, "int8"),
    ({"Q4_K", "F16"}, None), ({"F16"}, None), ({"F32"}, None), (set(), None),
])
def test_auto_scheme_of_a_gguf_file_from_its_layer_types(types, scheme):
    assert packed_scheme(types) == scheme


# ---- tiny GGUF files, end to end ---------------------------------------------------------------

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 512, 4, 2, 512, 2
_SHAPES = {  # GGUF name -> (out, in)
    "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * 64, HIDDEN), "attn_v": (KV_HEADS * 64, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
    "ffn_down": (HIDDEN, INTER),
}
# llama.cpp's Q4_K_M: Q4_K, with the value and down projections (half the layers; all here) and the
# output matrix in Q6_K
Q4_K_M = {**dict.fromkeys(_SHAPES, "Q4_K"), "attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}


def _q4_k_matrix(rng, rows: int, cols: int) -> np.ndarray:
    """Q4_K blocks of weights ~ +-0.15: per sub-block a 6-bit scale and a min near -7.5 steps."""
    n = cols // QK
    d = rng.uniform(3e-4, 5e-4, (rows, n))
    sc = rng.integers(20, 64, (rows, n, 8))
    m = np.clip(np.round(sc * 7.5 / 8 + rng.normal(0, 2, sc.shape)), 0, 63)
    codes = rng.integers(0, 16, (rows, n, 4, 2, 32), dtype=np.uint8)  # run, low | high nibble, byte
    qs = codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)
    parts = [_fp16_bytes(d), _fp16_bytes(d * 8), _pack_k_scale_mins(sc.astype(np.uint8), m.astype(np.uint8)),
             qs.reshape(rows, n, -1)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _q6_k_matrix(rng, rows: int, cols: int) -> np.ndarray:
    """Q6_K blocks of weights ~ +-0.15: random 6-bit codes, 16 int8 sub-block scales, fp16 d."""
    n = cols // QK
    ql_qh = rng.integers(0, 256, (rows, n, QK // 2 + QK // 4), dtype=np.uint8)
    scales = rng.integers(16, 48, (rows, n, QK // 16)) * rng.choice([-1, 1], (rows, n, QK // 16))
    d = _fp16_bytes(rng.uniform(8e-5, 1.2e-4, (rows, n)))
    return np.concatenate([ql_qh, scales.astype(np.int8).view(np.uint8), d], axis=-1).reshape(rows, -1)


def _write_tiny_gguf(path, types: dict[str, str], seed: int = 0) -> str:
    """A 2-layer GQA llama GGUF whose matrices have the GGUF types `types` (GGUF layer name or "output")."""
    import gguf

    rng = np.random.default_rng(seed)
    makers = {"Q4_K": _q4_k_matrix, "Q6_K": _q6_k_matrix}
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_vocab_size, VOCAB), (w.add_embedding_length, HIDDEN), (w.add_block_count, LAYERS),
                       (w.add_feed_forward_length, INTER), (w.add_head_count, HEADS), (w.add_head_count_kv, KV_HEADS),
                       (w.add_rope_dimension_count, HIDDEN // HEADS), (w.add_context_length, 256),
                       (w.add_layer_norm_rms_eps, 1e-5)]:
        add(value)

    def matrix(name, kind, rows, cols):
        w.add_tensor(name, makers[kind](rng, rows, cols), raw_dtype=_qtype(kind))

    def norm(name):
        w.add_tensor(name, rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))

    w.add_tensor("token_embd.weight", rng.normal(0, 1, (VOCAB, HIDDEN)).astype(np.float32))
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for short, (rows, cols) in _SHAPES.items():
            matrix(f"blk.{i}.{short}.weight", types[short], rows, cols)
    norm("output_norm.weight")
    matrix("output.weight", types["output"], VOCAB, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def gguf_env(tmp_path, monkeypatch):
    """A fresh pagellm cache (the conversions are cached per file) and float activations for int4."""
    monkeypatch.setenv("PAGELLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PAGELLM_INT4_ACT", "float")  # compared with float references: the same weights
    return tmp_path


def _hidden_and_logits(model, n: int = 20):
    from pagellm.model.layers.attention import packed_causal_metadata

    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden = model(ids, torch.arange(n), None, packed_causal_metadata([n]))
        return hidden, model.compute_logits(hidden)


def _load(path, quantization):
    from pagellm.model.loader.model_loader import load_model
    from pagellm.model_source import resolve_model

    return load_model(resolve_model(path), torch.float32, quantization)


def _layer_linears(model):
    from pagellm.model.layers.quant import QuantizedLinear

    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(linears) == 4 * LAYERS + 1  # qkv, o, gate_up, down per layer; the LM head
    return linears


def _assert_within_float16_rounding(layer, ref):
    """An int4 layer's weight against the Q4_K float weight: round to nearest costs at most half a
    float16 ulp (2^-11 relative) on each scale (times a code <= 15) and min."""
    bound = (15 * layer.scales.float().abs() + layer.mins.float().abs()) * 2.0**-11 + 1e-7
    err = (layer.dequantize() - ref).abs().view(ref.shape[0], -1, 32)
    assert (err <= bound.unsqueeze(-1)).all() and err.max() > 0


def test_q4_k_layers_load_as_int4(gguf_env):
    """Q4_K layers are int4 groups of 32 as they are, with each group's scale and min (a float16 times
    a 6-bit integer) rounded to float16: the weights differ from the dequantized-float model's by that
    rounding alone; only the LM head (Q6_K) is requantized to int8."""
    path = _write_tiny_gguf(gguf_env / "q4k.gguf", {**dict.fromkeys(_SHAPES, "Q4_K"), "output": "Q6_K"})
    packed, float_model = _load(path, "int4"), _load(path, None)
    assert all(m.scheme == "int4" for n, m in _layer_linears(packed).items() if n != "lm_head")
    down = packed.layers[1].mlp.down_proj
    _assert_within_float16_rounding(down, float_model.layers[1].mlp.down_proj.weight)
    hidden, logits = _hidden_and_logits(packed)
    ref_hidden, ref_logits = _hidden_and_logits(float_model)
    assert (hidden - ref_hidden).norm() / ref_hidden.norm() < 5e-3  # the float16 rounding above (measured 0.18%)
    # logits: the LM head's int8 rounding (at most scale / 2 a weight) bounds the difference
    bound = hidden.abs().sum(-1, keepdim=True) * packed.lm_head.scales / 2 + 1e-3
    assert ((logits - ref_logits).abs() <= bound).all()
    assert packed.lm_head.scheme == "int8" and not torch.equal(logits, ref_logits)

    again, _ = _hidden_and_logits(_load(path, "int4"))  # from the packed cache this time
    assert torch.equal(again, hidden)


def test_q6_k_file_runs_int8_within_its_requantization(gguf_env):
    """An all-Q6_K file runs int8 by default; requantizing to one scale per row costs ~1% of the logits."""
    from pagellm.model.loader.model_loader import resolve_quantization
    from pagellm.model_source import resolve_model

    path = _write_tiny_gguf(gguf_env / "q6k.gguf", {**dict.fromkeys(_SHAPES, "Q6_K"), "output": "Q6_K"}, seed=1)
    assert resolve_quantization(resolve_model(path), "auto", "auto") == "int8"
    packed, float_model = _load(path, "int8"), _load(path, None)
    assert all(m.scheme == "int8" for m in _layer_linears(packed).values())
    w = float_model.layers[0].self_attn.o_proj.weight
    assert (packed.layers[0].self_attn.o_proj.dequantize() - w).abs().max() <= w.abs().max() / 254 + 1e-7
    _, logits = _hidden_and_logits(packed)
    _, ref_logits = _hidden_and_logits(float_model)
    assert (logits - ref_logits).abs().max() < 0.02 * ref_logits.abs().max()


def test_q4_k_m_file_runs_packed_by_default(gguf_env, tiny_llama_dir):
    """LLM(file.gguf) with the default quantization="auto": a Q4_K_M file runs packed, its Q4_K
    matrices as int4 and the projections holding a Q6_K matrix (attn_v in the fused qkv, ffn_down) as
    int8, close to the dequantized-float model, and generates."""
    from pagellm import LLM, SamplingParams

    path = _write_tiny_gguf(gguf_env / "q4km.gguf", Q4_K_M, seed=2)
    llm = LLM(path, tokenizer=tiny_llama_dir, num_blocks=32, block_size=4)
    model = llm.llm_engine.worker.model
    assert model.quantization == "int4"
    linears = _layer_linears(model)
    wide = ("lm_head", "qkv_proj", "down_proj")
    assert all(m.scheme == ("int8" if n.endswith(wide) else "int4") for n, m in linears.items())
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4

    # the same packed weights at float32 against the float load: Q4_K with float16 scales, Q6_K rounded to int8 rows
    packed, float_model = _load(path, "int4"), _load(path, None)
    _assert_within_float16_rounding(packed.layers[0].self_attn.o_proj, float_model.layers[0].self_attn.o_proj.weight)
    _, logits = _hidden_and_logits(packed)
    _, ref_logits = _hidden_and_logits(float_model)
    # NOTE: int8 rows keep Q6_K's levels to within max|w| / 254 (forced into int4 groups these random
    # blocks were ~11% off, rms); q and k (Q4_K) are requantized to int8 beside v
    rms = (logits - ref_logits).pow(2).mean().sqrt()
    assert 0 < rms < 0.03 * ref_logits.pow(2).mean().sqrt()  # 1.2% here
