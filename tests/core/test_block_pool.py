"""BlockPool: allocation order, ref counts, LRU free queue, prefix-hash cache and eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.core.block_pool import BlockPool, KVBlock


def free_ids(pool: BlockPool) -> list[int]:
    return list(pool.free_queue)


def h(i: int) -> bytes:
    return i.to_bytes(32, "little")


def test_allocation_pops_the_head_and_sets_ref_counts() -> None:
    pool = BlockPool(8, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_count == 1 for b in blocks)
    assert pool.get_num_free_blocks() == 5
    assert pool.usage == pytest.approx(3 / 8)
    assert free_ids(pool) == [3, 4, 5, 6, 7]


def test_freed_blocks_are_reused_most_recent_first_before_never_used_ones() -> None:
    pool = BlockPool(6, enable_caching=False)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [3, 4, 5, 2, 1, 0]
    # Resident memory first: 0 (freed last), 1, 2; only then a never-used block.
    assert [b.block_id for b in pool.get_new_blocks(4)] == [0, 1, 2, 3]
    assert pool.num_used_ever == 4


def test_repeated_allocate_and_free_touches_no_new_block() -> None:
    """The KV tensors are backed lazily: blocks used once stay resident, so a steady load must cycle
    through the same blocks instead of walking the whole pool (issue 15: RSS grew to the full cache)."""
    pool = BlockPool(64, enable_caching=True)
    for i in range(200):
        blocks = pool.get_new_blocks(3)
        pool.cache_full_blocks(blocks[:2], [h(3 * i), h(3 * i + 1)])  # two full blocks, one partial
        pool.free_blocks(reversed(blocks))
    assert pool.num_used_ever == 3


def test_shared_block_is_freed_only_when_the_last_reference_goes() -> None:
    pool = BlockPool(4, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_count == 2
    pool.free_blocks([block])
    assert block.ref_count == 1 and block.block_id not in pool.free_queue
    pool.free_blocks([block])
    assert block.ref_count == 0 and free_ids(pool)[-1] == block.block_id


def test_double_free_is_an_assertion() -> None:
    pool = BlockPool(2, enable_caching=False)
    blocks = pool.get_new_blocks(1)
    pool.free_blocks(blocks)
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks(blocks)


def test_allocating_more_than_free_is_an_assertion() -> None:
    pool = BlockPool(2, enable_caching=False)
    with pytest.raises(AssertionError):
        pool.get_new_blocks(3)


def test_cached_free_blocks_are_evicted_lru_before_a_never_used_block_is_touched() -> None:
    pool = BlockPool(5, enable_caching=True)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_full_blocks([a, b], [h(1), h(2)])
    pool.free_blocks([b, a, c])
    assert free_ids(pool) == [3, 4, 1, 0, 2]
    # Cached and free: still found by hash.
    assert pool.get_cached_block(h(1)) is a and pool.get_cached_block(h(2)) is b
    # c holds no cached KV: taken first; the cache is untouched.
    assert pool.get_new_blocks(1) == [c]
    assert pool.get_cached_block(h(1)) is a and pool.get_cached_block(h(2)) is b
    # Then b (freed before a) is evicted, dropping its hash, rather than touching block 3.
    assert pool.get_new_blocks(1) == [b]
    assert b.block_hash is None and pool.get_cached_block(h(2)) is None
    assert pool.get_cached_block(h(1)) is a
    assert [x.block_id for x in pool.get_new_blocks(3)] == [0, 3, 4]
    assert pool.num_used_ever == 5


def test_touching_a_free_cached_block_takes_it_out_of_the_queue() -> None:
    pool = BlockPool(3, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([a], [h(7)])
    pool.free_blocks([a])
    assert pool.get_num_free_blocks() == 3
    pool.touch([pool.get_cached_block(h(7))])  # a prefix hit
    assert a.ref_count == 1 and pool.get_num_free_blocks() == 2
    assert a.block_id not in pool.free_queue and a.block_hash == h(7)


def test_duplicate_content_keeps_the_first_cached_copy() -> None:
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_blocks([a], [h(5)])
    pool.cache_full_blocks([b], [h(5)])
    assert pool.get_cached_block(h(5)) is a and b.block_hash is None
    # Evicting the private duplicate must not drop a's entry.
    pool.free_blocks([b])
    pool.get_new_blocks(2)
    assert pool.get_cached_block(h(5)) is a


def test_caching_disabled_never_records_hashes() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([a], [h(1)])
    assert a.block_hash is None and pool.get_cached_block(h(1)) is None


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use() -> None:
    pool = BlockPool(3, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([a], [h(1)])
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h(1)) is a
    pool.free_blocks([a])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h(1)) is None and a.block_hash is None
    assert pool.get_num_free_blocks() == 3


# ---- property: random allocate / touch / cache / free against a reference model ----------

ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "touch", "free", "cache"]), st.integers(0, 5), st.integers(0, 3)),
    max_size=60,
)


def check_pool(pool: BlockPool, refs: dict[int, int]) -> None:
    for block in pool.blocks:
        assert block.ref_count == refs.get(block.block_id, 0), block
        assert (block.block_id in pool.free_queue) == (block.ref_count == 0), block
    assert pool.get_num_free_blocks() + sum(1 for r in refs.values() if r > 0) == pool.num_blocks
    for block_hash, block in pool.cached_blocks.items():
        assert block.block_hash == block_hash


@settings(max_examples=150, deadline=None)
@given(ops=ops)
def test_random_pool_operations_keep_ref_counts_and_free_queue_consistent(
    ops: list[tuple[str, int, int]],
) -> None:
    pool = BlockPool(8, enable_caching=True)
    held: list[KVBlock] = []  # one entry per reference we hold
    refs: dict[int, int] = {}
    for op, n, k in ops:
        if op == "alloc" and n <= pool.get_num_free_blocks():
            for block in pool.get_new_blocks(n):
                held.append(block)
                refs[block.block_id] = 1
        elif op == "touch" and pool.get_cached_block(h(k)) is not None:
            block = pool.get_cached_block(h(k))
            pool.touch([block])
            held.append(block)
            refs[block.block_id] = refs.get(block.block_id, 0) + 1
        elif op == "free" and held:
            block = held.pop(n % len(held))
            pool.free_blocks([block])
            refs[block.block_id] -= 1
        elif op == "cache" and held and held[n % len(held)].block_hash is None:
            pool.cache_full_blocks([held[n % len(held)]], [h(k)])
        check_pool(pool, refs)
    pool.free_blocks(reversed(held))
    assert pool.get_num_free_blocks() == pool.num_blocks
    assert pool.reset_prefix_cache()
