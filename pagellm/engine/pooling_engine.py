"""PoolingEngine: prompts -> packed encoder forwards -> one embedding or class distribution per prompt.

No scheduler and no KV cache: an encoder sees each prompt once, whole. Prompts are packed end to
end into flat batches of at most `max_num_batched_tokens` tokens (no padding).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from pagellm.config import ModelConfig
from pagellm.engine.async_llm import EngineDeadError
from pagellm.engine.input_processor import PromptType
from pagellm.errors import InvalidRequest
from pagellm.model.loader.hf_loader import load_hf_config
from pagellm.model.loader.model_loader import (
    compute_dtype_for,
    load_encoder,
    resolve_device,
    resolve_dtype,
)
from pagellm.model.loader.resolve import ModelSource, resolve_pooling_model
from pagellm.model.models.registry import get_pooling_model_class
from pagellm.model.pooling import classification_probs, maybe_normalize, pool, read_sentence_transformers_pooler
from pagellm.pooling_params import PoolerConfig
from pagellm.tokenizer import load_hf_tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

POOLING_TASKS = ("embed", "classify")
# vLLM's default pooler for encoders without a sentence-transformers config
ENCODER_DEFAULT_POOLER = PoolerConfig(pooling_type="cls", normalize=True)


class PoolingEngine:
    """Owns an encoder, its tokenizer and pooler settings; computes embeddings or class probabilities."""

    def __init__(self, model_config: ModelConfig, task: str, pooler_config: PoolerConfig | None = None,
                 max_num_batched_tokens: int = 8192) -> None:
        t0 = time.perf_counter()
        if task not in POOLING_TASKS:
            raise InvalidRequest(f"pooling task must be one of {', '.join(POOLING_TASKS)}; got {task!r}", "task")
        self.task = task
        self.device = resolve_device(model_config.device)
        self.source: ModelSource = resolve_pooling_model(model_config.model)
        if self.source.format != "hf":
            raise InvalidRequest(f"task {task!r} needs an HF folder (config.json + safetensors); "
                                 f"{self.source.path.name} is a GGUF file", param="model")
        # NOTE: encoders are compute-bound: float32 on CPUs without native bf16 math
        self.dtype = compute_dtype_for(resolve_dtype(model_config.dtype), self.device)
        hf_config = load_hf_config(self.source.path)
        model_cls = get_pooling_model_class(getattr(hf_config, "architectures", None), task)
        self.tokenizer = load_hf_tokenizer(self.source, model_config.tokenizer)
        self.model = load_encoder(model_cls, hf_config, self.source, self.dtype, self.device)
        self.max_model_len = self._max_model_len(hf_config, model_config.max_model_len)
        self.max_num_batched_tokens = max(max_num_batched_tokens, self.max_model_len)
        # NOTE: a model class may declare its own pooling default (decoders: "last", as vLLM does)
        default_type = getattr(model_cls, "default_pooling_type", ENCODER_DEFAULT_POOLER.pooling_type)
        defaults = read_sentence_transformers_pooler(self.source.path) or PoolerConfig(default_type, True)
        self.pooler_config = (pooler_config or PoolerConfig()).merged_over(defaults)
        num_labels = getattr(hf_config, "num_labels", 0)
        id2label = getattr(hf_config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
        self.multi_label = getattr(hf_config, "problem_type", None) == "multi_label_classification"
        self.hidden_size: int = hf_config.hidden_size  # the size of an embedding
        self._ids = itertools.count()
        self.load_time = time.perf_counter() - t0
        logger.info("loaded %s for %s (%s, %s pooling, normalize=%s) in %.1fs", self.source.name, task,
                    self.dtype, self.pooler_config.pooling_type, self.pooler_config.normalize, self.load_time)

    @property
    def model_name(self) -> str:
        return self.source.name

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def _max_model_len(self, hf_config, requested: int | None) -> int:
        limit = hf_config.max_position_embeddings
        if requested is not None:
            if not 0 < requested <= limit:
                raise InvalidRequest(f"max_model_len {requested} must be in [1, {limit}] for this model",
                                     param="max_model_len")
            return requested
        st_config = self.source.path / "sentence_bert_config.json"
        if st_config.is_file():  # sentence-transformers' own limit (256 for MiniLM, below its 512 positions)
            st_len = json.loads(st_config.read_text()).get("max_seq_length")
            if isinstance(st_len, int) and 0 < st_len < limit:
                return st_len
        return limit

    # ---- inputs ----------------------------------------------------------------------------
    def process_prompt(self, prompt: PromptType, truncate_prompt_tokens: int | None = None
                       ) -> tuple[str | None, list[int]]:
        """Return (text or None, token ids), validated against the vocabulary and max_model_len."""
        keep = self._truncation_length(truncate_prompt_tokens)
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise InvalidRequest("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, list | tuple):
            ids = list(prompt)
        else:
            raise InvalidRequest(f"unsupported prompt type {type(prompt).__name__}", param="prompt")
        if ids is None:
            if not isinstance(text, str) or not text.strip():
                raise InvalidRequest("the prompt is empty", param="prompt")
            ids = self._tokenize(text, keep)
        elif keep is not None and len(ids) > keep:
            ids = ids[-keep:] if self.tokenizer.truncation_side == "left" else ids[:keep]
        self._check_token_ids(ids)
        return text, ids

    def _tokenize(self, text: str, keep: int | None) -> list[int]:
        if keep is None:
            return self.tokenizer.encode(text, add_special_tokens=True)
        return self.tokenizer.encode(text, add_special_tokens=True, truncation=True, max_length=keep)

    def _truncation_length(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return self.max_model_len
        if not isinstance(truncate_prompt_tokens, int) or not 2 <= truncate_prompt_tokens <= self.max_model_len:
            raise InvalidRequest(f"truncate_prompt_tokens must be -1 or in [2, {self.max_model_len}]; "
                                 f"got {truncate_prompt_tokens!r}", param="truncate_prompt_tokens")
        return truncate_prompt_tokens

    def _check_token_ids(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if len(ids) > self.max_model_len:
            raise InvalidRequest(
                f"this model's maximum input length is {self.max_model_len} tokens; the prompt has {len(ids)} "
                "tokens (pass truncate_prompt_tokens to truncate it)", param="prompt",
            )

    # ---- compute ---------------------------------------------------------------------------
    def embed(self, prompt_ids: Sequence[list[int]], normalize: bool | None = None,
              use_tqdm: bool = False) -> list[list[float]]:
        """One pooled vector per prompt, in input order."""
        norm = self.pooler_config.normalize if normalize is None else normalize
        pooling_type = self.pooler_config.pooling_type
        assert pooling_type is not None and norm is not None, "pooler defaults were merged in __init__"

        def head(hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
            return maybe_normalize(pool(hidden, seq_lens, pooling_type), norm)

        return self._run(prompt_ids, head, use_tqdm)

    def classify(self, prompt_ids: Sequence[list[int]], use_tqdm: bool = False) -> list[list[float]]:
        """Per-label probabilities per prompt, in input order."""
        if self.task != "classify":
            raise InvalidRequest("classify() needs LLM(task='classify') and a *ForSequenceClassification model",
                                 param="task")

        def head(hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
            return classification_probs(self.model.compute_logits(hidden, seq_lens), self.multi_label)

        return self._run(prompt_ids, head, use_tqdm)

    def _run(self, prompt_ids: Sequence[list[int]], head: Callable[[torch.Tensor, list[int]], torch.Tensor],
             use_tqdm: bool) -> list[list[float]]:
        results: list[list[float]] = [[] for _ in prompt_ids]
        bar = tqdm(total=len(prompt_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            with torch.inference_mode():
                for batch in self._pack(prompt_ids):
                    seq_lens = [len(prompt_ids[i]) for i in batch]
                    hidden = self._forward([prompt_ids[i] for i in batch], seq_lens)
                    for i, row in zip(batch, head(hidden, seq_lens).tolist()):  # [num_seqs, out_dim]
                        results[i] = row
                    bar.update(len(batch))
        finally:
            bar.close()
        return results

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

    def _forward(self, seqs: list[list[int]], seq_lens: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([t for ids in seqs for t in ids], dtype=torch.long)  # [num_tokens]
        lens = torch.tensor(seq_lens)
        starts = torch.repeat_interleave(lens.cumsum(0) - lens, lens)  # [num_tokens], each token's seq start
        positions = torch.arange(input_ids.shape[0]) - starts  # [num_tokens], 0.. within each sequence
        if self.device.type != "cpu":
            input_ids, positions = input_ids.to(self.device), positions.to(self.device)
        return self.model(input_ids, positions, seq_lens)  # [num_tokens, hidden]


class AsyncPoolingEngine:
    """Runs one PoolingEngine on its own worker thread, one call at a time, for asyncio callers (the server).

    NOTE: the thread that loads the model runs every forward (see AsyncLLM.build for why). One worker
    serialises the calls, so the engine needs no lock, and the event loop never waits on a forward.
    """

    def __init__(self, engine: PoolingEngine, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self.engine = engine
        self.task = engine.task
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self._executor = executor
        self._num_calls = 0  # queued or running (asyncio thread only)
        self._closed = False

    @classmethod
    def build(cls, factory: Callable[[], PoolingEngine]) -> AsyncPoolingEngine:
        """Build the engine with factory() on the worker thread that will run it."""
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagellm-pooling")
        try:
            return cls(executor.submit(factory).result(), executor)  # a load error surfaces here
        except BaseException:
            executor.shutdown(wait=False)
            raise

    @property
    def is_running(self) -> bool:
        return not self._closed

    @property
    def num_waiting(self) -> int:
        return self._num_calls

    def start(self) -> None:
        """Nothing to start: the worker thread exists since build() (the server's lifespan calls this)."""

    async def shutdown(self) -> None:
        """Refuse new calls, drop the queued ones, wait for the running one."""
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def run(self, fn: Callable[[PoolingEngine], T]) -> T:
        """fn(engine) on the worker thread; cancelling the await drops the call if it has not started."""
        if self._closed:
            raise EngineDeadError("the pooling engine is shut down")
        self._num_calls += 1
        try:
            return await asyncio.wrap_future(self._executor.submit(fn, self.engine))
        finally:
            self._num_calls -= 1
