"""Data-parallel routing: which replica takes a request, by prefix affinity with a least-load fallback.

A replica's prefix cache holds the KV of the prompts it served, so a request whose first blocks another
request already sent to replica r is cheapest on r. The router keys prompts exactly as the prefix cache
keys blocks (``hash_block_tokens``: chained sha256 over full blocks, with the adapter id and cache salt),
remembers which replicas each leading-block hash went to (an LRU table), and sends a request to the
least-loaded replica that owns its longest known prefix, unless that replica's load is well above the
least-loaded one's: then the least-loaded replica takes it (a fallback) and becomes an owner too.

Pure Python: no Ray, no torch. Loads are the caller's (unfinished requests per replica).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pagellm.core.block_pool import BlockHash
from pagellm.core.kv_cache_manager import hash_block_tokens

ROUTING_POLICIES = ("affinity", "least_load", "random")


@dataclass(frozen=True)
class RouterConfig:
    """How the router weighs affinity against load."""

    block_size: int = 16  # the replicas' KV block size: hashes must match their prefix caches
    policy: str = "affinity"  # affinity | least_load | random (random: a baseline for benchmarks)
    max_affinity_blocks: int = 128  # leading blocks hashed per request (a 2048-token prefix at block size 16)
    # The owner of a prefix gives way when its load exceeds the least-loaded replica's by more than
    # balance_abs requests AND by more than balance_rel times: a cache hit saves a prefill, but
    # queueing behind a busy replica costs more once the gap is that wide.
    balance_abs: int = 4
    balance_rel: float = 1.5
    max_entries: int = 1 << 16  # prefix hashes remembered (LRU); ~100 bytes each

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}; got {self.policy!r}")
        if self.block_size < 1 or self.max_affinity_blocks < 1 or self.max_entries < 1:
            raise ValueError("block_size, max_affinity_blocks and max_entries must be >= 1")
        if self.balance_abs < 0 or self.balance_rel < 1.0:
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1")


@dataclass(frozen=True)
class Route:
    """Where one request goes and why.

    kind: affinity (an owner of its prefix took it), fallback (an owner existed but was too busy),
    miss (no replica holds any full block of it), or the policy name for least_load / random.
    owner_hit: the chosen replica owns the request's longest known prefix (so its prefix cache likely
    holds those blocks), whatever the policy: the hit rate to compare policies by.
    """

    replica: int
    kind: str
    num_matched_blocks: int
    owner_hit: bool


class PrefixAffinityRouter:
    """Owns the prefix-hash -> replicas table and the routing counters."""

    def __init__(self, num_replicas: int, config: RouterConfig | None = None, seed: int = 0) -> None:
        assert num_replicas >= 1, f"need at least one replica, got {num_replicas}"
        self.num_replicas = num_replicas
        self.config = config or RouterConfig()
        self._owners: OrderedDict[BlockHash, list[int]] = OrderedDict()
        self._rng = random.Random(seed)
        self._turn = 0  # rotates among equally loaded replicas
        self.counts: dict[str, int] = {}  # route kind -> requests
        self.num_owner_hits = 0
        self.num_with_full_block = 0  # requests with at least one full block (the hit rate's denominator)

    def prefix_hashes(self, token_ids: Sequence[int], lora_id: int = 0, cache_salt: str | None = None
                      ) -> list[BlockHash]:
        """The chained hashes of the prompt's leading full blocks, as the replicas' prefix caches compute them."""
        bs = self.config.block_size
        num_blocks = min(len(token_ids) // bs, self.config.max_affinity_blocks)
        extra_keys = (lora_id, cache_salt)
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for i in range(num_blocks):
            parent = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs], extra_keys)
            hashes.append(parent)
        return hashes

    def route(self, token_ids: Sequence[int], loads: Sequence[int], available: Sequence[bool] | None = None,
              lora_id: int = 0, cache_salt: str | None = None) -> Route | None:
        """The replica for a prompt (None when no replica is available); records the choice."""
        assert len(loads) == self.num_replicas, f"{len(loads)} loads for {self.num_replicas} replicas"
        up = [i for i in range(self.num_replicas) if available is None or available[i]]
        if not up:
            return None
        hashes = self.prefix_hashes(token_ids, lora_id, cache_salt)
        owners, matched = self._longest_owned_prefix(hashes, up)
        least = self._least_loaded(up, loads)
        policy = self.config.policy
        if policy == "random":
            replica, kind = self._rng.choice(up), "random"
        elif policy == "least_load":
            replica, kind = least, "least_load"
        elif not owners:
            replica, kind = least, "miss"
        else:
            owner = min(owners, key=lambda i: loads[i])
            if self._gives_way(loads[owner], loads[least]):
                replica, kind = least, "fallback"
            else:
                replica, kind = owner, "affinity"
        hit = replica in owners
        self._record(hashes, replica)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if hashes:
            self.num_with_full_block += 1
            self.num_owner_hits += hit
        return Route(replica, kind, matched, hit)

    def forget_replica(self, replica: int) -> None:
        """Drop a replica from every owner list (it restarted: its prefix cache is empty)."""
        for key in [h for h, owners in self._owners.items() if replica in owners]:
            owners = self._owners[key]
            owners.remove(replica)
            if not owners:
                del self._owners[key]

    @property
    def owner_hit_rate(self) -> float:
        """Of the requests with a full block, the share sent to a replica that owned their known prefix."""
        return self.num_owner_hits / self.num_with_full_block if self.num_with_full_block else 0.0

    # ---- internals --------------------------------------------------------------------------------

    def _longest_owned_prefix(self, hashes: list[BlockHash], up: list[int]) -> tuple[list[int], int]:
        """(available owners of the longest prefix some available replica holds, its length in blocks)."""
        for depth in range(len(hashes), 0, -1):
            owners = self._owners.get(hashes[depth - 1])
            if owners:
                live = [i for i in owners if i in up]
                if live:
                    return live, depth
        return [], 0

    def _least_loaded(self, up: list[int], loads: Sequence[int]) -> int:
        """The least-loaded replica; ties rotate so an idle fleet is filled evenly."""
        low = min(loads[i] for i in up)
        tied = [i for i in up if loads[i] == low]
        self._turn += 1
        return tied[self._turn % len(tied)]

    def _gives_way(self, owner_load: int, least_load: int) -> bool:
        cfg = self.config
        return owner_load > least_load + cfg.balance_abs and owner_load > cfg.balance_rel * least_load

    def _record(self, hashes: list[BlockHash], replica: int) -> None:
        table = self._owners
        for block_hash in hashes:
            owners = table.get(block_hash)
            if owners is None:
                table[block_hash] = [replica]
            else:
                if replica not in owners:
                    owners.append(replica)
                table.move_to_end(block_hash)
        while len(table) > self.config.max_entries:
            table.popitem(last=False)
