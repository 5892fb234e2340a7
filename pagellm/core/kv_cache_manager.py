"""KVCacheManager: per-request block tables over the BlockPool, and prefix-cache lookups by block hash."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from pagellm.config import CacheConfig
from pagellm.core.block_pool import BlockHash, BlockPool, KVBlock
from pagellm.request import Request

_ROOT_PARENT_HASH: BlockHash = bytes(32)


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[int, str | None]
) -> BlockHash:
    """The chained hash of one full block: sha256(parent digest, token ids, extra keys).

    NOTE: sha256 rather than Python's hash(): a 64-bit collision would silently hand one
    request another prompt's KV (wrong text, and across cache_salt a privacy leak), and hash()
    of a str is salted per process. Cost is about a microsecond per block, negligible next to
    the forward pass. The encoding is unambiguous: a fixed 32-byte parent, a fixed-length token
    field (always block_size int64s), then the repr of the extra keys.
    """
    digest = hashlib.sha256(parent_hash or _ROOT_PARENT_HASH)
    digest.update(array("q", token_ids).tobytes())
    digest.update(repr(extra_keys).encode())
    return digest.digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns each request's block table and the prefix-cache lookups; the BlockPool owns the blocks.

    Invariants:
    - ``req_to_blocks[req_id]`` covers at least the request's computed tokens; each block in it
      holds one reference for this request;
    - a block is published to the prefix cache only once it is full and its KV is computed,
      i.e. covered by ``request.num_computed_tokens`` at the start of a step. This relies on the
      engine executing every SchedulerOutput before the next ``schedule()``;
    - blocks a step writes are never shared: prefix hits end on a block boundary and only full
      blocks are cached, so a partly filled block belongs to one request.
    """

    def __init__(self, cache_config: CacheConfig, max_model_len: int) -> None:
        assert cache_config.num_blocks is not None, "the engine must set cache_config.num_blocks"
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        self.enable_caching = cache_config.enable_prefix_caching
        self.block_pool = BlockPool(cache_config.num_blocks, self.enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # Hashes of each request's full blocks, computed incrementally as tokens arrive. Kept
        # across preemption (the tokens do not change); dropped when the request finishes.
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        # How many leading blocks of each table have been offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # (tokens looked up, hit tokens) of the last lookup, counted once the admission succeeds,
        # so a request retried at the head of the queue is not counted every step.
        self._pending_lookups: dict[str, tuple[int, int]] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def get_block_ids(self, req_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(req_id, [])]

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request: (block ids, number of hit tokens)."""
        params = request.sampling_params
        # NOTE: prompt logprobs need the logits of every position from first_prompt_logprob_position
        # on, so hits stop before it; without prompt_logprobs_start that is position 0: no hits.
        if not self.enable_caching or (params.prompt_logprobs is not None and params.prompt_logprobs_start is None):
            return [], 0
        block_hashes = self._get_block_hashes(request)
        # NOTE: prefix hits stop at num_tokens - 1 so the last token is computed and yields logits.
        max_hit_tokens = request.num_tokens - 1
        if params.prompt_logprobs is not None:
            max_hit_tokens = min(max_hit_tokens, params.first_prompt_logprob_position)
        max_hit_blocks = max_hit_tokens // self.block_size
        hit_block_ids: list[int] = []
        for block_hash in block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hit_block_ids.append(block.block_id)
        num_hit_tokens = len(hit_block_ids) * self.block_size
        self._pending_lookups[request.req_id] = (request.num_tokens, num_hit_tokens)
        return hit_block_ids, num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[int] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Grow the table to hold num_computed + num_new_computed + num_new_tokens tokens.

        ``new_computed_blocks`` are the prefix hits of ``get_computed_blocks``, taken on
        admission only. Returns the ids of the newly allocated blocks ([] when the table already
        had room), or None when the pool is out of room, in which case nothing changed.
        """
        assert num_new_tokens > 0, f"allocate_slots needs new tokens, got {num_new_tokens}"
        hit_blocks = [self.block_pool.blocks[i] for i in new_computed_blocks or []]
        assert num_new_computed_tokens == len(hit_blocks) * self.block_size, (
            f"{num_new_computed_tokens} hit tokens do not fill {len(hit_blocks)} blocks"
        )
        table = self.req_to_blocks.get(request.req_id, [])
        assert not (hit_blocks and table), "prefix hits are only taken when a request is admitted"
        num_computed = request.num_computed_tokens + num_new_computed_tokens
        assert num_computed <= request.num_tokens, f"{request}: more computed tokens than tokens"
        num_total = num_computed + num_new_tokens
        assert num_total <= self.max_model_len, f"{request} would exceed max_model_len {self.max_model_len}"
        num_new_blocks = max(0, cdiv(num_total, self.block_size) - len(table) - len(hit_blocks))
        # A free hit block leaves the free queue when touched, so it competes with new blocks.
        num_free_hits = sum(1 for block in hit_blocks if block.ref_count == 0)
        if num_new_blocks + num_free_hits > self.block_pool.get_num_free_blocks():
            return None

        if request.req_id not in self.req_to_blocks:
            queries, hits = self._pending_lookups.pop(request.req_id, (0, 0))
            self.prefix_cache_queries += queries
            self.prefix_cache_hits += hits
        # Touch before allocating, so that allocation cannot evict the hits.
        self.block_pool.touch(hit_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        table = self.req_to_blocks.setdefault(request.req_id, [])
        table.extend(hit_blocks)
        table.extend(new_blocks)
        self._cache_computed_blocks(request, num_computed)
        return [block.block_id for block in new_blocks]

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so its tail is evicted first.

        Its full computed blocks are published first: a preempted request can then resume from
        its own cached prefix, and a finished one leaves its prompt for the next with the same.
        Per-request hashes are kept unless the request is finished (set its status first).
        """
        self._cache_computed_blocks(request, request.num_computed_tokens)
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self.block_pool.free_blocks(reversed(blocks))
        self.num_cached_blocks.pop(request.req_id, None)
        self._pending_lookups.pop(request.req_id, None)
        if request.is_finished:
            self.req_to_block_hashes.pop(request.req_id, None)

    def trim(self, request: Request) -> None:
        """Free the blocks past the request's computed tokens (written by rejected proposals, never cached)."""
        table = self.req_to_blocks.get(request.req_id)
        if not table:
            return
        keep = cdiv(request.num_computed_tokens, self.block_size)
        if len(table) > keep:
            assert self.num_cached_blocks.get(request.req_id, 0) <= keep, "a cached block would be freed"
            extra = table[keep:]
            del table[keep:]
            self.block_pool.free_blocks(reversed(extra))

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def _cache_computed_blocks(self, request: Request, num_computed_tokens: int) -> None:
        if not self.enable_caching:
            return
        table = self.req_to_blocks.get(request.req_id, [])
        num_full_blocks = min(num_computed_tokens // self.block_size, len(table))
        num_cached = self.num_cached_blocks.get(request.req_id, 0)
        if num_full_blocks <= num_cached:
            return
        block_hashes = self._get_block_hashes(request)
        self.block_pool.cache_full_blocks(
            table[num_cached:num_full_blocks], block_hashes[num_cached:num_full_blocks]
        )
        self.num_cached_blocks[request.req_id] = num_full_blocks

    def _get_block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended incrementally as its tokens grow."""
        block_hashes = self.req_to_block_hashes.setdefault(request.req_id, [])
        # NOTE: the adapter and the salt are part of every block's key, so requests with a
        # different lora_id or cache_salt never share KV even for identical tokens.
        extra_keys = (request.lora_id, request.cache_salt)
        token_ids = request.all_token_ids
        bs = self.block_size
        for i in range(len(block_hashes), request.num_tokens // bs):
            parent_hash = block_hashes[-1] if block_hashes else None
            block_hashes.append(hash_block_tokens(parent_hash, token_ids[i * bs : (i + 1) * bs], extra_keys))
        return block_hashes
