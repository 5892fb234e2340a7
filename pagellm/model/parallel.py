"""Tensor parallelism (Megatron-style) for the Llama-family decoder: shard a loaded model over ranks.

Each rank keeps a slice of every layer, and the layer's output is made whole with one collective:

- qkv_proj and gate_up_proj are column-parallel: a rank computes its own heads' q/k/v and its own slice of the
  MLP's intermediate features; no communication.
- o_proj and down_proj are row-parallel: a rank multiplies its slice of the input features by the matching
  input columns, and one all-reduce (sum) per projection gives every rank the full output (the bias is added
  once, after it).
- lm_head is vocabulary-parallel: a rank computes the logits of its slice of the vocabulary, and one
  all-gather puts the rows back together. The embedding stays whole on every rank (a lookup, no matmul).

Heads are split by KV-head group (a KV head and the query heads that read it stay on one rank), so the KV
cache of a rank holds its own KV heads only; block tables are the same on every rank. A split need not be
even: SmolLM2's 3 KV heads go 2 + 1 over 2 ranks (rank 0 then does 2/3 of the attention).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pagellm.errors import InvalidRequest
from pagellm.model.layers.linear import Linear
from pagellm.model.layers.quant import QuantizedLinear


@dataclass
class TensorParallelGroup:
    """This process's place in a tensor-parallel group (torch.distributed's default group)."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks (in place, except for an inference tensor on the CPU)."""
        if x.is_inference() and x.device.type == "cpu":
            # NOTE: gloo runs a collective on its own threads, which do not inherit inference mode, and there an
            # in-place write to an inference tensor raises (pytorch issues 86830, 126032): reduce a normal copy
            with torch.inference_mode(False):
                x = x.clone()
                dist.all_reduce(x)
            return x
        dist.all_reduce(x)
        return x

    def all_gather_cols(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] of each rank (equal shapes) -> [rows, world_size * cols], rank 0's first."""
        with torch.inference_mode(False):  # NOTE: normal tensors for gloo's threads, as in all_reduce
            x = x.clone() if x.is_inference() else x.contiguous()
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)


def split_sizes(total: int, parts: int, unit: int = 1) -> list[int]:
    """`total` cut into `parts` sizes that are multiples of `unit`, as even as can be, the larger ones first.

    NOTE: `unit` keeps cuts on whole heads or on 32-wide int4 groups; where `total` is no multiple of it the
    last part takes the remainder."""
    units, rest = divmod(total, unit)
    base, extra = divmod(units, parts)
    sizes = [(base + (i < extra)) * unit for i in range(parts)]
    sizes[-1] += rest
    return sizes


def shard_range(total: int, rank: int, world_size: int, unit: int = 1) -> tuple[int, int]:
    sizes = split_sizes(total, world_size, unit)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def check_shardable(config, world_size: int) -> None:
    """InvalidRequest where the model cannot be split over `world_size` ranks (before any weight loads)."""
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if num_kv_heads < world_size:
        raise InvalidRequest(
            f"tensor_parallel_size {world_size} is larger than the model's {num_kv_heads} KV heads: each rank needs "
            "at least one KV head (replicating KV heads is not supported yet)", param="tensor_parallel_size")
    if config.intermediate_size < world_size:
        raise InvalidRequest(f"tensor_parallel_size {world_size} is larger than the MLP's {config.intermediate_size} "
                             "features", param="tensor_parallel_size")


# ---- parallel layers ------------------------------------------------------------------------------------


class RowParallel(nn.Module):
    """A projection whose input features are split over the ranks: local matmul, all-reduce, then the bias."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group: TensorParallelGroup) -> None:
        super().__init__()
        self.inner = inner  # a (Quantized)Linear without bias over this rank's input columns
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(self.inner.forward(x))
        return out if self.bias is None else out + self.bias


class VocabParallelHead(nn.Module):
    """The LM head over this rank's vocabulary rows; forward gathers every rank's logits, in vocabulary order."""

    def __init__(self, inner: nn.Module, vocab_size: int, group: TensorParallelGroup) -> None:
        super().__init__()
        self.inner = inner  # rows [rank * per_rank, ...) of the head, padded to per_rank rows
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_cols(self.inner.forward(x))[..., : self.vocab_size]  # [rows, vocab]


# ---- slicing one projection ------------------------------------------------------------------------------


def _select_rows(layer: nn.Module, rows: torch.Tensor, num_rows: int | None = None) -> nn.Module:
    """A copy of `layer` keeping output rows `rows` (zero rows appended up to `num_rows`)."""
    pad = 0 if num_rows is None else num_rows - rows.numel()

    def take(t: torch.Tensor) -> torch.Tensor:
        out = t.index_select(0, rows)
        if pad:
            out = torch.cat([out, out.new_zeros((pad, *out.shape[1:]))])
        return out.contiguous()

    out_features = rows.numel() + pad
    if type(layer) is QuantizedLinear:
        new = QuantizedLinear(layer.in_features, out_features, layer.bias is not None, layer.scheme, layer.out_dtype)
        new.group_size = layer.group_size
        new.qweight, new.scales = take(layer.qweight), take(layer.scales)
        if layer.scheme == "int4":
            new.mins = take(layer.mins)
        if layer.bias is not None:
            new.bias = nn.Parameter(take(layer.bias), requires_grad=False)
        return new
    if type(layer) is Linear:
        bias = None if layer.bias is None else take(layer.bias.detach())
        return _linear(take(layer.weight.detach()), bias)
    raise InvalidRequest(f"tensor parallelism cannot split a {type(layer).__name__} layer (LoRA is not supported "
                         "with tensor_parallel_size > 1)", param="tensor_parallel_size")


def _select_cols(layer: nn.Module, start: int, end: int, name: str) -> tuple[nn.Module, torch.Tensor | None]:
    """(a bias-free copy of `layer` over input columns [start, end), its bias) for a row-parallel projection."""
    if type(layer) is QuantizedLinear:
        bias = None if layer.bias is None else layer.bias.detach()
        new = QuantizedLinear(end - start, layer.out_features, False, layer.scheme, layer.out_dtype)
        new.group_size = layer.group_size
        if layer.scheme == "int8":  # per-output-channel scales: the same for any column slice
            new.qweight, new.scales = layer.qweight[:, start:end].contiguous(), layer.scales
            return new, bias
        group = layer.group_size
        if start % group or end % group:
            raise InvalidRequest(
                f"{name}: the tensor-parallel split of its {layer.in_features} input features at [{start}, {end}) "
                f"does not align with the {group}-wide int4 quantization groups; use --quantization int8 or none, "
                "or another tensor_parallel_size", param="tensor_parallel_size")
        # packed int4 codes: 16 bytes per 32-wide group, groups in input order (quant.pack_int4)
        new.qweight = layer.qweight[:, start // 2 : end // 2].contiguous()
        new.scales = layer.scales[:, start // group : end // group].contiguous()
        new.mins = layer.mins[:, start // group : end // group].contiguous()
        return new, bias
    if type(layer) is Linear:
        bias = None if layer.bias is None else layer.bias.detach()
        return _linear(layer.weight.detach()[:, start:end].contiguous(), None), bias
    raise InvalidRequest(f"tensor parallelism cannot split a {type(layer).__name__} layer (LoRA is not supported "
                         "with tensor_parallel_size > 1)", param="tensor_parallel_size")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """A Linear over these tensors (no init of throwaway parameters)."""
    layer = Linear.__new__(Linear)
    nn.Module.__init__(layer)
    layer.out_features, layer.in_features = weight.shape
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
    return layer


def _device(layer: nn.Module) -> torch.device:
    return next(itertools.chain(layer.parameters(), layer.buffers())).device


def _rows(*ranges: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(s, e, device=device) for s, e in ranges])


# ---- the whole model ------------------------------------------------------------------------------------


def shard_decoder(model: nn.Module, group: TensorParallelGroup) -> None:
    """Keep this rank's slice of every layer of a loaded Llama-family decoder (in place), before packing.

    `model.num_kv_heads` becomes the rank's KV heads, which size its KV cache; `model.tp_group` marks the shard.
    """
    check_shardable(model.config, group.world_size)
    for i, layer in enumerate(model.layers):
        shard_attention(layer.self_attn, group, f"layers.{i}.self_attn")
        shard_mlp(layer.mlp, group, f"layers.{i}.mlp")
    shard_lm_head(model, group)
    model.num_kv_heads = model.layers[0].self_attn.num_kv_heads
    model.tp_group = group


def shard_attention(attn: nn.Module, group: TensorParallelGroup, name: str = "self_attn") -> None:
    """qkv_proj column-parallel over whole KV-head groups, o_proj row-parallel; head counts become local."""
    d = attn.head_dim
    device = _device(attn.o_proj)
    group_size = attn.num_heads // attn.num_kv_heads  # query heads per KV head
    k0, k1 = shard_range(attn.num_kv_heads, group.rank, group.world_size)  # this rank's KV heads
    q0, q1 = k0 * group_size, k1 * group_size
    q, kv = attn.q_size, attn.kv_size
    rows = _rows((q0 * d, q1 * d), (q + k0 * d, q + k1 * d), (q + kv + k0 * d, q + kv + k1 * d), device=device)
    attn.qkv_proj = _select_rows(attn.qkv_proj, rows)
    inner, bias = _select_cols(attn.o_proj, q0 * d, q1 * d, f"{name}.o_proj")
    attn.o_proj = RowParallel(inner, bias, group)
    attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0
    attn.q_size, attn.kv_size = attn.num_heads * d, attn.num_kv_heads * d


def shard_mlp(mlp: nn.Module, group: TensorParallelGroup, name: str = "mlp") -> None:
    """gate_up_proj column-parallel over a slice of the intermediate features, down_proj row-parallel."""
    inter = mlp.intermediate_size
    device = _device(mlp.down_proj)
    # NOTE: cuts on 32-feature units, so int4's down_proj groups stay whole wherever inter allows
    i0, i1 = shard_range(inter, group.rank, group.world_size, unit=32 if inter >= 32 * group.world_size else 1)
    mlp.gate_up_proj = _select_rows(mlp.gate_up_proj, _rows((i0, i1), (inter + i0, inter + i1), device=device))
    inner, bias = _select_cols(mlp.down_proj, i0, i1, f"{name}.down_proj")
    mlp.down_proj = RowParallel(inner, bias, group)
    mlp.intermediate_size = i1 - i0


def shard_lm_head(model: nn.Module, group: TensorParallelGroup) -> None:
    """The LM head's vocabulary rows in equal shards (all_gather wants them), the last one zero-padded."""
    vocab, rank = model.config.vocab_size, group.rank
    per_rank = -(-vocab // group.world_size)
    v0, v1 = min(rank * per_rank, vocab), min((rank + 1) * per_rank, vocab)
    rows = torch.arange(v0, v1, device=model.embed_tokens.weight.device)
    model.lm_head = VocabParallelHead(_select_rows(model.lm_head, rows, per_rank), vocab, group)
