"""PrefixAffinityRouter without Ray: affinity by leading-block hashes, least-load fallback, failover."""

from __future__ import annotations

import pytest

from pagellm.config import CacheConfig
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.engine.dp_router import PrefixAffinityRouter, Route, RouterConfig
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams

BS = 4


def router(num_replicas: int = 2, **config) -> PrefixAffinityRouter:
    return PrefixAffinityRouter(num_replicas, RouterConfig(block_size=BS, **config))


def prompt(prefix: int, suffix: int, prefix_blocks: int = 4) -> list[int]:
    """prefix_blocks full blocks shared by every prompt of the same `prefix`, then a 3-token tail."""
    return [1000 * prefix + i for i in range(prefix_blocks * BS)] + [7, 8, suffix]


def test_router_hashes_prompts_as_the_prefix_cache_hashes_blocks() -> None:
    ids = prompt(1, 5)
    manager = KVCacheManager(CacheConfig(block_size=BS, num_blocks=16), max_model_len=64)
    for lora_id, salt in [(0, None), (3, "tenant-a")]:
        req = Request(f"r{lora_id}", ids, SamplingParams(), lora_id=lora_id, cache_salt=salt)
        manager.get_computed_blocks(req)
        assert router().prefix_hashes(ids, lora_id, salt) == manager.req_to_block_hashes[req.req_id]
    assert len(router().prefix_hashes(ids)) == len(ids) // BS


def test_requests_sharing_a_prefix_go_to_the_replica_that_served_it() -> None:
    r = router()
    first = r.route(prompt(1, 0), loads=[0, 0])
    assert first.kind == "miss" and not first.owner_hit
    other = r.route(prompt(2, 0), loads=[0, 0])  # an idle fleet is filled in turn
    assert other.replica != first.replica
    for suffix in range(1, 6):
        route = r.route(prompt(1, suffix), loads=[1, 1])
        assert (route.replica, route.kind, route.num_matched_blocks, route.owner_hit) == (first.replica, "affinity",
                                                                                          4, True)
    assert r.counts == {"miss": 2, "affinity": 5}
    assert r.owner_hit_rate == pytest.approx(5 / 7)


def test_the_longest_known_prefix_wins() -> None:
    r = router()
    short = r.route(prompt(1, 0, prefix_blocks=2), loads=[0, 0])
    busy = [5, 0] if short.replica == 0 else [0, 5]
    r.route(prompt(1, 0, prefix_blocks=6), loads=busy)  # the 2-block owner is busy: the other takes 6 blocks
    deep = r.route(prompt(1, 9, prefix_blocks=6), loads=[0, 0])
    assert deep.replica != short.replica and deep.num_matched_blocks == 6


def test_a_busy_owner_gives_way_to_the_least_loaded_replica() -> None:
    r = router(balance_abs=4, balance_rel=1.5)
    owner = r.route(prompt(1, 0), loads=[0, 0]).replica
    other = 1 - owner
    loads = [0, 0]
    loads[owner], loads[other] = 5, 1  # 4 above the least: within the margin, affinity holds
    assert r.route(prompt(1, 1), loads=loads).replica == owner
    loads[owner] = 6  # 5 above and 6x: it gives way
    route = r.route(prompt(1, 2), loads=loads)
    assert (route.replica, route.kind, route.owner_hit) == (other, "fallback", False)
    # both now hold the prefix: the less loaded owner takes the next one, an affinity hit
    loads[owner], loads[other] = 3, 2
    assert r.route(prompt(1, 3), loads=loads) == Route(other, "affinity", 4, True)
    loads[owner], loads[other] = 2, 3
    assert r.route(prompt(1, 4), loads=loads) == Route(owner, "affinity", 4, True)


def test_short_prompts_and_unknown_prefixes_go_to_the_least_loaded_replica() -> None:
    r = router(num_replicas=3)
    assert r.route([1, 2, 3], loads=[4, 1, 2]).replica == 1  # no full block
    assert r.route(prompt(9, 0), loads=[4, 3, 2]).replica == 2
    assert r.num_with_full_block == 1  # only prompts with a full block count toward the hit rate


def test_a_replica_that_is_down_is_skipped_and_a_restarted_one_is_forgotten() -> None:
    r = router()
    owner = r.route(prompt(1, 0), loads=[0, 0]).replica
    down = [True, True]
    down[owner] = False
    route = r.route(prompt(1, 1), loads=[0, 0], available=down)
    assert (route.replica, route.kind) == (1 - owner, "miss")  # the live one owned nothing
    r.forget_replica(1 - owner)  # that one restarted too: its cache is empty
    r.forget_replica(owner)
    assert r.route(prompt(1, 2), loads=[0, 0]).kind == "miss"
    assert r.route(prompt(1, 3), loads=[0, 0], available=[False, False]) is None


def test_adapters_and_salts_do_not_share_affinity() -> None:
    r = router()
    base = r.route(prompt(1, 0), loads=[0, 0]).replica
    assert r.route(prompt(1, 1), loads=[0, 0], lora_id=2).kind == "miss"
    assert r.route(prompt(1, 2), loads=[0, 0], cache_salt="x").kind == "miss"
    assert r.route(prompt(1, 3), loads=[0, 0]).replica == base


def test_baseline_policies_still_count_owner_hits() -> None:
    rnd = router(policy="random")
    routes = [rnd.route(prompt(1, i), loads=[0, 0]) for i in range(40)]
    assert {r.kind for r in routes} == {"random"}
    assert {r.replica for r in routes} == {0, 1}  # seeded: both replicas are drawn
    assert rnd.num_owner_hits == sum(r.owner_hit for r in routes) == 38  # all but each replica's first visit
    least = router(policy="least_load")
    assert least.route(prompt(1, 0), loads=[3, 1]).replica == 1
    assert least.route(prompt(1, 1), loads=[0, 2]).replica == 0  # no affinity: load alone decides


def test_the_table_is_bounded() -> None:
    r = router(max_entries=8)
    for p in range(10):
        r.route(prompt(p, 0), loads=[0, 0])
    assert len(r._owners) == 8


def test_bad_router_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="routing policy"):
        RouterConfig(policy="hash")
    with pytest.raises(ValueError, match="balance_rel"):
        RouterConfig(balance_rel=0.5)


def test_an_invalid_request_crosses_processes_whole() -> None:
    import pickle

    from pagellm.errors import InvalidRequest, ModelNotFound

    for exc in (InvalidRequest("max_tokens too large", param="max_tokens"), ModelNotFound("no such model")):
        back = pickle.loads(pickle.dumps(exc))
        assert (type(back), back.message, back.param, str(back)) == (type(exc), exc.message, exc.param, str(exc))
