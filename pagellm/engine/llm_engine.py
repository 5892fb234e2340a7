"""LLMEngine: the synchronous engine, one path for every task.

generate: input processing, core steps (scheduler + worker), output processing. embed / classify: the same
input processor, prompts packed into flat batches for the worker's `pool` (no scheduler, no KV cache).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from pagellm.config import CacheConfig, LoRAConfig, ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
from pagellm.engine.engine_core import EngineCore
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.output_processor import OutputProcessor
from pagellm.engine.spec_decode import SpecDecodeStats
from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.pooling_params import PoolerConfig
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams
from pagellm.structured_output.manager import StructuredOutputManager
from pagellm.tokenizer import load_hf_tokenizer, load_tokenizer
from pagellm.worker.worker import GENERATE_TASK, AdapterInfo, ModelInfo, PoolingBatch, PoolingRows, build_worker

logger = logging.getLogger(__name__)

# Pooling: the most tokens one packed forward takes (an encoder sees each prompt once, whole, so this only
# bounds activation memory)
DEFAULT_POOLING_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt validated once, ready for the scheduler: the text, the token ids and the adapter's place."""

    text: str | None
    prompt_ids: list[int]
    lora_id: int = 0
    num_virtual_tokens: int = 0  # prefix tuning: placeholder positions ahead of the prompt


class LLMEngine:
    """Owns the worker (through the core), the tokenizer and the input/output processing of one model."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, lora_config: LoRAConfig | None = None,
                 task: str = GENERATE_TASK, pooler_config: PoolerConfig | None = None,
                 speculative_config: SpeculativeConfig | None = None,
                 parallel_config: ParallelConfig | None = None) -> None:
        self.model_config = model_config
        self.task = task
        self.worker = build_worker(model_config, task, lora_config, parallel_config)  # tensor parallel: processes
        self.info: ModelInfo = self.worker.load()
        self.source = self.info.source
        self.lora_config = lora_config
        self.lora_requests: dict[int, LoRARequest] = {}  # registered adapters by lora_int_id
        self._adapters: dict[int, AdapterInfo] = {}
        self._ids = itertools.count()
        scheduler_config = scheduler_config or SchedulerConfig()
        if self.is_pooling:
            if speculative_config is not None:
                raise InvalidRequest("speculative decoding applies to task='generate' only",
                                     param="speculative_config")
            self._init_pooling(model_config, scheduler_config, pooler_config)
        else:
            self._init_generate(model_config, cache_config or CacheConfig(), scheduler_config, lora_config,
                                speculative_config)
        self.load_time = self.info.load_time
        logger.info("loaded %s for %s (%s, %s) in %.1fs", self.source.name, task, self.info.dtype, self.info.device,
                    self.load_time)

    def _init_generate(self, model_config: ModelConfig, cache_config: CacheConfig,
                       scheduler_config: SchedulerConfig, lora_config: LoRAConfig | None,
                       speculative_config: SpeculativeConfig | None) -> None:
        info = self.info
        self.tokenizer = load_tokenizer(self.source, model_config.tokenizer)
        max_len = model_config.max_model_len or info.max_position_embeddings
        if max_len > info.max_position_embeddings:
            raise InvalidRequest(f"max_model_len {max_len} exceeds the model's {info.max_position_embeddings}",
                                 param="max_model_len")
        self.max_model_len = max_len
        scheduler_config = replace(scheduler_config, max_model_len=max_len,
                                   max_loras=lora_config.max_loras if lora_config else 0)
        cache_config = replace(cache_config, num_blocks=self.worker.num_kv_blocks(cache_config, scheduler_config))
        self.worker.init_kv_cache(cache_config, scheduler_config)
        self.scheduler_config, self.cache_config = scheduler_config, cache_config
        self.core: EngineCore | None = EngineCore(self.worker, scheduler_config, cache_config, speculative_config)
        eos = self.tokenizer.eos_token_id
        self.eos_token_id = eos if eos is not None else info.eos_token_id
        pool_tokens = cache_config.num_blocks * cache_config.block_size
        self.input_processor = InputProcessor(self.tokenizer, max_len, info.vocab_size, pool_tokens)
        self.output_processor = OutputProcessor(self.tokenizer)
        # NOTE: the grammar library and the tokenizer info load on the first constrained request
        self.structured_output = StructuredOutputManager(self.tokenizer, info.vocab_size, [self.eos_token_id])

    def _init_pooling(self, model_config: ModelConfig, scheduler_config: SchedulerConfig,
                      pooler_config: PoolerConfig | None) -> None:
        info = self.info
        self.tokenizer = load_hf_tokenizer(self.source, model_config.tokenizer)
        self.max_model_len = self._pooling_max_len(model_config.max_model_len)
        self.scheduler_config, self.cache_config, self.core = scheduler_config, None, None
        # NOTE: no KV cache bounds a pooling batch, so it takes at least the default and one whole prompt
        self.max_num_batched_tokens = max(scheduler_config.max_num_batched_tokens, DEFAULT_POOLING_BATCHED_TOKENS,
                                          self.max_model_len)
        self.pooler_config = (pooler_config or PoolerConfig()).merged_over(info.default_pooler)
        self.labels = list(info.labels)
        self.input_processor = InputProcessor(self.tokenizer, self.max_model_len, info.vocab_size, pooling=True)

    def _pooling_max_len(self, requested: int | None) -> int:
        limit = self.info.max_position_embeddings
        if requested is not None:
            if not 0 < requested <= limit:
                raise InvalidRequest(f"max_model_len {requested} must be in [1, {limit}] for this model",
                                     param="max_model_len")
            return requested
        st_len = self.info.max_seq_length
        return st_len if st_len is not None and st_len < limit else limit

    @property
    def is_pooling(self) -> bool:
        return self.worker.is_pooling

    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def context_limit(self) -> int:
        return self.input_processor.context_limit

    def next_request_id(self) -> str:
        return str(next(self._ids))

    # ---- generation requests ----------------------------------------------------------------
    def _require_generate(self, what: str) -> EngineCore:
        if self.core is None:
            raise InvalidRequest(f"{what} needs a generate model; this engine runs task {self.task!r}", param="task")
        return self.core

    def process_inputs(self, prompt: PromptType, params: SamplingParams,
                       lora_request: LoRARequest | None = None) -> ProcessedPrompt:
        """Validate a prompt and its parameters once (InvalidRequest); safe off the engine thread."""
        self._require_generate("generation")
        text, prompt_ids = self.input_processor.process(prompt, params)
        if params.structured_outputs is not None:
            self.structured_output.prepare(params.structured_outputs)  # InvalidRequest before anything is queued
        lora_id = lora_request.lora_int_id if lora_request is not None else 0
        adapter = self._adapters.get(lora_id) if lora_id else None
        num_virtual = adapter.num_virtual_tokens if adapter is not None else 0
        if num_virtual and len(prompt_ids) + num_virtual >= self.max_model_len:
            raise InvalidRequest(f"the prompt ({len(prompt_ids)} tokens) plus the adapter's {num_virtual} virtual "
                                 f"tokens leave no room in max_model_len {self.max_model_len}", param="prompt")
        return ProcessedPrompt(text, prompt_ids, lora_id, num_virtual)

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                    cache_salt: str | None = None) -> None:
        """Enqueue a prompt (validated here unless process_inputs already did); n > 1 becomes n child
        requests sharing the prompt."""
        core = self._require_generate("add_request")
        if self.output_processor.has_request(request_id):
            raise InvalidRequest(f"request id {request_id!r} is already in use", param="request_id")
        if lora_request is not None and self.lora_requests.get(lora_request.lora_int_id) != lora_request:
            self.add_lora(lora_request)  # new, or refused when the id names another adapter
        if isinstance(prompt, ProcessedPrompt):
            # NOTE: processed before its adapter was registered (just above), it may lack the virtual tokens
            adapter = self._adapters.get(prompt.lora_id)
            stale = adapter is not None and adapter.num_virtual_tokens != prompt.num_virtual_tokens
            processed = self.process_inputs({"prompt": prompt.text, "prompt_token_ids": prompt.prompt_ids}, params,
                                            lora_request) if stale else prompt
        else:
            processed = self.process_inputs(prompt, params, lora_request)
        children = (
            {request_id: params} if params.n == 1
            else {f"{request_id}-{i}": params.clone_for_child(i) for i in range(params.n)}
        )
        num_virtual = processed.num_virtual_tokens
        self.output_processor.add_request(request_id, processed.text, processed.prompt_ids, children, arrival_time)
        # NOTE: a prefix-tuning adapter's virtual tokens lead the sequence as placeholder ids; the runner
        # writes the adapter's keys/values over theirs, so real tokens sit at positions num_virtual, ...
        engine_prompt_ids = [0] * num_virtual + processed.prompt_ids
        for child_id, child_params in children.items():
            if num_virtual and child_params.prompt_logprobs is not None:
                child_params = replace(child_params,
                                       prompt_logprobs_start=(child_params.prompt_logprobs_start or 1) + num_virtual)
            req = Request(child_id, engine_prompt_ids, child_params, eos_token_id=self.eos_token_id,
                          arrival_time=arrival_time, priority=priority, lora_id=processed.lora_id,
                          cache_salt=cache_salt)
            if child_params.structured_outputs is not None:
                req.structured_output = self.structured_output.grammar_for(child_params.structured_outputs)
            core.add_request(req)  # NOTE: the scheduler clamps max_tokens to the context window, once

    # ---- LoRA adapters ---------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> AdapterInfo:
        """Load and register a PEFT adapter (kept in memory; put into a compute slot when used)."""
        self._require_generate("add_lora")
        known = self.lora_requests.get(lora_request.lora_int_id)
        if known is not None and known != lora_request:
            raise InvalidRequest(f"lora_int_id {lora_request.lora_int_id} is already used by {known.lora_name!r}",
                                 param="lora_request")
        adapter = self.worker.add_adapter(lora_request)
        self.lora_requests[lora_request.lora_int_id] = lora_request
        self._adapters[lora_request.lora_int_id] = adapter
        return adapter

    def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter; refused while unfinished requests use it."""
        if lora_id not in self.lora_requests:
            return False
        if any(r.lora_id == lora_id for r in self.core.scheduler.requests.values()):
            raise InvalidRequest(f"LoRA adapter {self.lora_requests[lora_id].lora_name!r} is in use by "
                                 "unfinished requests", param="lora_name")
        self.worker.remove_adapter(lora_id)
        del self.lora_requests[lora_id]
        del self._adapters[lora_id]
        return True

    def lora_adapter_task(self, lora_id: int) -> dict | None:
        """The adapter's pagellm_task.json (e.g. a classification adapter's labels), if it has one."""
        adapter = self._adapters.get(lora_id)
        return adapter.task if adapter is not None else None

    # ---- stepping --------------------------------------------------------------------------
    def abort_request(self, request_ids: list[str]) -> list[RequestOutput]:
        if self.core is None:
            return []
        outs = []
        for rid in request_ids:
            children = self.output_processor.child_ids(rid)
            self.core.abort_requests(children)
            out = self.output_processor.abort(rid)
            if out is not None:
                outs.append(out)
        return outs

    def abort_all(self) -> list[str]:
        """Abort every request the engine holds; returns the ids of those the caller knew (parents)."""
        if self.core is None:
            return []
        parent_ids = list(self.output_processor.requests)
        if parent_ids:
            self.abort_request(parent_ids)
        # NOTE: a request the output processor already forgot may still sit in the scheduler after
        # a failed step; abort those by their own ids so no KV block stays allocated.
        leftover = list(self.core.scheduler.requests)
        if leftover:
            self.core.abort_requests(leftover)
        return parent_ids

    def has_unfinished_requests(self) -> bool:
        return self.core is not None and self.core.has_unfinished_requests()

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """A copy of the speculative-decoding counters; None when speculation is off."""
        speculator = self.core.speculator if self.core is not None else None
        if speculator is None:
            return None
        stats = speculator.stats
        return SpecDecodeStats(stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
                               list(stats.accepted_per_position))

    def reset_prefix_cache(self) -> bool:
        return self._require_generate("reset_prefix_cache").scheduler.reset_prefix_cache()

    def step(self) -> list[RequestOutput]:
        core = self._require_generate("step")
        core_outputs = core.step()
        outputs, stopped = self.output_processor.process(core_outputs)
        if stopped:
            core.finish_requests(stopped)
        return outputs

    # ---- pooling ---------------------------------------------------------------------------
    def _require_pooling(self, task: str) -> None:
        if self.task != task:
            raise InvalidRequest(f"{task} needs a model loaded with task={task!r}; this engine runs task "
                                 f"{self.task!r}", param="task")

    def process_pooling_prompts(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None
                                ) -> tuple[list[str | None], list[list[int]]]:
        """(texts, token ids) of prompts to embed or classify, all validated before any is computed."""
        if not self.is_pooling:
            raise InvalidRequest(f"embedding and classification models take task 'embed' or 'classify'; this "
                                 f"engine runs task {self.task!r}", param="task")
        if not prompts:
            raise InvalidRequest("no prompts given", param="prompt")
        processed = self.input_processor.process_pooling_batch(list(prompts), truncate_prompt_tokens)
        return [text for text, _ in processed], [ids for _, ids in processed]

    def embed(self, prompt_ids: Sequence[list[int]], normalize: bool | None = None,
              use_tqdm: bool = False) -> list[list[float]]:
        """One pooled vector per prompt, in input order."""
        self._require_pooling("embed")
        return self._pool(prompt_ids, "embed", use_tqdm, normalize).rows

    def classify(self, prompt_ids: Sequence[list[int]], use_tqdm: bool = False) -> list[list[float]]:
        """Per-label probabilities per prompt, in input order."""
        self._require_classify()
        return self._pool(prompt_ids, "classify", use_tqdm).rows

    def classify_and_embed(self, prompt_ids: Sequence[list[int]], normalize: bool | None = None,
                           use_tqdm: bool = False) -> tuple[list[list[float]], list[list[float]]]:
        """(probabilities, embeddings) per prompt from one forward each; the embedding is pooled and normalized
        by this engine's PoolerConfig (`normalize` overrides it), as `embed` on the same folder would be."""
        self._require_classify()
        out = self._pool(prompt_ids, "classify", use_tqdm, normalize, with_embedding=True)
        assert out.embeddings is not None
        return out.rows, out.embeddings

    def _require_classify(self) -> None:
        if self.task != "classify":
            raise InvalidRequest("classify() needs LLM(task='classify') and a *ForSequenceClassification model",
                                 param="task")

    def _pool(self, prompt_ids: Sequence[list[int]], kind: str, use_tqdm: bool, normalize: bool | None = None,
              with_embedding: bool = False) -> PoolingRows:
        """Packed batches through the worker; rows (and embeddings when asked) in input order."""
        norm = bool(self.pooler_config.normalize if normalize is None else normalize)
        embeds = kind == "embed" or with_embedding
        rows: list[list[float]] = [[] for _ in prompt_ids]
        embeddings: list[list[float]] | None = [[] for _ in prompt_ids] if with_embedding else None
        bar = tqdm(total=len(prompt_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            for batch in self._pack(prompt_ids):
                out = self.worker.pool(PoolingBatch(
                    [list(prompt_ids[i]) for i in batch], kind, self.pooler_config.pooling_type if embeds else None,
                    norm if embeds else False, with_embedding))
                for j, i in enumerate(batch):
                    rows[i] = out.rows[j]
                    if embeddings is not None and out.embeddings is not None:
                        embeddings[i] = out.embeddings[j]
                bar.update(len(batch))
        finally:
            bar.close()
        return PoolingRows(rows, embeddings)

    def _pack(self, prompt_ids: Sequence[list[int]]) -> Iterator[list[int]]:
        """Consecutive prompt indices whose token total fits max_num_batched_tokens."""
        batch: list[int] = []
        num_tokens = 0
        for i, ids in enumerate(prompt_ids):
            if batch and num_tokens + len(ids) > self.max_num_batched_tokens:
                yield batch
                batch, num_tokens = [], 0
            batch.append(i)
            num_tokens += len(ids)
        if batch:
            yield batch
