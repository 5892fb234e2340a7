"""LLM: the offline Python API, shaped like vLLM's so users can switch with no surprise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagellm.config import CacheConfig, ModelConfig, SchedulerConfig
from pagellm.engine.input_processor import PromptType
from pagellm.engine.llm_engine import LLMEngine
from pagellm.engine.pooling_engine import POOLING_TASKS, PoolingEngine
from pagellm.errors import InvalidRequest
from pagellm.outputs import RequestOutput
from pagellm.pooling_outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
)
from pagellm.pooling_params import PoolerConfig, PoolingParams
from pagellm.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    ``LLM()`` loads the bundled SmolLM2-135M-Instruct GGUF; ``model`` takes an HF folder or a
    .gguf file. Keyword arguments mirror vLLM's engine arguments.

    ``task="embed"`` or ``"classify"`` loads an encoder instead (``LLM(task="embed")``: the bundled
    all-MiniLM-L6-v2) for `embed` / `classify`; no decoder engine or KV cache is built then, and
    ``pooler_config`` overrides the pooling type and normalization the model folder declares.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "fcfs",
        seed: int = 0,
        task: str = "generate",
        pooler_config: PoolerConfig | None = None,
    ) -> None:
        self.task = task
        self.llm_engine: LLMEngine | None = None
        self.pooling_engine: PoolingEngine | None = None
        if task in POOLING_TASKS:
            # NOTE: encoders see each prompt once, whole: no KV cache, so the token budget only bounds
            # activation memory and defaults higher than the decoder's.
            self.pooling_engine = PoolingEngine(
                ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, seed=seed),
                task, pooler_config, max_num_batched_tokens=max(max_num_batched_tokens, 8192),
            )
            return
        if task != "generate":
            raise InvalidRequest(f"task must be one of generate, {', '.join(POOLING_TASKS)}; got {task!r}", "task")
        self.llm_engine = LLMEngine(
            ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, seed=seed),
            CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
                        enable_prefix_caching=enable_prefix_caching),
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            policy=scheduling_policy),
        )

    def get_tokenizer(self):
        if self.pooling_engine is not None:
            return self.pooling_engine.tokenizer
        return self.llm_engine.tokenizer

    def _require_generate(self) -> None:
        if self.llm_engine is None:
            raise InvalidRequest(f"this LLM was built with task={self.task!r}; generate and chat need "
                                 "task='generate'", param="task")

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; prompts are str, token-id lists or prompt dicts."""
        self._require_generate()
        prompt_list = _as_prompt_list(prompts)
        return self._run(prompt_list, sampling_params, use_tqdm, priority)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list, then generate."""
        self._require_generate()
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        processor = self.llm_engine.input_processor
        prompts: list[PromptType] = []
        for conv in conversations:
            text = processor.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                **(chat_template_kwargs or {}),
            )
            # NOTE: the template already holds the special tokens; don't add a BOS twice.
            prompts.append({"prompt": text, "prompt_token_ids": processor.tokenize(text, add_special_tokens=False)})
        return self._run(prompts, sampling_params, use_tqdm, None)

    def _run(self, prompts: list[PromptType], sampling_params, use_tqdm: bool,
             priority: list[int] | None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise InvalidRequest("sampling_params must be one object or one per prompt", "sampling_params")
        if priority is not None and len(priority) != len(prompts):
            raise InvalidRequest("priority must have one value per prompt", param="priority")
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                rid = engine.next_request_id()
                engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # a bad prompt must not leave the good ones queued
            raise
        return self._run_engine(ids, use_tqdm)

    def _run_engine(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]


    # ---- pooling tasks (vLLM's LLM.embed / LLM.classify) ----------------------------------
    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One pooled vector per prompt (`.outputs.embedding`, a list of floats), in input order.

        Prompts are str, token-id lists (used as given: include [CLS]/[SEP]) or prompt dicts. An
        input over the model's limit raises InvalidRequest unless `truncate_prompt_tokens` (k, or -1
        for the limit) keeps k tokens, cut on the tokenizer's truncation side.
        """
        engine = self._require_pooling("embed", ("embed",))
        texts, ids = self._process_pooling_prompts(engine, prompts, truncate_prompt_tokens)
        normalize = pooling_params.normalize if pooling_params is not None else None
        vectors = engine.embed(ids, normalize=normalize, use_tqdm=use_tqdm)
        return [EmbeddingRequestOutput(engine.next_request_id(), text, prompt_ids, EmbeddingOutput(vector))
                for text, prompt_ids, vector in zip(texts, ids, vectors)]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ClassificationRequestOutput]:
        """Per-label probabilities per prompt: `.outputs.probs[i]` is class id i, named by
        `.outputs.labels[i]` (config.id2label); `.outputs.label_probs` maps name -> probability."""
        engine = self._require_pooling("classify", ("classify",))
        texts, ids = self._process_pooling_prompts(engine, prompts, truncate_prompt_tokens)
        probs = engine.classify(ids, use_tqdm=use_tqdm)
        return [ClassificationRequestOutput(engine.next_request_id(), text, prompt_ids,
                                            ClassificationOutput(row, list(engine.labels)))
                for text, prompt_ids, row in zip(texts, ids, probs)]

    def _require_pooling(self, method: str, tasks: tuple[str, ...]) -> PoolingEngine:
        if self.pooling_engine is None or self.task not in tasks:
            raise InvalidRequest(f"{method}() needs LLM(task={tasks[0]!r}); this LLM was built with "
                                 f"task={self.task!r}", param="task")
        return self.pooling_engine

    @staticmethod
    def _process_pooling_prompts(engine: PoolingEngine, prompts, truncate_prompt_tokens: int | None
                                 ) -> tuple[list[str | None], list[list[int]]]:
        prompt_list = _as_prompt_list(prompts)
        if not prompt_list:
            raise InvalidRequest("no prompts given", param="prompt")
        processed = [engine.process_prompt(p, truncate_prompt_tokens) for p in prompt_list]
        return [text for text, _ in processed], [ids for _, ids in processed]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
