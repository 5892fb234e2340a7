"""BERT-family encoders (BertModel, BertForSequenceClassification) over packed, unpadded batches.

Every linear, MLP and LayerNorm runs on one flat [num_tokens, hidden] tensor holding all
sequences end to end; only attention looks at sequence boundaries (`seq_lens`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.errors import InvalidRequest
from pagellm.model.layers.encoder_attention import packed_attention
from pagellm.model.layers.encoder_int8 import int8_available, quantize_linears
from pagellm.model.pooling import pool
from pagellm.pooling_params import POOLING_TYPES

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# HF per-layer module path (after "encoder.layer.{i}.") -> (our module path, q/k/v slot or None)
_LAYER_WEIGHTS: dict[str, tuple[str, int | None]] = {
    "attention.self.query": ("attn.qkv_proj", 0),
    "attention.self.key": ("attn.qkv_proj", 1),
    "attention.self.value": ("attn.qkv_proj", 2),
    "attention.output.dense": ("attn.o_proj", None),
    "attention.output.LayerNorm": ("attn_norm", None),
    "intermediate.dense": ("mlp.up_proj", None),
    "output.dense": ("mlp.down_proj", None),
    "output.LayerNorm": ("mlp_norm", None),
}
_EMBEDDING_WEIGHTS: dict[str, str] = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "embeddings.norm",
}
_TF_PARAM_NAMES = {"gamma": "weight", "beta": "bias"}  # LayerNorm names of TF-converted checkpoints
# NOTE: the layers quantization="int8" runs in int8 (layers/encoder_int8.py): 92% of a layer's matmul FLOPs.
# The attention output projection (384x384 on MiniLM) stays float32: int8 was no faster on it.
INT8_LINEARS = ("attn.qkv_proj", "mlp.up_proj", "mlp.down_proj")


def check_bert_config(config) -> None:
    """Reject BERT variants this file would compute differently (InvalidRequest, not a silent mismatch)."""
    pos_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if pos_type != "absolute":
        raise InvalidRequest(f"BERT position_embedding_type {pos_type!r} is not supported (only 'absolute')",
                             param="model")
    if config.hidden_act not in _ACTIVATIONS:
        raise InvalidRequest(f"BERT hidden_act {config.hidden_act!r} is not supported "
                             f"(supported: {', '.join(_ACTIVATIONS)})", param="model")
    if getattr(config, "is_decoder", False):
        raise InvalidRequest("BERT configured as a decoder (is_decoder=True) is not supported", param="model")


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # [num_tokens, hidden]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # every token is segment 0
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.norm(x)


class BertAttention(nn.Module):
    """Fused QKV projection, per-sequence bidirectional attention, output projection."""

    def __init__(self, config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        assert self.head_dim * self.num_heads == config.hidden_size, "hidden_size must divide into heads"
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # [T, 3, H, D]
        q, k, v = qkv.unbind(1)  # each [T, H, D]
        out = packed_attention(q, k, v, seq_lens, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class BertMLP(nn.Module):
    """up -> activation -> down."""

    def __init__(self, config) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))  # [T, I] in the middle


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block (BERT's order: residual add, then norm)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.attn = BertAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BertMLP(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, seq_lens))
        return self.mlp_norm(x + self.mlp(x))


class BertModel(nn.Module):
    """Token ids of packed sequences in, final hidden states [num_tokens, hidden] out (no pooler)."""

    def __init__(self, config) -> None:
        super().__init__()
        check_bert_config(config)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int],
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions (0.. within each sequence), token_type_ids: [num_tokens]."""
        x = self.embeddings(input_ids, positions, token_type_ids)  # [num_tokens, hidden]
        for layer in self.layers:
            x = layer(x, seq_lens)
        return x

    def quantize_int8(self) -> int:
        """Run the encoder layers' big linears in int8 (INT8_LINEARS); returns how many were swapped.
        Inference only, on the CPU, after the weights are loaded."""
        if not int8_available():
            raise InvalidRequest("quantization int8 for encoders needs torch's fbgemm int8 ops (an x86 CPU)",
                                 param="quantization")
        return quantize_linears(self.layers, INT8_LINEARS)

    def map_weight_name(self, hf_name: str) -> tuple[str, int | None] | None:
        """HF name -> (our parameter name, q/k/v slot or None); None for tensors we don't use."""
        name = hf_name.removeprefix("bert.")
        if name in ("embeddings.position_ids", "embeddings.token_type_ids") or name.startswith("pooler."):
            return None  # buffers of older checkpoints; the pooler only serves classification heads
        module, _, param = name.rpartition(".")
        param = _TF_PARAM_NAMES.get(param, param)
        if module in _EMBEDDING_WEIGHTS:
            return f"{_EMBEDDING_WEIGHTS[module]}.{param}", None
        parts = module.split(".")
        if len(parts) > 3 and parts[:2] == ["encoder", "layer"] and ".".join(parts[3:]) in _LAYER_WEIGHTS:
            target, slot = _LAYER_WEIGHTS[".".join(parts[3:])]
            return f"layers.{parts[2]}.{target}.{param}", slot
        raise ValueError(f"unexpected weight {hf_name!r}")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checked(self, weights, self.map_weight_name)


class BertForSequenceClassification(nn.Module):
    """BertModel + linear classifier on a pooled vector: BERT's pooler (dense + tanh on the first token),
    or, when config.json sets `classifier_pooling` (pagellm finetune does, see pagellm.adapt.pooled_classifier),
    that pooling of the final hidden states (mean / cls / last), as the encoder was trained."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.classifier_pooling: str | None = getattr(config, "classifier_pooling", None)
        if self.classifier_pooling is not None and self.classifier_pooling not in POOLING_TYPES:
            raise InvalidRequest(f"classifier_pooling {self.classifier_pooling!r} is not one of "
                                 f"{', '.join(POOLING_TYPES)}", param="model")
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if self.classifier_pooling is None else None
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int],
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert(input_ids, positions, seq_lens, token_type_ids)  # [num_tokens, hidden]

    def quantize_int8(self) -> int:
        """The encoder's linears in int8 (BertModel.quantize_int8); the pooler and classifier stay float32."""
        return self.bert.quantize_int8()

    def compute_logits(self, hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """hidden: [num_tokens, hidden] -> float32 logits [num_seqs, num_labels]."""
        if self.pooler is None:
            assert self.classifier_pooling is not None
            pooled = pool(hidden, seq_lens, self.classifier_pooling).to(hidden.dtype)  # [num_seqs, hidden]
            return self.classifier(pooled).float()
        lens = torch.tensor(seq_lens, device=hidden.device)
        first = hidden[lens.cumsum(0) - lens]  # [num_seqs, hidden], the [CLS] rows
        return self.classifier(torch.tanh(self.pooler(first))).float()

    def map_weight_name(self, hf_name: str) -> tuple[str, int | None] | None:
        module, _, param = hf_name.rpartition(".")
        if module == "bert.pooler.dense":
            return None if self.pooler is None else (f"pooler.{param}", None)  # unused under classifier_pooling
        if module == "classifier":
            return f"classifier.{param}", None
        mapped = self.bert.map_weight_name(hf_name)
        return None if mapped is None else (f"bert.{mapped[0]}", mapped[1])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_checked(self, weights, self.map_weight_name)


def load_checked(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 map_name: Callable[[str], tuple[str, int | None] | None]) -> None:
    """Copy HF tensors into `model` by `map_name`; q/k/v fill thirds of a fused projection.

    Checks shapes, and that every parameter (every third of a fused one) arrived exactly once.
    """
    params = dict(model.named_parameters())
    loaded: set[tuple[str, int | None]] = set()
    for hf_name, tensor in weights:
        mapped = map_name(hf_name)
        if mapped is None:
            continue
        target, slot = mapped
        if target not in params:
            raise ValueError(f"unexpected weight {hf_name!r} (mapped to {target!r})")
        param = params[target]
        dest = param if slot is None else param.chunk(3, dim=0)[slot]  # a view into the fused rows
        if dest.shape != tensor.shape:
            raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} != {tuple(dest.shape)}")
        if (target, slot) in loaded:
            raise ValueError(f"weight {hf_name!r} appears twice in the checkpoint")
        with torch.no_grad():
            dest.copy_(tensor)
        loaded.add((target, slot))
    missing = sorted(
        f"{name}[{slot}]" if slot is not None else name
        for name in params
        for slot in ((0, 1, 2) if name.endswith(("qkv_proj.weight", "qkv_proj.bias")) else (None,))
        if (name, slot) not in loaded
    )
    if missing:
        raise ValueError(f"weights missing from the checkpoint: {missing[:8]}{'...' if len(missing) > 8 else ''}")
