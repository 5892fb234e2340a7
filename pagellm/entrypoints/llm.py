"""LLM: the offline Python API, shaped like vLLM's so users can switch with no surprise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pagellm.config import (
    DEFAULT_DECODE_STALL_RATIO,
    DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING,
    CacheConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from pagellm.engine.input_processor import PromptType
from pagellm.engine.label_scorer import LabelScorer, score_with_engine
from pagellm.engine.llm_engine import LLMEngine
from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.pooling_outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
)
from pagellm.pooling_params import POOLING_TASKS, PoolerConfig, PoolingParams
from pagellm.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    ``LLM()`` loads the bundled SmolLM2-135M-Instruct GGUF; ``model`` takes an HF folder or a
    .gguf file. Keyword arguments mirror vLLM's engine arguments.

    ``task="embed"`` or ``"classify"`` loads a pooling model instead (an encoder, ``LLM(task="embed")``: the
    bundled all-MiniLM-L6-v2; or a Llama-family decoder run without KV cache, pooled at the last token) for
    `embed` / `classify`; no decoder engine or KV cache is built then, and
    ``pooler_config`` overrides the pooling type and normalization the model folder declares.

    ``device``: "auto" (cuda when torch.cuda.is_available(), else cpu), "cpu", "cuda" or "cuda:N". On a GPU the
    weights, KV cache and step inputs live there and every layer runs its torch path (no C++ kernels); a GGUF
    loads dequantized, and --quantization int8/int4, --compile and LoRA raise there for now.

    ``tensor_parallel_size=N`` splits the model over N worker processes (torch.distributed: gloo on the CPU,
    nccl on CUDA; docs/distributed.md). They are spawned, so a script that builds it needs an
    ``if __name__ == "__main__":`` guard.
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
        max_prefill_tokens_while_decoding: int = DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING,
        decode_stall_ratio: float = DEFAULT_DECODE_STALL_RATIO,
        seed: int = 0,
        task: str = "generate",
        pooler_config: PoolerConfig | None = None,
        enable_lora: bool = False,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        quantization: str | None = "auto",
        kv_cache_dtype: str = "auto",
        compile: bool = False,
        device: str = "auto",
        speculative_config: dict | str | None = None,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
    ) -> None:
        self.task = task
        if task != "generate" and task not in POOLING_TASKS:
            raise InvalidRequest(f"task must be one of generate, {', '.join(POOLING_TASKS)}; got {task!r}", "task")
        # NOTE: one engine for every task; a pooling model has no scheduler and no KV cache
        self.llm_engine = LLMEngine(
            ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, seed=seed,
                        quantization=quantization, compile=compile, device=device),
            CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
                        enable_prefix_caching=enable_prefix_caching, cache_dtype=kv_cache_dtype),
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            policy=scheduling_policy,  # type: ignore[arg-type]
                            max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding,
                            decode_stall_ratio=decode_stall_ratio),
            LoRAConfig(max_loras=max_loras, max_lora_rank=max_lora_rank) if enable_lora else None,
            task=task, pooler_config=pooler_config,
            speculative_config=SpeculativeConfig.from_dict(speculative_config),
            parallel_config=ParallelConfig(tensor_parallel_size, distributed_executor_backend),
        )

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def _require_generate(self) -> None:
        if self.task != "generate":
            raise InvalidRequest(f"this LLM was built with task={self.task!r}; generate and chat need "
                                 "task='generate'", param="task")

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; prompts are str, token-id lists or prompt dicts.

        ``lora_request`` applies one adapter to every prompt, or gives one (or None) per prompt.
        """
        self._require_generate()
        prompt_list = _as_prompt_list(prompts)
        return self._run(prompt_list, sampling_params, use_tqdm, priority, lora_request)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
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
        return self._run(prompts, sampling_params, use_tqdm, None, lora_request)

    def _run(self, prompts: list[PromptType], sampling_params, use_tqdm: bool,
             priority: list[int] | None, lora_request=None) -> list[RequestOutput]:
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
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        # NOTE: generate returns final outputs only; the engine then skips the per-step cumulative ones
        final = {id(p): replace(p, final_output_only=True) for p in params_list}
        params_list = [final[id(p)] for p in params_list]
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                rid = engine.next_request_id()
                engine.add_request(rid, prompt, params, priority=priority[i] if priority else 0,
                                   lora_request=loras[i])
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # a bad prompt must not leave the good ones queued
            raise
        return self._run_engine(ids, use_tqdm)

    def _run_engine(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm  # NOTE: here, not at the top: ~35 ms of `pagellm generate`'s start

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
        labels: Sequence[str] | None = None,
        instruction: str | None = None,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
        pooling_params: PoolingParams | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Per-label probabilities per prompt: `.outputs.probs[i]` is class id i, named by
        `.outputs.labels[i]` (config.id2label); `.outputs.label_probs` maps name -> probability.

        `pooling_params=PoolingParams(return_embedding=True)` also fills `.outputs.embedding` with the
        prompt's pooled vector from the same forward pass (pooled and normalized as `embed` of the same
        folder would; `PoolingParams.normalize` overrides): a frozen-encoder head then gives its base
        encoder's embedding and the class probabilities in one encoder pass.

        With task='generate' it is zero-shot: each text's `labels` are scored by their log-likelihood
        after one prompt (pagellm.label_prompt, with `instruction` if given) and softmaxed; probs are
        in `labels` order.
        """
        if self.task == "generate":
            if pooling_params is not None:
                raise InvalidRequest("pooling_params are for classification models (LLM(task='classify')); "
                                     "zero-shot classification pools nothing", param="pooling_params")
            return self._classify_zero_shot(prompts, labels, instruction, truncate_prompt_tokens, use_tqdm,
                                            lora_request)
        if labels is not None or instruction is not None:
            raise InvalidRequest("labels and instruction are for zero-shot classification with LLM(task='generate'); "
                                 "a classification model has its own labels", param="labels")
        if lora_request is not None:
            raise InvalidRequest("LoRA adapters apply to task='generate' only", param="lora_request")
        engine = self._require_pooling("classify", ("classify",))
        texts, ids = self._process_pooling_prompts(engine, prompts, truncate_prompt_tokens)
        embeddings: list[list[float] | None]
        if pooling_params is not None and pooling_params.return_embedding:
            probs, vectors = engine.classify_and_embed(ids, normalize=pooling_params.normalize, use_tqdm=use_tqdm)
            embeddings = list(vectors)
        else:
            probs, embeddings = engine.classify(ids, use_tqdm=use_tqdm), [None] * len(ids)
        return [ClassificationRequestOutput(engine.next_request_id(), text, prompt_ids,
                                            ClassificationOutput(row, list(engine.labels), vector))
                for text, prompt_ids, row, vector in zip(texts, ids, probs, embeddings)]

    def _classify_zero_shot(self, prompts: str | Sequence[str], labels: Sequence[str] | None,
                            instruction: str | None, truncate_prompt_tokens: int | None, use_tqdm: bool,
                            lora_request: LoRARequest | None) -> list[ClassificationRequestOutput]:
        if labels is None:
            raise InvalidRequest("classify() on a task='generate' LLM is zero-shot: pass labels=[...] (or load a "
                                 "*ForSequenceClassification model with task='classify')", param="labels")
        if truncate_prompt_tokens is not None:
            raise InvalidRequest("truncate_prompt_tokens is not supported for zero-shot classification",
                                 param="truncate_prompt_tokens")
        engine = self.llm_engine
        scorer = LabelScorer(engine.tokenizer, labels, instruction)
        plans = scorer.plans([prompts] if isinstance(prompts, str) else list(prompts),
                             engine.input_processor.check_token_ids)
        probs = score_with_engine(engine, plans, lora_request, use_tqdm)
        return [ClassificationRequestOutput(engine.next_request_id(), plan.text, plan.prompt_ids,
                                            ClassificationOutput(row, list(scorer.labels)))
                for plan, row in zip(plans, probs)]

    def _require_pooling(self, method: str, tasks: tuple[str, ...]) -> LLMEngine:
        if self.task not in tasks:
            raise InvalidRequest(f"{method}() needs LLM(task={tasks[0]!r}); this LLM was built with "
                                 f"task={self.task!r}", param="task")
        return self.llm_engine

    @staticmethod
    def _process_pooling_prompts(engine: LLMEngine, prompts, truncate_prompt_tokens: int | None
                                 ) -> tuple[list[str | None], list[list[int]]]:
        return engine.process_pooling_prompts(_as_prompt_list(prompts), truncate_prompt_tokens)


def _per_prompt(value, num_prompts: int, name: str) -> list:
    """One value for all prompts, or a list with one per prompt."""
    if value is None or not isinstance(value, list | tuple):
        return [value] * num_prompts
    if len(value) != num_prompts:
        raise InvalidRequest(f"{name} must be one object or one per prompt", param=name)
    return list(value)


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
