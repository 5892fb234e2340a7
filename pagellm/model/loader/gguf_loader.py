"""GGUF files: config from metadata, tensors dequantized with the gguf package or packed from their blocks, HF names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pagellm.errors import InvalidRequest
from pagellm.model.layers.quant import QuantizedWeight, quantize_int8
from pagellm.model.loader.decoder_config import DecoderConfig

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_QUANTS = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
# Linear weights of these types load packed (packed_weights): the 4-bit ones exactly as int4 groups of 32,
# the others requantized to int8 per row, one matrix at a time
INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K"}
INT8_TYPES = {"Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}
PACKED_TYPES = INT4_TYPES | INT8_TYPES

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (blk.3.attn_q.weight) to its HF name (model.layers.3.self_attn.q_proj.weight)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise InvalidRequest(f"unknown GGUF tensor {gguf_name!r}", param="model")


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> rotate-half halves)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (
        weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


class GGUFCheckpoint:
    """An opened GGUF file: its config (HF names and defaults) and its tensors."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # a truncated or foreign file
            raise InvalidRequest(f"cannot read GGUF file {self.path}: {exc}", param="model") from exc
        self.arch = str(_field(self.reader, "general.architecture", ""))
        if self.arch not in SUPPORTED_ARCHS:
            raise InvalidRequest(
                f"unsupported GGUF architecture {self.arch!r}; supported: {sorted(SUPPORTED_ARCHS)}",
                param="model",
            )
        for t in self.reader.tensors:
            if t.tensor_type.name not in SUPPORTED_QUANTS:
                raise InvalidRequest(
                    f"GGUF tensor {t.name} has unsupported type {t.tensor_type.name}; "
                    f"supported: {sorted(SUPPORTED_QUANTS)}",
                    param="model",
                )
        self.config = self._build_config()

    def _build_config(self) -> DecoderConfig:
        r, a = self.reader, self.arch
        names = {t.name for t in r.tensors}
        tokens = r.fields.get("tokenizer.ggml.tokens")
        vocab = _field(r, f"{a}.vocab_size") or (len(tokens.data) if tokens is not None else None)
        num_heads = int(_field(r, f"{a}.attention.head_count"))
        hidden = int(_field(r, f"{a}.embedding_length"))
        head_dim = int(_field(r, f"{a}.rope.dimension_count", hidden // num_heads))
        rope: dict = {"rope_type": "default", "rope_theta": float(_field(r, f"{a}.rope.freq_base", 10000.0))}
        scaling_type = _field(r, f"{a}.rope.scaling.type")
        if scaling_type == "linear":
            rope.update(rope_type="linear", factor=float(_field(r, f"{a}.rope.scaling.factor")))
        return DecoderConfig.from_dict(dict(
            architectures=[SUPPORTED_ARCHS[a]],
            model_type=a,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(_field(r, f"{a}.feed_forward_length")),
            num_hidden_layers=int(_field(r, f"{a}.block_count")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(_field(r, f"{a}.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            max_position_embeddings=int(_field(r, f"{a}.context_length", 2048)),
            rms_norm_eps=float(_field(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_parameters=rope,
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
        ))

    def _permuted_heads(self, name: str) -> int | None:
        """The head count to undo llama.cpp's q/k row permutation with, for a llama q/k weight; else None."""
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        return self.config.num_attention_heads if "q_proj" in name else self.config.num_key_value_heads

    def linear_quant_types(self) -> set[str]:
        """The GGUF types of the decoder layers' 2-D weights (e.g. {"Q4_1"})."""
        return {t.tensor_type.name for t in self.reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}

    def packed_weights(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Like weights(), but the matrices of PACKED_TYPES come as QuantizedWeight, read from their
        blocks one matrix at a time, without a float copy of the model (see decode_blocks)."""
        for t in self.reader.tensors:
            if not _packable(t):
                continue
            name = hf_tensor_name(t.name)
            blocks = np.asarray(t.data, dtype=np.uint8).reshape(int(t.shape[1]), -1)
            qw = decode_blocks(blocks, t.tensor_type.name)
            heads = self._permuted_heads(name)
            if heads:
                qw = unpermute_qk_rows(qw, heads)
            yield name, qw
        packed = {t.name for t in self.reader.tensors if _packable(t)}
        yield from self.weights(skip=packed)

    def weights(self, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, float32 tensor) for every tensor, dequantized, q/k un-permuted for llama."""
        import gguf

        for t in self.reader.tensors:
            if t.name in skip:
                continue
            name = hf_tensor_name(t.name)
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            data = np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
            heads = self._permuted_heads(name)
            if heads:
                data = unpermute_qk(data, heads)
            yield name, torch.from_numpy(np.array(data, dtype=np.float32, copy=True))


def packed_scheme(types: set[str]) -> str | None:
    """The scheme a GGUF file whose layer weights have these types runs with under quantization "auto":
    int4 where any is a 4-bit type (a Q4_K_M file is Q4_K with some Q6_K: the 4-bit file it was meant to
    be), int8 where all are 5- to 8-bit types, None (float) where any has no packed form (F16...)."""
    types = set(types) - {"F32"}
    if not types or not types <= PACKED_TYPES:
        return None
    return "int4" if types & INT4_TYPES else "int8"


def _packable(t) -> bool:
    """A quantized matrix of a Linear (the token embedding is looked up by row: it loads as float)."""
    return t.tensor_type.name in PACKED_TYPES and len(t.shape) == 2 and t.name != "token_embd.weight"


_BLOCK = 32
_SUPER = 256  # a K-quant super-block: 8 sub-blocks of 32
_Q4_K_BYTES = 2 + 2 + 12 + _SUPER // 2
_REQUANT_CHUNK = 1 << 22  # weights dequantized at a time when requantizing to int8 (16 MiB of float32)


def decode_blocks(blocks: np.ndarray, kind: str) -> QuantizedWeight:
    """[rows, bytes] of GGUF blocks -> QuantizedWeight.

    Exact (int4, groups of 32, w = q * scale + min):
      Q4_0 block: fp16 d, 16 bytes of nibbles, w = d * (q - 8). Q4_1: fp16 d, fp16 m, nibbles,
      w = d * q + m. In a block, byte j holds weight j (low nibble) and weight j + 16 (high).
      Both are the int4 form with min = -8d or m.
      Q4_K: see _decode_q4_k.
    Requantized to int8 with one scale per row (torch's int8 kernel and pagellm's take no per-block
    scales): Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, dequantized with the gguf package a few rows at a time.
    """
    if kind == "Q4_K":
        return _decode_q4_k(blocks)
    if kind in INT8_TYPES:
        return _requantize_int8(blocks, kind)
    rows = blocks.shape[0]
    head = 4 if kind == "Q4_1" else 2
    b = blocks.reshape(rows, -1, head + _BLOCK // 2)
    halves = b[..., :head].copy().view(np.float16).astype(np.float32)  # [rows, nblk, 1 or 2]
    d = torch.from_numpy(halves[..., 0])
    mins = torch.from_numpy(halves[..., 1]) if kind == "Q4_1" else -8 * d
    nib = torch.from_numpy(b[..., head:].copy())  # [rows, nblk, 16]
    q = torch.cat([nib & 0xF, nib >> 4], dim=-1).view(rows, -1)
    return QuantizedWeight("int4", q, d, mins, _BLOCK)


def _decode_q4_k(blocks: np.ndarray) -> QuantizedWeight:
    """Q4_K super-blocks of 256 weights -> int4 groups of 32, exactly.

    A super-block: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales sc and mins m (8 each), then
    128 bytes of codes in 4 runs of 32 bytes: run r holds sub-block 2r in its low nibbles and sub-block
    2r + 1 in its high ones (weight j of each at byte j). Sub-block j is w = d * sc_j * q - dmin * m_j:
    int4 with scale d * sc_j and min -dmin * m_j (float32 products, as ggml computes them).
    """
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, _Q4_K_BYTES)
    halves = b[..., :4].copy().view(np.float16).astype(np.float32)  # [rows, nsuper, 2]: d, dmin
    sc, m = _k_scale_mins(b[..., 4:16])  # [rows, nsuper, 8]
    runs = b[..., 16:].reshape(rows, -1, 4, 1, 32)
    codes = np.concatenate([runs & 0xF, runs >> 4], axis=3)  # [rows, nsuper, run, low | high, 32]
    scales = halves[..., :1] * sc.astype(np.float32)
    mins = -(halves[..., 1:] * m.astype(np.float32))
    return QuantizedWeight("int4", torch.from_numpy(codes.reshape(rows, -1)),
                           torch.from_numpy(scales.reshape(rows, -1)), torch.from_numpy(mins.reshape(rows, -1)),
                           _BLOCK)


def _k_scale_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and 8 six-bit mins of K-quant super-blocks from their 12 bytes [..., 12].

    Bytes 0-3: scales 0-3 in the low 6 bits, the top 2 bits of scales 4-7 above them. Bytes 4-7: the
    same for the mins. Bytes 8-11: the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    lo_sc, lo_m, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (rest & 0xF) | ((lo_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([lo_m & 0x3F, (rest >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, m


def _requantize_int8(blocks: np.ndarray, kind: str) -> QuantizedWeight:
    """Blocks of a type without an exact packed form -> int8, one scale per row (quantize_int8).

    NOTE: the only loss is rounding each weight to the row's int8 grid (at most scale / 2 = max|w| / 254);
    float values exist for at most _REQUANT_CHUNK weights (whole rows) at a time.
    """
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    per_row = blocks.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
    step = max(1, _REQUANT_CHUNK // per_row)
    parts = [quantize_int8(torch.from_numpy(gguf.quants.dequantize(blocks[i:i + step], qtype)))
             for i in range(0, blocks.shape[0], step)]
    return QuantizedWeight("int8", torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))


def unpermute_qk_rows(qw: QuantizedWeight, num_heads: int) -> QuantizedWeight:
    """unpermute_qk on every per-row part of a quantized weight (codes, scales, mins)."""
    def apply(t):
        return None if t is None else torch.from_numpy(np.ascontiguousarray(unpermute_qk(t.numpy(), num_heads)))

    return QuantizedWeight(qw.scheme, apply(qw.qweight), apply(qw.scales), apply(qw.mins), qw.group_size)
