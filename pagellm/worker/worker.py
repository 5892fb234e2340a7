"""Worker: the one owner of the device, the model, the KV cache, the adapters and the model runner.

The engine reaches the model only through this class's small typed surface (`load`, `num_kv_blocks`,
`init_kv_cache`, `execute`, `release`, `add_adapter`, `remove_adapter`, `pool`), so `pagellm.engine`
imports nothing from `pagellm.model` and all device, dtype and quantization policy lives here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch

from pagellm.config import CacheConfig, LoRAConfig, ModelConfig, ParallelConfig, SchedulerConfig
from pagellm.core.sched_output import SchedulerOutput
from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest
from pagellm.model.layers.quant import SCHEMES
from pagellm.model.loader.hf_loader import load_hf_config
from pagellm.model.loader.model_loader import (
    compute_dtype_for,
    load_encoder,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
)
from pagellm.model.loader.peft_loader import load_lora_adapter, load_prefix_adapter, read_adapter_config
from pagellm.model.models.registry import get_pooling_model_class
from pagellm.model.parallel import TensorParallelGroup
from pagellm.model.pooling import classification_probs, maybe_normalize, pool, read_sentence_transformers_pooler
from pagellm.model_source import ModelSource, resolve_model, resolve_pooling_model
from pagellm.outputs import ModelRunnerOutput
from pagellm.pooling_params import ENCODER_DEFAULT_POOLER, POOLING_TASKS, PoolerConfig
from pagellm.worker.model_runner import FUSED_MAX_ROWS, ModelRunner, kv_bytes_per_block

logger = logging.getLogger(__name__)

GENERATE_TASK = "generate"
DEFAULT_KV_CACHE_MEMORY = 2 << 30  # 2 GiB


@dataclass(frozen=True)
class ModelInfo:
    """What the engine knows of the loaded model: plain values, no torch objects."""

    source: ModelSource
    task: str
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    eos_token_id: int | None  # the config's (the first of a list); the tokenizer's wins where it has one
    dtype: str  # the weights'
    compute_dtype: str  # the activations'
    device: str
    load_time: float
    # pooling models only
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    default_pooler: PoolerConfig | None = None
    max_seq_length: int | None = None  # sentence-transformers' own input limit, when below the positions


@dataclass(frozen=True)
class AdapterInfo:
    """What the engine needs of a loaded adapter: its virtual tokens (prefix tuning) and its task file."""

    num_virtual_tokens: int
    task: dict | None  # pagellm_task.json, e.g. a classification adapter's labels


@dataclass(frozen=True)
class PoolingBatch:
    """Prompts computed together in one packed forward, and how each becomes one output row."""

    prompt_ids: list[list[int]]
    kind: str  # "embed" | "classify"
    pooling_type: str | None = None  # the embedding's: embed, or classify with with_embedding
    normalize: bool = False  # the embedding's, likewise
    with_embedding: bool = False  # classify: each prompt's embedding too, from the same forward


@dataclass(frozen=True)
class PoolingRows:
    """What one pooling batch gives: a row per prompt, and its embedding when a classify batch asked for it."""

    rows: list[list[float]]  # [num_seqs, out_dim]: embeddings (embed) or class probabilities (classify)
    embeddings: list[list[float]] | None = None  # [num_seqs, hidden]: classify with with_embedding only


def pick_device(model_config: ModelConfig, lora_config: LoRAConfig | None) -> torch.device:
    """The device to run on. NOTE: what only the CPU runs yet (LoRA, --compile, packed int8/int4 weights) keeps
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Worker:
    """Owns the device, the model, its KV cache and adapters, and the runner that executes steps."""

    def __init__(self, model_config: ModelConfig, task: str = GENERATE_TASK,
                 lora_config: LoRAConfig | None = None, tp_group: TensorParallelGroup | None = None) -> None:
        if task != GENERATE_TASK and task not in POOLING_TASKS:
            raise InvalidRequest(f"task must be one of {GENERATE_TASK}, {', '.join(POOLING_TASKS)}; got {task!r}",
                                 param="task")
        if task != GENERATE_TASK and lora_config is not None:
            raise InvalidRequest("LoRA adapters apply to task='generate' only", param="enable_lora")
        self.model_config = model_config
        self.task = task
        self.lora_config = lora_config
        self.tp_group = tp_group  # a tensor-parallel rank (worker/multiproc_executor.py): this rank's shard only
        self.model: torch.nn.Module | None = None
        self.runner: ModelRunner | None = None
        self.info: ModelInfo | None = None
        self._kv_dtype: torch.dtype | None = None

    @property
    def is_pooling(self) -> bool:
        return self.task in POOLING_TASKS

    # ---- loading ------------------------------------------------------------------------------
    def load(self) -> ModelInfo:
        """Choose the device and dtypes, load the weights, and describe the model."""
        t0 = time.perf_counter()
        config = self.model_config
        torch.manual_seed(config.seed)
        if self.is_pooling:
            return self._load_pooling(t0)
        self.device = pick_device(config, self.lora_config)
        if self.tp_group is not None and self.device.type == "cuda":  # NOTE: one GPU per rank
            self.device = torch.device("cuda", self.tp_group.rank)
        source = resolve_model(config.model)
        dtype = resolve_dtype(config.dtype)
        quantization = resolve_quantization(source, config.quantization, config.dtype, self.device)
        self.model = load_model(source, dtype, quantization, self.device, self.tp_group)
        compute_dtype = self.model.embed_tokens.weight.dtype  # activations
        hf_config = self.model.config
        self.info = ModelInfo(
            source=source, task=self.task, vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings, hidden_size=hf_config.hidden_size,
            eos_token_id=_first(hf_config.eos_token_id), dtype=_dtype_name(dtype),
            compute_dtype=_dtype_name(compute_dtype), device=str(self.device), load_time=time.perf_counter() - t0,
        )
        return self.info

    def _load_pooling(self, t0: float) -> ModelInfo:
        config = self.model_config
        self.device = resolve_device(config.device)
        source = resolve_pooling_model(config.model)
        if source.format != "hf":
            raise InvalidRequest(f"task {self.task!r} needs an HF folder (config.json + safetensors); "
                                 f"{source.path.name} is a GGUF file", param="model")
        # NOTE: encoders are compute-bound: float32 on CPUs without native bf16 math
        dtype = compute_dtype_for(resolve_dtype(config.dtype), self.device)
        hf_config = load_hf_config(source.path)
        model_cls = get_pooling_model_class(getattr(hf_config, "architectures", None), self.task)
        self.model = load_encoder(model_cls, hf_config, source, dtype, self.device)
        if _pooling_quantization(config.quantization, self.model, dtype, self.device) == "int8":
            swapped = self.model.quantize_int8()
            logger.info("encoder: %d linear layers in int8 (int8 activations per row)", swapped)
        # NOTE: a classifier saved by pagellm finetune names the pooling its encoder was trained with
        # (classifier_pooling, e.g. MiniLM's mean) and keeps no sentence-transformers files: that pooling is its
        # embedding's too, so a frozen-encoder head embeds as its base encoder does. Else a model class may
        # declare its own default (decoders: "last", as vLLM does)
        default_type = getattr(hf_config, "classifier_pooling", None) or getattr(
            model_cls, "default_pooling_type", ENCODER_DEFAULT_POOLER.pooling_type)
        pooler = read_sentence_transformers_pooler(source.path) or PoolerConfig(default_type, True)
        num_labels = getattr(hf_config, "num_labels", 0)
        id2label = getattr(hf_config, "id2label", None) or {}
        self.info = ModelInfo(
            source=source, task=self.task, vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings, hidden_size=hf_config.hidden_size,
            eos_token_id=None, dtype=_dtype_name(dtype), compute_dtype=_dtype_name(dtype), device=str(self.device),
            load_time=time.perf_counter() - t0,
            labels=tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)),
            multi_label=getattr(hf_config, "problem_type", None) == "multi_label_classification",
            default_pooler=pooler, max_seq_length=_sentence_transformers_limit(source),
        )
        return self.info

    # ---- the KV cache ---------------------------------------------------------------------------
    def kv_dtype(self, cache_config: CacheConfig) -> torch.dtype:
        """"auto" stores keys/values in the model's dtype, which can be narrower than the activations.

        NOTE: a bf16 model on a CPU without native bf16 computes in float32 but keeps a bf16 cache (half the
        memory, and W2 measured faster: less to read per decode step).
        """
        if cache_config.cache_dtype == "auto":
            return self.model.weight_dtype
        return resolve_dtype(cache_config.cache_dtype)

    def num_kv_blocks(self, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> int:
        """Number of KV blocks: explicit, else from kv_cache_memory, else enough for every running
        sequence at full context, capped at DEFAULT_KV_CACHE_MEMORY."""
        assert not self.is_pooling, "pooling models have no KV cache"
        if cache_config.num_blocks is not None:
            return cache_config.num_blocks
        per_block = kv_bytes_per_block(self.model, cache_config.block_size, self.kv_dtype(cache_config))
        if cache_config.kv_cache_memory is not None:
            num_blocks = cache_config.kv_cache_memory // per_block
        else:
            blocks_per_seq = -(-scheduler_config.max_model_len // cache_config.block_size)
            wanted = blocks_per_seq * scheduler_config.max_num_seqs
            num_blocks = min(wanted, DEFAULT_KV_CACHE_MEMORY // per_block)
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory is too small for even two blocks of {per_block} bytes")
        return int(num_blocks)

    def init_kv_cache(self, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> None:
        """Allocate the cache (cache_config.num_blocks, already sized) and build the runner over it."""
        assert cache_config.num_blocks is not None, "size the KV cache (num_kv_blocks) first"
        self.runner = ModelRunner(self.model, cache_config.num_blocks, cache_config.block_size,
                                  self.model.embed_tokens.weight.dtype, self.lora_config,
                                  compile=self.model_config.compile, max_num_seqs=scheduler_config.max_num_seqs,
                                  kv_dtype=self.kv_dtype(cache_config), device=self.device)
        logger.info("KV cache: %d blocks of %d tokens", cache_config.num_blocks, cache_config.block_size)

    @property
    def max_fused_rows(self) -> int | None:
        """The most decode rows a step may have and still run the fused C++ decode stack; None without it."""
        return FUSED_MAX_ROWS if self.runner is not None and self.runner.fused_decode is not None else None

    # ---- steps ----------------------------------------------------------------------------------
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def release(self, req_ids: list[str]) -> None:
        """Forget finished requests' per-request state."""
        self.runner.release(req_ids)

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def lora_enabled(self) -> bool:
        return self.lora_config is not None

    def add_adapter(self, lora_request: LoRARequest) -> AdapterInfo:
        """Read, check and register a PEFT adapter (LoRA or prefix tuning) under its lora_int_id."""
        lora = self.runner.lora
        if lora is None:
            raise InvalidRequest("LoRA is not enabled: build the engine with enable_lora=True "
                                 "(pagellm serve --enable-lora or --lora-modules)", param="lora_request")
        model, dtype = self.model, self.model.embed_tokens.weight.dtype
        if read_adapter_config(lora_request.lora_path).get("peft_type") == "PREFIX_TUNING":
            prefix = load_prefix_adapter(lora_request.lora_path, len(model.layers), model.num_kv_heads,
                                         model.head_dim, dtype)
            lora.add_prefix(lora_request.lora_int_id, prefix)
        else:
            adapter = load_lora_adapter(lora_request.lora_path, len(model.layers), self.lora_config.max_lora_rank,
                                        dtype)
            lora.add_adapter(lora_request.lora_int_id, adapter)
        return AdapterInfo(lora.num_virtual_tokens(lora_request.lora_int_id), lora.task_of(lora_request.lora_int_id))

    def remove_adapter(self, lora_id: int) -> bool:
        return self.runner.lora is not None and self.runner.lora.remove_adapter(lora_id)

    # ---- pooling --------------------------------------------------------------------------------
    @torch.inference_mode()
    def pool(self, batch: PoolingBatch) -> PoolingRows:
        """One output row per prompt of one packed forward: an embedding or class probabilities (and, for a
        classify batch with_embedding, each prompt's embedding from the same hidden states)."""
        assert self.is_pooling, "pool() needs a pooling model (task embed or classify)"
        seq_lens = [len(ids) for ids in batch.prompt_ids]
        input_ids = torch.tensor([t for ids in batch.prompt_ids for t in ids], dtype=torch.long)  # [num_tokens]
        lens = torch.tensor(seq_lens)
        starts = torch.repeat_interleave(lens.cumsum(0) - lens, lens)  # [num_tokens], each token's seq start
        positions = torch.arange(input_ids.shape[0]) - starts  # [num_tokens], 0.. within each sequence
        if self.device.type != "cpu":
            input_ids, positions = input_ids.to(self.device), positions.to(self.device)
        hidden = self.model(input_ids, positions, seq_lens)  # [num_tokens, hidden]
        if batch.kind != "classify":
            return PoolingRows(maybe_normalize(pool(hidden, seq_lens, batch.pooling_type), batch.normalize).tolist())
        probs = classification_probs(self.model.compute_logits(hidden, seq_lens), self.info.multi_label)
        embeddings = None
        if batch.with_embedding:
            assert batch.pooling_type is not None, "an embedding needs a pooling type"
            embeddings = maybe_normalize(pool(hidden, seq_lens, batch.pooling_type), batch.normalize).tolist()
        return PoolingRows(probs.tolist(), embeddings)  # [num_seqs, num_labels], [num_seqs, hidden]


def build_worker(model_config: ModelConfig, task: str = GENERATE_TASK, lora_config: LoRAConfig | None = None,
                 parallel_config: ParallelConfig | None = None) -> Worker:
    """The engine's worker: this process's own Worker, or with tensor_parallel_size > 1 a MultiprocExecutor
    (the same surface over worker processes that each hold a shard of the model)."""
    if parallel_config is None or parallel_config.tensor_parallel_size == 1:
        return Worker(model_config, task, lora_config)
    from pagellm.worker.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor(model_config, task, lora_config, parallel_config)  # type: ignore[return-value]


def _pooling_quantization(quantization: str | None, model: torch.nn.Module, dtype: torch.dtype,
                          device: torch.device) -> str | None:
    """What a pooling model runs with: "auto"/"none" float (the default), or "int8" (an encoder's big linears
    with int8 weights and activations, float32 on the CPU only; docs/monitor.md "Performance")."""
    if quantization in (None, "none", "auto"):
        return None
    if quantization != "int8":
        raise InvalidRequest(f"quantization for task embed/classify must be one of auto, none, int8; got "
                             f"{quantization!r}", param="quantization")
    if not hasattr(model, "quantize_int8"):
        raise InvalidRequest(f"quantization int8 for pooling is supported for BERT encoders only, not "
                             f"{type(model).__name__}", param="quantization")
    if device.type != "cpu" or dtype != torch.float32:
        raise InvalidRequest(f"quantization int8 for an encoder needs device cpu and dtype float32, got "
                             f"{device.type} / {_dtype_name(dtype)}", param="quantization")
    return "int8"


def _first(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _sentence_transformers_limit(source: ModelSource) -> int | None:
    st_config = source.path / "sentence_bert_config.json"
    if st_config.is_file():  # e.g. 256 for MiniLM, below its 512 positions
        st_len = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(st_len, int) and st_len > 0:
            return st_len
    return None
