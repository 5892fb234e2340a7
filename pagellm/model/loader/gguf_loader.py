"""GGUF files: config from metadata, tensors dequantized with the gguf package, HF names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pagellm.errors import InvalidRequest
from pagellm.model.layers.quant import QuantizedWeight, quantize_int8
from pagellm.model.loader.decoder_config import DecoderConfig

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_QUANTS = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}

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
        """Like weights(), but Q8_0/Q4_0/Q4_1 matrices come as QuantizedWeight, read from their blocks
        without a float copy of the model: Q4_0/Q4_1 map exactly to int4 groups of 32; Q8_0 (whose
        per-block scales torch's int8 kernel cannot take) is requantized per row, one matrix at a time."""
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


PACKED_TYPES = {"Q8_0", "Q4_0", "Q4_1"}


def _packable(t) -> bool:
    """A quantized matrix of a Linear (the token embedding is looked up by row: it loads as float)."""
    return t.tensor_type.name in PACKED_TYPES and len(t.shape) == 2 and t.name != "token_embd.weight"


_BLOCK = 32


def decode_blocks(blocks: np.ndarray, kind: str) -> QuantizedWeight:
    """[rows, bytes] of GGUF Q8_0/Q4_0/Q4_1 blocks (32 weights each) -> QuantizedWeight.

    Q4_0 block: fp16 d, 16 bytes of nibbles, w = d * (q - 8). Q4_1: fp16 d, fp16 m, nibbles,
    w = d * q + m. In a block, byte j holds weight j (low nibble) and weight j + 16 (high).
    Both are the int4 form q * scale + min, with min = -8d or m.
    Q8_0: fp16 d, 32 int8, w = d * q; requantized to one int8 scale per row.
    """
    rows = blocks.shape[0]
    if kind == "Q8_0":
        b = blocks.reshape(rows, -1, 2 + _BLOCK)
        d = torch.from_numpy(b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))  # [rows, nblk]
        q = torch.from_numpy(b[..., 2:].copy().view(np.int8)).float()  # [rows, nblk, 32]
        # NOTE: the per-block grid is finer than one per-row scale; rounding q * d / s is the only loss
        return quantize_int8((q * d.unsqueeze(-1)).view(rows, -1))
    head = 4 if kind == "Q4_1" else 2
    b = blocks.reshape(rows, -1, head + _BLOCK // 2)
    halves = b[..., :head].copy().view(np.float16).astype(np.float32)  # [rows, nblk, 1 or 2]
    d = torch.from_numpy(halves[..., 0])
    mins = torch.from_numpy(halves[..., 1]) if kind == "Q4_1" else -8 * d
    nib = torch.from_numpy(b[..., head:].copy())  # [rows, nblk, 16]
    q = torch.cat([nib & 0xF, nib >> 4], dim=-1).view(rows, -1)
    return QuantizedWeight("int4", q, d, mins, _BLOCK)


def unpermute_qk_rows(qw: QuantizedWeight, num_heads: int) -> QuantizedWeight:
    """unpermute_qk on every per-row part of a quantized weight (codes, scales, mins)."""
    def apply(t):
        return None if t is None else torch.from_numpy(np.ascontiguousarray(unpermute_qk(t.numpy(), num_heads)))

    return QuantizedWeight(qw.scheme, apply(qw.qweight), apply(qw.scales), apply(qw.mins), qw.group_size)
