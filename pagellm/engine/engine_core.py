"""EngineCore: schedule -> execute -> update, one step at a time."""

from __future__ import annotations

import logging

import torch

from pagellm.config import CacheConfig, LoRAConfig, SchedulerConfig
from pagellm.core.scheduler import Scheduler
from pagellm.outputs import EngineCoreOutput
from pagellm.request import Request, RequestStatus
from pagellm.worker.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MEMORY = 2 << 30  # 2 GiB


def size_kv_cache(model: torch.nn.Module, cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                  dtype: torch.dtype) -> int:
    """Number of KV blocks: explicit, else from kv_cache_memory, else enough for every running
    sequence at full context, capped at DEFAULT_KV_CACHE_MEMORY."""
    if cache_config.num_blocks is not None:
        return cache_config.num_blocks
    per_block = kv_bytes_per_block(model, cache_config.block_size, dtype)
    if cache_config.kv_cache_memory is not None:
        num_blocks = cache_config.kv_cache_memory // per_block
    else:
        blocks_per_seq = -(-scheduler_config.max_model_len // cache_config.block_size)
        wanted = blocks_per_seq * scheduler_config.max_num_seqs
        num_blocks = min(wanted, DEFAULT_KV_CACHE_MEMORY // per_block)
    if num_blocks < 2:
        raise ValueError(f"kv_cache_memory is too small for even two blocks of {per_block} bytes")
    return int(num_blocks)


class EngineCore:
    """Owns the scheduler and the model runner; knows nothing of text."""

    def __init__(self, model: torch.nn.Module, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 dtype: torch.dtype, lora_config: LoRAConfig | None = None, compile: bool = False,
                 kv_dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        assert cache_config.num_blocks is not None, "size the KV cache before building the core"
        self.scheduler = Scheduler(scheduler_config, cache_config)
        self.runner = ModelRunner(model, cache_config.num_blocks, cache_config.block_size, dtype, lora_config,
                                  compile=compile, max_num_seqs=scheduler_config.max_num_seqs, kv_dtype=kv_dtype,
                                  device=device)
        logger.info("KV cache: %d blocks of %d tokens", cache_config.num_blocks, cache_config.block_size)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def finish_requests(self, req_ids: list[str]) -> None:
        """Finish requests that hit a stop string (detected after detokenization)."""
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        sched_out = self.scheduler.schedule()
        runner_out = self.runner.execute(sched_out)
        if sched_out.is_empty:
            return []
        return self.scheduler.update_from_output(sched_out, runner_out)
