"""BlockPool: the fixed set of KV blocks, their ref counts, the LRU free queue and the prefix-hash cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

# A block's identity in the prefix cache: the chained digest of its tokens (see kv_cache_manager).
BlockHash = bytes


class KVBlock:
    """One block of KV slots: who uses it (ref_count) and, once full and computed, its content hash."""

    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else ", cached"
        return f"KVBlock({self.block_id}, ref={self.ref_count}{cached})"


class BlockPool:
    """Owns every KV block: allocation, ref counts, the LRU free queue and the hash -> block cache.

    Invariants:
    - a block is in the free queue iff its ref_count == 0; the free queue is in the order freed;
    - every free block is in exactly one of: ``_free_uncached`` (used before, no cached KV),
      ``_free_cached`` (holds cached KV) or the never-used ids ``_num_used_ever..num_blocks-1``;
    - ``cached_blocks[h].block_hash == h``; a block whose hash is set holds the KV of those tokens.

    Allocation order: resident memory first. The KV tensors are backed lazily (the OS maps a page
    on its first write), so handing out a never-used block grows the process's resident memory
    for good. A new block is therefore the most recently freed block with no cached KV, else the
    least recently freed cached block (evicting its hash, LRU), and a never-used block only when
    every used one is taken. Resident KV memory thus follows the peak number of blocks in use at
    once, not the traffic seen: the prefix cache keeps what fits in that memory.

    NOTE: no block is reserved as a null block; ids 0..num_blocks-1 are all usable. Nothing in
    pagellm needs a placeholder id (no sliding window), and the worker pads block tables itself.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        assert num_blocks > 0, f"num_blocks must be > 0, got {num_blocks}"
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # OrderedDict as the free list: O(1) pop from the head, append at the tail and removal
        # from the middle (a cache hit on a free block), with no hand-written linked list.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_blocks: dict[BlockHash, KVBlock] = {}
        # The free queue split by what reusing a block costs (see the class docstring).
        self._free_uncached: OrderedDict[int, KVBlock] = OrderedDict()
        self._free_cached: OrderedDict[int, KVBlock] = OrderedDict()
        self._num_used_ever = 0  # never-used blocks are handed out in id order: ids >= this

    # ---- allocation ----------------------------------------------------------------------

    def get_num_free_blocks(self) -> int:
        """Blocks that can be handed out now, including free blocks that still hold cached KV."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref_count > 0), in [0, 1]."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    @property
    def num_used_ever(self) -> int:
        """Blocks handed out at least once: the KV cache's resident share, in blocks."""
        return self._num_used_ever

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Pop num_blocks free blocks, resident memory first, evicting cached hashes; ref_count = 1."""
        assert num_blocks <= len(self.free_queue), (
            f"asked for {num_blocks} blocks, only {len(self.free_queue)} free"
        )
        new_blocks = []
        for _ in range(num_blocks):
            if self._free_uncached:
                _, block = self._free_uncached.popitem(last=True)
            elif self._free_cached:
                _, block = self._free_cached.popitem(last=False)
            else:
                block = self.blocks[self._num_used_ever]
                self._num_used_ever += 1
            del self.free_queue[block.block_id]
            assert block.ref_count == 0, f"{block} in the free queue while in use"
            self._evict(block)
            block.ref_count = 1
            new_blocks.append(block)
        return new_blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block (a prefix-cache hit), pulling free ones out of the queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self.free_queue[block.block_id]
                self._free_cached.pop(block.block_id, None)
                self._free_uncached.pop(block.block_id, None)
            block.ref_count += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block, in the given order; unused ones join the free queue's tail.

        Callers pass a request's table in reverse so its tail blocks, the least likely to be
        shared by a later prompt, are the first evicted.
        """
        for block in blocks:
            assert block.ref_count > 0, f"double free of {block}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = block
                free = self._free_uncached if block.block_hash is None else self._free_cached
                free[block.block_id] = block

    # ---- prefix cache --------------------------------------------------------------------

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def cache_full_blocks(self, blocks: list[KVBlock], block_hashes: list[BlockHash]) -> None:
        """Publish full, computed blocks under their hashes so later requests can share them.

        When another block already holds the same content (two requests computed the same
        prefix concurrently), the first one stays the cached copy and this one stays private.
        """
        if not self.enable_caching:
            return
        assert len(blocks) == len(block_hashes)
        for block, block_hash in zip(blocks, block_hashes, strict=True):
            if block.block_hash is not None:
                assert block.block_hash == block_hash, f"{block} re-cached under a different hash"
                continue
            if block_hash in self.cached_blocks:
                continue
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (e.g. after new weights are loaded).

        Refused (False) while any block is in use: a running request's KV would still be valid
        for it, and the per-request "already cached" counts in the manager would go stale.
        """
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        self._free_uncached.update(self._free_cached)
        self._free_cached.clear()
        return True
