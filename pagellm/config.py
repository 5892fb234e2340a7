"""One dataclass per concept; each component takes only the configs it uses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pagellm.errors import InvalidRequest

# "auto" | "cpu" | "cuda" | "cuda:N"; whether CUDA exists is checked where torch is (model_loader.resolve_device)
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class ModelConfig:
    """What to load and in which dtype."""

    model: str | None = None  # HF folder, .gguf file, or None for the bundled SmolLM2
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float32 | float16
    max_model_len: int | None = None  # None: the model's context length
    seed: int = 0
    # auto: a Q4_0/Q4_1 or Q8_0 GGUF keeps its weights packed (int4 / int8) unless dtype is explicit
    quantization: str | None = "auto"  # auto | none | int8 | int4
    compile: bool = False  # torch.compile the model's forward (static-shape buckets for decode)
    device: str = "auto"  # auto (cuda when torch.cuda.is_available(), else cpu) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.fullmatch(self.device):
            raise InvalidRequest(f"device must be one of auto, cpu, cuda, cuda:N; got {self.device!r}", param="device")


@dataclass
class CacheConfig:
    """Paged KV cache geometry."""

    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes; None: a default sized to max_num_seqs * max_model_len
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # auto: the model's dtype (bf16 even where activations run in float32)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {self.num_blocks}")
        if self.cache_dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError("kv_cache_dtype must be one of auto, bfloat16, float32, float16; "
                             f"got {self.cache_dtype!r}")


# Chosen on a 2-core CPU with the bundled SmolLM2-135M (docs/reliability.md, "Fairness under long prompts"):
# beside 4 streams it cut their inter-token p99 stall from 90x to 6.6x at a 2k context; 128 did no better, 64 worse.
DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING = 256
DEFAULT_DECODE_STALL_RATIO = 0.0  # off: see docs/reliability.md#fairness-under-long-prompts for what 2 costs


@dataclass
class SchedulerConfig:
    """Token budget and admission limits of one engine step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    policy: Literal["fcfs", "priority"] = "fcfs"
    # NOTE: a prefill chunk longer than this is split even when the budget would allow more,
    # so that decodes of running requests are not starved by one long prompt. 0 disables it.
    long_prefill_token_threshold: int = 0
    # NOTE: while any running request is decoding, the prompt tokens (of all prefilling requests
    # together) one step computes are capped at this, so that a long prompt is prefilled in small
    # chunks between decode steps instead of stretching every stream's inter-token latency.
    # A step with no decode takes the whole budget. 0: no bound. See docs/reliability.md#fairness-under-long-prompts.
    max_prefill_tokens_while_decoding: int = DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING
    # NOTE: a long prompt (more tokens than max_prefill_tokens_while_decoding) arriving while requests
    # decode is prefilled in chunks sized from measured step times, so that each step takes at most
    # about this many times a decode-only step: the streams' inter-token latency stays within that
    # factor, at the cost of more, smaller chunks for the long prompt. 0 (the default): off, only the
    # token bound; what 2 buys and costs is measured in docs/reliability.md#fairness-under-long-prompts.
    decode_stall_ratio: float = DEFAULT_DECODE_STALL_RATIO
    # Distinct LoRA adapters one step may mix (LoRAConfig.max_loras); 0: LoRA is off.
    max_loras: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be > 0, got {self.max_num_batched_tokens}")
        if self.max_prefill_tokens_while_decoding < 0:
            raise ValueError("max_prefill_tokens_while_decoding must be >= 0 (0: no bound), "
                             f"got {self.max_prefill_tokens_while_decoding}")
        if self.decode_stall_ratio != 0 and not self.decode_stall_ratio > 1:
            raise ValueError(f"decode_stall_ratio must be > 1 (0: off), got {self.decode_stall_ratio}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass
class LoRAConfig:
    """Multi-LoRA serving limits: adapters resident in compute slots at once, and their largest rank."""

    max_loras: int = 4
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.max_loras <= 0:
            raise ValueError(f"max_loras must be > 0, got {self.max_loras}")
        if self.max_lora_rank <= 0:
            raise ValueError(f"max_lora_rank must be > 0, got {self.max_lora_rank}")


SPEC_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's field names): propose tokens cheaply, verify them in one target step.

    ngram: prompt lookup over the request's own prompt and output, the longest suffix n-gram of length
    prompt_lookup_min..prompt_lookup_max that occurred before proposes the tokens that followed it.
    A request whose acceptance rate over its last `acceptance_window` proposed tokens falls below
    `min_acceptance_rate` stops proposing, so speculation never makes a workload much slower.
    length_policy "cost" (the default) proposes, each step, only the positions whose chance of being
    accepted is worth the time a verified row adds to the step (both measured while serving);
    "fixed" always proposes up to num_speculative_tokens.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None  # draft_model: the draft's HF folder or .gguf file
    min_acceptance_rate: float = 0.2
    acceptance_window: int = 32
    length_policy: str = "cost"

    def __post_init__(self) -> None:
        def bad(message: str, field: str) -> InvalidRequest:
            return InvalidRequest(f"speculative_config: {message}", param=f"speculative_config.{field}")

        if self.method not in SPEC_METHODS:
            raise bad(f"method must be one of {', '.join(SPEC_METHODS)}; got {self.method!r}", "method")
        if self.method == "draft_model":
            raise bad("method 'draft_model' is not implemented yet; use 'ngram'", "method")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 16:
            raise bad(f"num_speculative_tokens must be in [1, 16]; got {self.num_speculative_tokens!r}",
                      "num_speculative_tokens")
        if not (isinstance(self.prompt_lookup_min, int) and isinstance(self.prompt_lookup_max, int)
                and 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 32):
            raise bad("need 1 <= prompt_lookup_min <= prompt_lookup_max <= 32; got "
                      f"{self.prompt_lookup_min!r}, {self.prompt_lookup_max!r}", "prompt_lookup_min")
        if not 0.0 <= self.min_acceptance_rate < 1.0:
            raise bad(f"min_acceptance_rate must be in [0, 1); got {self.min_acceptance_rate!r}", "min_acceptance_rate")
        if self.length_policy not in ("cost", "fixed"):
            raise bad(f"length_policy must be 'cost' or 'fixed'; got {self.length_policy!r}", "length_policy")
        if self.acceptance_window < 1:
            raise bad(f"acceptance_window must be >= 1; got {self.acceptance_window!r}", "acceptance_window")

    @classmethod
    def from_dict(cls, spec: dict | str | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, a dict, or its JSON text (the CLI's --speculative-config)."""
        import json

        if spec is None or isinstance(spec, SpeculativeConfig):
            return spec
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as exc:
                raise InvalidRequest(f"speculative_config is not valid JSON: {exc}",
                                     param="speculative_config") from exc
        if not isinstance(spec, dict):
            raise InvalidRequest("speculative_config must be an object", param="speculative_config")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise InvalidRequest(f"speculative_config: unknown fields {unknown}; known: {sorted(known)}",
                                 param="speculative_config")
        return cls(**spec)


DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How one model is split over processes: tensor parallelism (docs/distributed.md).

    tensor_parallel_size 1 runs the model in the engine's own process; N > 1 splits every layer over N worker
    processes started by `distributed_executor_backend` ("mp": multiprocessing, spawn), which talk through
    torch.distributed (gloo on the CPU, nccl on CUDA); the scheduler stays in the engine.
    """

    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: "mp" when tensor_parallel_size > 1

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise InvalidRequest(f"tensor_parallel_size must be an integer >= 1; got {tp!r}",
                                 param="tensor_parallel_size")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            names = ", ".join(DISTRIBUTED_EXECUTOR_BACKENDS)
            raise InvalidRequest(f"distributed_executor_backend must be one of {names}; got {backend!r}",
                                 param="distributed_executor_backend")

    @property
    def backend(self) -> str:
        return self.distributed_executor_backend or "mp"
