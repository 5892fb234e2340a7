"""Paged attention over a KV cache shaped [num_blocks, block_size, num_kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """One request's multi-token chunk in the flat token axis."""

    token_start: int
    num_tokens: int
    num_computed_tokens: int  # tokens of this request already in the cache before the chunk
    block_ids: torch.Tensor | None  # [num_blocks_needed], only when num_computed_tokens > 0
    mask: torch.Tensor | None  # [num_tokens, num_computed + num_tokens] bool, None when num_computed == 0


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner; an argument of every attention call.

    The flat token axis holds the single-token decodes first, then the prefill chunks.
    """

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    num_decode_tokens: int = 0
    decode_block_table: torch.Tensor | None = None  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    decode_max_len: int = 0  # longest decode context; keys past it are never read
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] int64 context length of each decode
    prefills: list[PrefillChunk] = field(default_factory=list)
    # Prefix tuning: token rows whose keys/values are replaced by an adapter's learned ones
    lora_mask: torch.Tensor | None = None  # [num_tokens, slots * rank]: each token's LoRA slot (model/layers/lora.py)
    virtual_rows: torch.Tensor | None = None  # [num_rows]
    virtual_keys: torch.Tensor | None = None  # [num_layers, num_rows, num_kv_heads, head_dim]
    virtual_values: torch.Tensor | None = None


KERNEL_CACHE_DTYPES = (torch.float32, torch.bfloat16)  # the C++ kernels'; a float16 cache takes the torch path


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the new keys/values [num_tokens, num_kv_heads, head_dim] into their slots."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, kernel=None) -> torch.Tensor:
    """kernel: the C++ module when the layer's plan gives it (KernelPlan.attention_module), else None."""
    if torch.compiler.is_compiling():  # only the decode step is compiled, and only with the C++ kernels
        return torch.ops.pagellm.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_table,
                                                        meta.decode_seq_lens, scale)
    if meta.decode_seq_lens is None or q.device.type != "cpu" or k_cache.dtype not in KERNEL_CACHE_DTYPES:
        kernel = None
    if kernel is not None:
        # NOTE: reads each sequence's blocks where they lie: no gather into a padded [B, L] copy
        return kernel.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_table, meta.decode_seq_lens,
                                             scale)
    return _decode_attention_torch(q, k_cache, v_cache, meta, scale)


def _decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    num_decodes = meta.num_decode_tokens
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    table = meta.decode_block_table
    # [num_decodes, num_kv_heads, max_len, head_dim]
    keys = k_cache[table].view(num_decodes, -1, num_kv_heads, head_dim).to(q.dtype)  # --kv-cache-dtype may differ
    values = v_cache[table].view(num_decodes, -1, num_kv_heads, head_dim).to(q.dtype)
    if meta.decode_mask is None:  # every request has the same length: cut the padding instead of masking
        keys, values = keys[:, : meta.decode_max_len], values[:, : meta.decode_max_len]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    # NOTE: the query heads of one KV group become the query-length axis, so GQA needs no
    # repeat of K/V; the padding mask broadcasts over them.
    query = q.view(num_decodes, num_kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(num_decodes, num_heads, head_dim)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    s, e = chunk.token_start, chunk.token_start + chunk.num_tokens
    query = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, num_heads, chunk, head_dim]
    if chunk.num_computed_tokens == 0:
        keys = k[s:e].transpose(0, 1).unsqueeze(0)
        values = v[s:e].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        total = chunk.num_computed_tokens + chunk.num_tokens
        keys = k_cache[chunk.block_ids].view(-1, num_kv_heads, head_dim)[:total].transpose(0, 1).unsqueeze(0)
        values = v_cache[chunk.block_ids].view(-1, num_kv_heads, head_dim)[:total].transpose(0, 1).unsqueeze(0)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=chunk.mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)  # [chunk, num_heads, head_dim]


def packed_causal_metadata(seq_lens: list[int]) -> AttentionMetadata:
    """Metadata of a KV-cache-free causal forward: sequences laid end to end, each one whole chunk
    starting at position 0 (each token sees its own sequence's earlier tokens and no other)."""
    prefills, start = [], 0
    for seq_len in seq_lens:
        assert seq_len > 0, f"empty sequence in {seq_lens}"
        prefills.append(PrefillChunk(start, seq_len, 0, None, None))
        start += seq_len
    return AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), prefills=prefills)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                    v_cache: torch.Tensor | None, meta: AttentionMetadata, scale: float,
                    decode_kernel=None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

    Writes k/v into the cache, then attends each token to its request's cached prefix. With no
    cache (k_cache None: pooling) every chunk must start at position 0 (packed_causal_metadata).
    """
    if k_cache is not None and v_cache is not None:
        if torch.compiler.is_compiling():  # an opaque in-place op: no functionalized copy of the cache
            torch.ops.pagellm.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        assert not meta.num_decode_tokens and all(c.num_computed_tokens == 0 for c in meta.prefills), (
            "attention without a KV cache needs whole sequences (no decodes, no cached prefix)"
        )
    parts = []
    if meta.num_decode_tokens:
        parts.append(_decode_attention(q[: meta.num_decode_tokens], k_cache, v_cache, meta, scale, decode_kernel))
    for chunk in meta.prefills:
        parts.append(_prefill_attention(q, k, v, k_cache, v_cache, chunk, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
