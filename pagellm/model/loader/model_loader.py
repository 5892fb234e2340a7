"""Build a model from a ModelSource: config, class, weights, dtype."""

from __future__ import annotations

import logging
import os
import shutil
from functools import cache

import torch
from safetensors.torch import save_file

from pagellm.errors import InvalidRequest
from pagellm.model.layers.linear import pack_linears
from pagellm.model.loader.gguf_loader import GGUFCheckpoint
from pagellm.model.loader.hf_loader import iter_safetensors, load_hf_config
from pagellm.model.loader.resolve import ModelSource, gguf_cache_dir
from pagellm.model.models.registry import get_model_class

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16, where bf16 matmuls beat float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The model's weight dtype: 'auto' is bfloat16 (float32 stays available)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise InvalidRequest(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}", param="dtype")
    return _DTYPES[dtype]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Activation/KV dtype for a weight dtype on this machine.

    NOTE: on CPUs without native bf16 math (no AMX/AVX512-BF16) torch emulates bf16 matmuls,
    several times slower than float32. There a bfloat16 model keeps bf16-valued weights but
    computes in float32: few-row (decode) matmuls read the bf16 copy, which halves the bytes
    of a bandwidth-bound GEMV, and larger ones run float32 oneDNN kernels on the same values.
    """
    if dtype == torch.bfloat16 and not torch.cuda.is_available() and not cpu_has_native_bf16():
        return torch.float32
    return dtype


def _gguf_weights(source: ModelSource):
    """(config, weights) of a GGUF file, through a dequantized safetensors cache.

    NOTE: parsing GGUF metadata with the gguf package walks ~100k vocabulary strings (~7 s
    here) and dequantizing takes ~3 s more; the first load writes config.json and float32
    safetensors under ~/.cache/pagellm/gguf-dequant, later loads mmap them in well under 1 s.
    """
    cache = gguf_cache_dir(source.path, "gguf-dequant")
    if (cache / "model.safetensors").is_file():
        return load_hf_config(cache), iter_safetensors(cache)
    ckpt = GGUFCheckpoint(source.path)
    weights = dict(ckpt.weights())
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        ckpt.config.save_pretrained(str(tmp))
        save_file(weights, str(tmp / "model.safetensors"))
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only or full disk only costs the conversion next time
        logger.warning("could not cache dequantized GGUF weights: %s", exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt.config, iter(weights.items())


def instantiate_empty(cls: type[torch.nn.Module], config, dtype: torch.dtype) -> torch.nn.Module:
    """Build on "meta" (no init cost), then materialize uninitialized CPU storage in `dtype`."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
        return model.to_empty(device="cpu")
    finally:
        torch.set_default_dtype(default_dtype)


def checkpoint_weights(source: ModelSource):
    """(HF config, iterator of HF-named tensors) of an HF folder or a GGUF file."""
    if source.format == "gguf":
        return _gguf_weights(source)
    return load_hf_config(source.path), iter_safetensors(source.path)


def load_model(source: ModelSource, dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate the architecture on CPU with `dtype` weights and load them (no grad).

    The parameters' dtype is ``compute_dtype_for(dtype)``; ``model.weight_dtype`` keeps `dtype`.
    """
    config, weights = checkpoint_weights(source)
    cls = get_model_class(getattr(config, "architectures", None))
    run_dtype = compute_dtype_for(dtype)
    if run_dtype != dtype:  # bf16 values held in float32
        weights = ((name, tensor.to(dtype).to(run_dtype)) for name, tensor in weights)
    model = instantiate_empty(cls, config, run_dtype)
    if model.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(weights)
    model.requires_grad_(False)
    model.weight_dtype = dtype
    if os.environ.get("PAGELLM_LINEAR", "auto") != "torch":
        pack_linears(model, bf16_gemv=run_dtype != dtype)
    logger.info("model weights %s, compute %s", dtype, run_dtype)
    return model.eval()
