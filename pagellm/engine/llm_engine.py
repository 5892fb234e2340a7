"""LLMEngine: the synchronous engine (input processing, core steps, output processing)."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace

import torch

from pagellm.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from pagellm.engine.engine_core import EngineCore, size_kv_cache
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.output_processor import OutputProcessor
from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest
from pagellm.model.layers.quant import SCHEMES
from pagellm.model.loader.model_loader import load_model, resolve_device, resolve_dtype, resolve_quantization
from pagellm.model.loader.peft_loader import load_lora_adapter, load_prefix_adapter, read_adapter_config
from pagellm.model.loader.resolve import ModelSource, resolve_model
from pagellm.outputs import RequestOutput
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams
from pagellm.structured_output.manager import StructuredOutputManager
from pagellm.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def _pick_device(model_config: ModelConfig, lora_config: LoRAConfig | None) -> torch.device:
    """The engine's device. NOTE: what only the CPU runs yet (LoRA, --compile, packed int8/int4 weights) keeps
    device "auto" on the CPU, so enabling CUDA changes no such command; asked of cuda explicitly, it raises."""
    cpu_only = {"enable_lora": lora_config is not None, "compile": model_config.compile,
                "quantization": model_config.quantization in SCHEMES}
    if model_config.device == "auto" and any(cpu_only.values()):
        return torch.device("cpu")
    device = resolve_device(model_config.device)
    if device.type != "cpu":
        if cpu_only["enable_lora"]:
            raise InvalidRequest(f"LoRA adapters are not supported on {device.type} yet", param="enable_lora")
        if cpu_only["compile"]:
            raise InvalidRequest(f"--compile is not supported on {device.type} yet", param="compile")
    return device  # NOTE: resolve_quantization refuses an explicit int8/int4 off the CPU


class LLMEngine:
    """Loads model + tokenizer, accepts requests, and steps them to completion."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, lora_config: LoRAConfig | None = None) -> None:
        t0 = time.perf_counter()
        self.model_config = model_config
        self.device = _pick_device(model_config, lora_config)
        self.source: ModelSource = resolve_model(model_config.model)
        self.dtype = resolve_dtype(model_config.dtype)
        torch.manual_seed(model_config.seed)
        self.tokenizer = load_tokenizer(self.source, model_config.tokenizer)
        quantization = resolve_quantization(self.source, model_config.quantization, model_config.dtype, self.device)
        self.model = load_model(self.source, self.dtype, quantization, self.device)
        self.compute_dtype = self.model.embed_tokens.weight.dtype  # activations
        # NOTE: "auto" stores keys/values in the model's dtype, which can be narrower than the activations:
        # a bf16 model on a CPU without native bf16 computes in float32 but keeps a bf16 cache (half the
        # memory, and W2 measured faster: less to read per decode step)
        self.kv_dtype = self.dtype if cache_config.cache_dtype == "auto" else resolve_dtype(cache_config.cache_dtype)
        hf_config = self.model.config
        max_len = model_config.max_model_len or hf_config.max_position_embeddings
        if max_len > hf_config.max_position_embeddings:
            raise InvalidRequest(
                f"max_model_len {max_len} exceeds the model's {hf_config.max_position_embeddings}",
                param="max_model_len",
            )
        self.max_model_len = max_len
        scheduler_config = replace(scheduler_config, max_model_len=max_len,
                                   max_loras=lora_config.max_loras if lora_config else 0)
        cache_config = replace(
            cache_config, num_blocks=size_kv_cache(self.model, cache_config, scheduler_config, self.kv_dtype)
        )
        self.scheduler_config, self.cache_config = scheduler_config, cache_config
        self.lora_config = lora_config
        self.core = EngineCore(self.model, scheduler_config, cache_config, self.compute_dtype, lora_config,
                               compile=model_config.compile, kv_dtype=self.kv_dtype, device=self.device)
        self.lora_requests: dict[int, LoRARequest] = {}  # registered adapters by lora_int_id
        self.eos_token_id = self._eos_token_id(hf_config)
        pool_tokens = cache_config.num_blocks * cache_config.block_size
        self.input_processor = InputProcessor(self.tokenizer, max_len, hf_config.vocab_size, pool_tokens)
        self.output_processor = OutputProcessor(self.tokenizer)
        # NOTE: the grammar library and the tokenizer info load on the first constrained request
        self.structured_output = StructuredOutputManager(self.tokenizer, hf_config.vocab_size, [self.eos_token_id])
        self._ids = itertools.count()
        self.load_time = time.perf_counter() - t0
        logger.info("loaded %s (%s, %s) in %.1fs", self.source.name, self.dtype, self.device, self.load_time)

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
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                    cache_salt: str | None = None) -> None:
        """Validate and enqueue a prompt; n > 1 becomes n child requests sharing the prompt."""
        if self.output_processor.has_request(request_id):
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        lora_id = 0
        if lora_request is not None:
            if self.lora_requests.get(lora_request.lora_int_id) != lora_request:
                self.add_lora(lora_request)  # new, or refused when the id names another adapter
            lora_id = lora_request.lora_int_id
        text, prompt_ids = self.input_processor.process(prompt, params)
        if params.structured_outputs is not None:
            self.structured_output.prepare(params.structured_outputs)  # InvalidRequest before anything is queued
        children = (
            {request_id: params} if params.n == 1
            else {f"{request_id}-{i}": params.clone_for_child(i) for i in range(params.n)}
        )
        num_virtual = self.core.runner.lora.num_virtual_tokens(lora_id) if lora_id else 0
        if num_virtual and len(prompt_ids) + num_virtual >= self.max_model_len:
            raise InvalidRequest(f"the prompt ({len(prompt_ids)} tokens) plus the adapter's {num_virtual} virtual "
                                 f"tokens leave no room in max_model_len {self.max_model_len}", param="prompt")
        self.output_processor.add_request(request_id, text, prompt_ids, children, arrival_time)
        # NOTE: a prefix-tuning adapter's virtual tokens lead the sequence as placeholder ids; the runner
        # writes the adapter's keys/values over theirs, so real tokens sit at positions num_virtual, ...
        engine_prompt_ids = [0] * num_virtual + prompt_ids
        for child_id, child_params in children.items():
            if num_virtual and child_params.prompt_logprobs is not None:
                child_params = replace(child_params,
                                       prompt_logprobs_start=(child_params.prompt_logprobs_start or 1) + num_virtual)
            req = Request(child_id, engine_prompt_ids, child_params, eos_token_id=self.eos_token_id,
                          arrival_time=arrival_time, priority=priority, lora_id=lora_id, cache_salt=cache_salt)
            if child_params.structured_outputs is not None:
                req.structured_output = self.structured_output.grammar_for(child_params.structured_outputs)
            room = self.max_model_len - len(engine_prompt_ids)
            req.max_tokens = room if child_params.max_tokens is None else min(child_params.max_tokens, room)
            self.core.add_request(req)

    # ---- LoRA adapters ---------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and register a PEFT adapter (kept in memory; put into a compute slot when used)."""
        runner = self.core.runner
        if runner.lora is None:
            raise InvalidRequest("LoRA is not enabled: build the engine with enable_lora=True "
                                 "(pagellm serve --enable-lora or --lora-modules)", param="lora_request")
        known = self.lora_requests.get(lora_request.lora_int_id)
        if known is not None and known != lora_request:
            raise InvalidRequest(f"lora_int_id {lora_request.lora_int_id} is already used by {known.lora_name!r}",
                                 param="lora_request")
        if read_adapter_config(lora_request.lora_path).get("peft_type") == "PREFIX_TUNING":
            prefix = load_prefix_adapter(lora_request.lora_path, len(self.model.layers), self.model.num_kv_heads,
                                         self.model.head_dim, self.compute_dtype)
            runner.lora.add_prefix(lora_request.lora_int_id, prefix)
        else:
            adapter = load_lora_adapter(lora_request.lora_path, len(self.model.layers),
                                        self.lora_config.max_lora_rank, self.compute_dtype)
            runner.lora.add_adapter(lora_request.lora_int_id, adapter)
        self.lora_requests[lora_request.lora_int_id] = lora_request
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter; refused while unfinished requests use it."""
        if lora_id not in self.lora_requests:
            return False
        if any(r.lora_id == lora_id for r in self.core.scheduler.requests.values()):
            raise InvalidRequest(f"LoRA adapter {self.lora_requests[lora_id].lora_name!r} is in use by "
                                 "unfinished requests", param="lora_name")
        self.core.runner.lora.remove_adapter(lora_id)
        del self.lora_requests[lora_id]
        return True

    def list_loras(self) -> list[LoRARequest]:
        return list(self.lora_requests.values())

    def lora_adapter_task(self, lora_id: int) -> dict | None:
        """The adapter's pagellm_task.json (e.g. a classification adapter's labels), if it has one."""
        lora = self.core.runner.lora
        return lora.task_of(lora_id) if lora is not None else None

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
