"""The compiled paged decode kernel against the pure-torch gather + SDPA path."""

from __future__ import annotations

import pytest
import torch

from pagellm.model.layers.attention import AttentionMetadata, _decode_attention, _decode_attention_torch
from pagellm.model.layers.kernels import load_kernel


def _case(lengths: list[int], num_heads: int, num_kv_heads: int, dtype: torch.dtype, block_size: int = 4,
          head_dim: int = 16):
    torch.manual_seed(0)
    num_blocks = 256
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    max_blocks = -(-max(lengths) // block_size)
    perm = torch.randperm(num_blocks - 1) + 1  # scattered, non-contiguous blocks per sequence
    table = perm[: len(lengths) * max_blocks].view(len(lengths), max_blocks)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(lengths),
                             decode_block_table=table, decode_max_len=max(lengths),
                             decode_seq_lens=torch.tensor(lengths))
    if min(lengths) != max(lengths):
        span = torch.arange(max_blocks * block_size)
        meta.decode_mask = (span.unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).view(len(lengths), 1, 1, -1)
    q = torch.randn(len(lengths), num_heads, head_dim).to(dtype)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# long contexts of few sequences are cut into splits (merged like flash-decoding), including empty ones
@pytest.mark.parametrize("lengths,heads", [([1, 5, 17, 9], (6, 2)), ([8, 8], (4, 4)), ([13], (9, 3)),
                                           ([300], (9, 3)), ([257, 3], (4, 1)), ([130, 64, 1], (6, 2))])
@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 64 and 128 have their own unrolled kernels
def test_kernel_matches_torch_path(lengths, heads, dtype, head_dim):
    if load_kernel() is None:
        pytest.skip("no C++ compiler: the torch path is the only one")
    q, k_cache, v_cache, meta = _case(lengths, *heads, dtype, head_dim=head_dim)
    ours = _decode_attention(q, k_cache, v_cache, meta, 0.25, load_kernel())
    ref = _decode_attention_torch(q, k_cache, v_cache, meta, 0.25)
    assert ours.dtype == q.dtype and ours.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (ours.float() - ref.float()).abs().max().item() < tol


@pytest.mark.parametrize("head_dim", [16, 64])
def test_a_rows_attention_does_not_depend_on_the_rows_beside_it(head_dim):
    """Bitwise: a sequence's output alone equals its output beside sequences of other lengths (the splits of
    a long context are fixed by its own length). Greedy outputs and speculative verification rely on it."""
    kernel = load_kernel()
    if kernel is None:
        pytest.skip("no C++ compiler: the torch path is the only one")
    lengths = [300, 41, 700, 129, 5]
    q, k_cache, v_cache, meta = _case(lengths, 9, 3, torch.float32, block_size=16, head_dim=head_dim)
    together = _decode_attention(q, k_cache, v_cache, meta, 0.25, kernel)
    for i, length in enumerate(lengths):
        one = AttentionMetadata(slot_mapping=meta.slot_mapping, num_decode_tokens=1,
                                decode_block_table=meta.decode_block_table[i : i + 1], decode_max_len=length,
                                decode_seq_lens=torch.tensor([length]))
        alone = _decode_attention(q[i : i + 1], k_cache, v_cache, one, 0.25, kernel)
        assert torch.equal(alone[0], together[i]), length
