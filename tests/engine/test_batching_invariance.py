"""Batched, chunked-prefill and preempted runs give the same greedy tokens as one-at-a-time runs (fp32)."""

from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams

PROMPTS = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate([3, 17, 40, 9, 25, 61, 1, 33])]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> list[list[int]]:
    """One request at a time, whole prompt in one step, a roomy KV pool."""
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=1, max_num_batched_tokens=512, block_size=4,
              num_blocks=256, enable_prefix_caching=False)
    return [llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_batched_equals_sequential(tiny_llama_dir, reference):
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=512, block_size=4,
              num_blocks=256, enable_prefix_caching=False)
    assert _tokens(llm) == reference


def test_chunked_prefill_equals_sequential(tiny_llama_dir, reference):
    # a 7-token budget splits every longer prompt into chunks mixed with other requests' decodes
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=7, block_size=4,
              num_blocks=256, enable_prefix_caching=False)
    assert _tokens(llm) == reference


def test_preempted_equals_sequential(tiny_llama_dir, reference):
    # 30 blocks of 4 tokens cannot hold all eight sequences: requests are preempted and recomputed
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
              num_blocks=30, enable_prefix_caching=False)
    assert _tokens(llm) == reference
    scheduler = llm.llm_engine.core.scheduler
    assert scheduler.num_preemptions > 0
    assert scheduler.kv_cache_usage == 0.0


def test_prefix_cached_equals_sequential(tiny_llama_dir, reference):
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
              num_blocks=256, enable_prefix_caching=True)
    assert _tokens(llm) == reference
    # the second run hits the blocks the first one cached, and still gives the same tokens
    assert _tokens(llm) == reference
    assert llm.llm_engine.core.scheduler.prefix_cache_hits > 0
