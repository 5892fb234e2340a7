"""LLMEngine: the synchronous engine (input processing, core steps, output processing)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace

import torch

from pagellm.config import CacheConfig, ModelConfig, SchedulerConfig
from pagellm.engine.engine_core import EngineCore, size_kv_cache
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.output_processor import OutputProcessor
from pagellm.errors import InvalidRequest
from pagellm.model.loader.model_loader import load_model, resolve_dtype
from pagellm.model.loader.resolve import ModelSource, resolve_model
from pagellm.outputs import RequestOutput
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams
from pagellm.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Loads model + tokenizer, accepts requests, and steps them to completion."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig) -> None:
        t0 = time.perf_counter()
        self.model_config = model_config
        self.source: ModelSource = resolve_model(model_config.model)
        self.dtype = resolve_dtype(model_config.dtype)
        torch.manual_seed(model_config.seed)
        self.tokenizer = load_tokenizer(self.source, model_config.tokenizer)
        self.model = load_model(self.source, self.dtype)
        self.compute_dtype = self.model.embed_tokens.weight.dtype  # activations and KV cache
        hf_config = self.model.config
        max_len = model_config.max_model_len or hf_config.max_position_embeddings
        if max_len > hf_config.max_position_embeddings:
            raise InvalidRequest(
                f"max_model_len {max_len} exceeds the model's {hf_config.max_position_embeddings}",
                param="max_model_len",
            )
        self.max_model_len = max_len
        scheduler_config = replace(scheduler_config, max_model_len=max_len)
        cache_config = replace(
            cache_config, num_blocks=size_kv_cache(self.model, cache_config, scheduler_config, self.compute_dtype)
        )
        self.scheduler_config, self.cache_config = scheduler_config, cache_config
        self.core = EngineCore(self.model, scheduler_config, cache_config, self.compute_dtype)
        self.eos_token_id = self._eos_token_id(hf_config)
        pool_tokens = cache_config.num_blocks * cache_config.block_size
        self.input_processor = InputProcessor(self.tokenizer, max_len, hf_config.vocab_size, pool_tokens)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.load_time = time.perf_counter() - t0
        logger.info("loaded %s (%s) in %.1fs", self.source.name, self.dtype, self.load_time)

    def _eos_token_id(self, hf_config) -> int | None:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = hf_config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return eos

    @property
    def model_name(self) -> str:
        return self.source.name

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0,
                    arrival_time: float | None = None, lora_id: int = 0, cache_salt: str | None = None) -> None:
        """Validate and enqueue a prompt; n > 1 becomes n child requests sharing the prompt."""
        if self.output_processor.has_request(request_id):
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        text, prompt_ids = self.input_processor.process(prompt, params)
        children = (
            {request_id: params} if params.n == 1
            else {f"{request_id}-{i}": params.clone_for_child(i) for i in range(params.n)}
        )
        self.output_processor.add_request(request_id, text, prompt_ids, children, arrival_time)
        for child_id, child_params in children.items():
            req = Request(child_id, prompt_ids, child_params, eos_token_id=self.eos_token_id,
                          arrival_time=arrival_time, priority=priority, lora_id=lora_id, cache_salt=cache_salt)
            room = self.max_model_len - len(prompt_ids)
            req.max_tokens = room if child_params.max_tokens is None else min(child_params.max_tokens, room)
            self.core.add_request(req)

    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        outs = []
        for rid in request_ids:
            children = self.output_processor.child_ids(rid)
            self.core.abort_requests(children)
            out = self.output_processor.abort(rid)
            if out is not None:
                outs.append(out)
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        outputs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            self.core.finish_requests(stopped)
        return outputs
