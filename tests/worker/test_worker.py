"""The Worker on its own: loading, KV-cache sizing, one step, adapters refused where they cannot run, pooling."""

from __future__ import annotations

import pytest
import torch

from pagellm.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from pagellm.core.scheduler import Scheduler
from pagellm.errors import InvalidRequest
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams
from pagellm.worker.model_runner import kv_bytes_per_block
from pagellm.worker.worker import PoolingBatch, Worker


@pytest.fixture(scope="module")
def worker(tiny_llama_dir) -> Worker:
    worker = Worker(ModelConfig(tiny_llama_dir, dtype="float32"))
    worker.load()
    return worker


def test_load_describes_the_model_in_plain_values(worker):
    info = worker.info
    assert (info.task, info.max_position_embeddings, info.hidden_size) == ("generate", 512, 64)
    assert info.vocab_size == worker.model.config.vocab_size and info.compute_dtype == "float32"
    assert info.device == "cpu" and info.labels == () and info.default_pooler is None


def test_kv_blocks_from_an_explicit_count_a_memory_budget_or_the_running_sequences(worker):
    sched = SchedulerConfig(max_num_seqs=3, max_model_len=100)
    assert worker.num_kv_blocks(CacheConfig(block_size=4, num_blocks=7), sched) == 7
    per_block = kv_bytes_per_block(worker.model, 4, worker.kv_dtype(CacheConfig(block_size=4)))
    assert worker.num_kv_blocks(CacheConfig(block_size=4, kv_cache_memory=10 * per_block + 1), sched) == 10
    assert worker.num_kv_blocks(CacheConfig(block_size=4), sched) == 25 * 3  # ceil(100 / 4) per sequence
    with pytest.raises(ValueError, match="too small"):
        worker.num_kv_blocks(CacheConfig(block_size=4, kv_cache_memory=per_block), sched)


def test_execute_samples_one_token_per_scheduled_request(tiny_llama_dir):
    worker = Worker(ModelConfig(tiny_llama_dir, dtype="float32"))
    worker.load()
    cache, sched_config = CacheConfig(block_size=4, num_blocks=16), SchedulerConfig(max_num_seqs=2)
    worker.init_kv_cache(cache, sched_config)
    scheduler = Scheduler(sched_config, cache)
    for rid, ids in (("a", [5, 6, 7]), ("b", [8, 9])):
        scheduler.add_request(Request(rid, ids, SamplingParams(temperature=0, max_tokens=2)))
    out = worker.execute(scheduler.schedule())
    assert sorted(out.sampled_token_ids) == ["a", "b"]
    assert all(0 <= t < worker.info.vocab_size for t in out.sampled_token_ids.values())


def test_lora_is_refused_for_pooling_and_unknown_tasks():
    with pytest.raises(InvalidRequest, match="task='generate' only"):
        Worker(ModelConfig(), "embed", LoRAConfig())
    with pytest.raises(InvalidRequest, match="task must be one of"):
        Worker(ModelConfig(), "rerank")


def test_a_packed_pooling_batch_equals_each_prompt_alone():
    worker = Worker(ModelConfig(dtype="float32"), "embed")  # the bundled MiniLM
    info = worker.load()
    assert info.task == "embed" and info.default_pooler.pooling_type == "mean" and info.max_seq_length == 256
    prompts = [[101, 7592, 2088, 102], [101, 2023, 2003, 1037, 2936, 6251, 102]]
    together = worker.pool(PoolingBatch(prompts, "embed", "mean", True)).rows
    alone = [worker.pool(PoolingBatch([p], "embed", "mean", True)).rows[0] for p in prompts]
    assert len(together) == 2 and len(together[0]) == info.hidden_size
    for a, b in zip(together, alone):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert abs(sum(x * x for x in together[0]) - 1.0) < 1e-5  # normalized


def test_a_classify_batch_with_embedding_gives_both_from_one_forward(tmp_path):
    """Issue 17: the probabilities of a plain classify batch, and the embedding an embed worker on the same
    folder gives; a `pagellm finetune` classifier's own pooling (classifier_pooling) is its embedding default."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pagellm.model_source import bundled_encoder_path
    from pagellm.pooling_params import PoolerConfig

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_encoder_path()), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    config.classifier_pooling, config.architectures = "mean", ["BertForSequenceClassification"]
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    classifier = Worker(ModelConfig(model=str(tmp_path), dtype="float32"), "classify")
    assert classifier.load().default_pooler == PoolerConfig("mean", True)
    embedder = Worker(ModelConfig(model=str(tmp_path), dtype="float32"), "embed")
    embedder.load()
    prompts = [[101, 7592, 2088, 102], [101, 2023, 2003, 1037, 2936, 6251, 102]]
    plain = classifier.pool(PoolingBatch(prompts, "classify"))
    both = classifier.pool(PoolingBatch(prompts, "classify", "mean", True, with_embedding=True))
    assert plain.embeddings is None and both.embeddings is not None
    torch.testing.assert_close(torch.tensor(both.rows), torch.tensor(plain.rows), atol=1e-6, rtol=1e-6)
    expected = embedder.pool(PoolingBatch(prompts, "embed", "mean", True)).rows
    torch.testing.assert_close(torch.tensor(both.embeddings), torch.tensor(expected), atol=1e-5, rtol=1e-5)
