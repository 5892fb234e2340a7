"""Build a model from a ModelSource: config, class, weights, dtype."""

from __future__ import annotations

import logging
import os
import shutil

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from pagellm.errors import InvalidRequest
from pagellm.model.layers import kernels
from pagellm.model.layers.linear import pack_linears
from pagellm.model.layers.quant import SCHEMES, QuantizedWeight, replace_linears
from pagellm.model.loader.gguf_loader import GGUFCheckpoint, packed_scheme
from pagellm.model.loader.hf_loader import iter_safetensors, load_config
from pagellm.model.models.registry import get_model_class
from pagellm.model.parallel import shard_decoder
from pagellm.model_source import ModelSource, gguf_cache_dir

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The model's weight dtype: 'auto' is bfloat16 (float32 stays available)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise InvalidRequest(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}", param="dtype")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device a model runs on: "auto" is cuda when torch.cuda.is_available(), else cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidRequest(f"device {device!r} requested but torch.cuda.is_available() is False "
                                 "(no NVIDIA GPU, or a CPU-only torch build)", param="device")
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise InvalidRequest(f"invalid device {device!r}: {exc}", param="device") from None
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InvalidRequest(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA "
                                 "device(s) exist", param="device")
        return resolved
    raise InvalidRequest(f"device must be one of auto, cpu, cuda, cuda:N; got {device!r}", param="device")


def compute_dtype_for(dtype: torch.dtype, device: torch.device | None = None,
                      quantization: str | None = None) -> torch.dtype:
    """Activation dtype for a weight dtype on `device` (None: cpu), with packed weights when `quantization`.

    NOTE: on CPUs without native bf16 math (no AMX/AVX512-BF16) torch emulates bf16 matmuls,
    several times slower than float32. There a bfloat16 model keeps bf16-valued weights but
    computes in float32: few-row (decode) matmuls read the bf16 copy, which halves the bytes
    of a bandwidth-bound GEMV, and larger ones run float32 oneDNN kernels on the same values.
    Packed int8/int4 weights compute in float32 on every CPU: their kernels and the fused decode
    stack take float32 activations, and bf16 activations on top of 4-bit weights lost the bundled
    model's answers on a Zen 4 CPU (issue 12). A GPU computes in the weight dtype.
    """
    if device is not None and device.type != "cpu":
        return dtype
    if quantization is not None:
        return torch.float32
    if dtype == torch.bfloat16 and not kernels.cpu_features().native_bf16:
        return torch.float32
    return dtype


def _save_packed(weights: dict, path) -> None:
    """Float tensors and QuantizedWeights in one safetensors file (parts keyed `name::part`)."""
    tensors, meta = {}, {}
    for name, w in weights.items():
        if isinstance(w, QuantizedWeight):
            tensors[f"{name}::qweight"], tensors[f"{name}::scales"] = w.qweight, w.scales.contiguous()
            if w.mins is not None:
                tensors[f"{name}::mins"] = w.mins.contiguous()
            meta[name] = f"{w.scheme}:{w.group_size}"
        else:
            tensors[name] = w
    save_file(tensors, str(path), metadata=meta)


def _load_packed(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        for name in keys:
            base, _, part = name.partition("::")
            if not part:
                yield name, f.get_tensor(name)
            elif part == "qweight":
                scheme, group = meta[base].split(":")
                mins = f.get_tensor(f"{base}::mins") if f"{base}::mins" in keys else None
                yield base, QuantizedWeight(scheme, f.get_tensor(name), f.get_tensor(f"{base}::scales"), mins,
                                            int(group))


# The cache folders of GGUF conversions whose content changed: a new name misses the old entries.
# v2: K-quant (Q4_K exact as int4; Q5_K/Q6_K/Q5_0/Q5_1 requantized to int8) files pack
GGUF_SCHEME_KIND = "gguf-scheme-v2"
GGUF_PACKED_KIND = "gguf-packed-v2"


def gguf_packed_scheme(source: ModelSource) -> str | None:
    """int4 or int8 when the GGUF file's layer weights can all load packed (gguf_loader.packed_scheme); else None."""
    cache = gguf_cache_dir(source.path, GGUF_SCHEME_KIND)
    if (cache / "scheme").is_file():
        return (cache / "scheme").read_text().strip() or None
    scheme = packed_scheme(GGUFCheckpoint(source.path).linear_quant_types())
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "scheme").write_text(scheme or "")
    except OSError:
        pass
    return scheme


def _cached_gguf(source: ModelSource, kind: str, convert):
    """(config, weights) of a GGUF file, through a safetensors cache under ~/.cache/pagellm/<kind>.

    NOTE: parsing GGUF metadata with the gguf package walks ~100k vocabulary strings (~7 s
    here) and converting the tensors takes ~3 s more; the first load writes config.json and the
    converted tensors (`convert(checkpoint)`), later loads read them in well under 1 s.
    """
    cache = gguf_cache_dir(source.path, kind)
    if (cache / "model.safetensors").is_file():
        return load_config(cache), _load_packed(cache / "model.safetensors")
    ckpt = GGUFCheckpoint(source.path)
    weights = dict(convert(ckpt))
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        ckpt.config.save_pretrained(str(tmp))
        _save_packed(weights, tmp / "model.safetensors")
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only or full disk only costs the conversion next time
        logger.warning("could not cache converted GGUF weights in %s: %s", cache, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt.config, iter(weights.items())


def _gguf_weights(source: ModelSource):
    """Every tensor dequantized to float32."""
    return _cached_gguf(source, "gguf-dequant", GGUFCheckpoint.weights)


def _gguf_packed_weights(source: ModelSource):
    """Quantized matrices as QuantizedWeight (GGUFCheckpoint.packed_weights), the rest float32."""
    return _cached_gguf(source, GGUF_PACKED_KIND, GGUFCheckpoint.packed_weights)


def resolve_quantization(source: ModelSource, quantization: str | None, dtype: str,
                         device: torch.device | None = None) -> str | None:
    """The scheme a model runs with. "auto": a GGUF file of 4-bit types (Q4_0/Q4_1/Q4_K, with 5-8-bit ones
    beside them as in Q4_K_M: int4) or of 5-8-bit ones only (Q8_0/Q6_K/Q5_K/Q5_0/Q5_1: int8) keeps its
    packed weights unless a dtype was asked for explicitly; anything else runs unquantized.

    On a GPU (`device` not cpu) "auto" is always unquantized (a GGUF loads dequantized to the model dtype):
    the packed int8/int4 matmuls are CPU kernels, so an explicit int8/int4 raises there."""
    if quantization in (None, "none"):
        return None
    on_cpu = device is None or device.type == "cpu"
    if quantization == "auto":
        if source.format != "gguf" or dtype != "auto" or not on_cpu:
            return None
        return gguf_packed_scheme(source)
    if quantization not in SCHEMES:
        raise InvalidRequest(f"quantization must be one of auto, none, {', '.join(SCHEMES)}; got {quantization!r}",
                             param="quantization")
    if not on_cpu:
        raise InvalidRequest(f"--quantization {quantization} is not supported on {device.type} yet (its packed "
                             "kernels are CPU-only); use --quantization none or auto", param="quantization")
    return quantization


# torch.nn.init's in-place fills (each dispatches to torch function modes under its own name)
_INIT_FILLS = tuple(getattr(torch.nn.init, name) for name in (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_"))


class _SkipInitFills(TorchFunctionMode):
    """Turns the torch.nn.init fills into no-ops while modules are built on "meta", where there is nothing to fill.

    NOTE: not only wasted work: on "meta", normal_ (nn.Embedding's init) runs torch's reference
    implementation, whose first call imports torch._dynamo: about 1 s of every start (measured).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def instantiate_empty(cls: type[torch.nn.Module], config, dtype: torch.dtype,
                      quantization: str | None = None, device: torch.device | None = None) -> torch.nn.Module:
    """Build on "meta" (no init cost), then materialize uninitialized storage in `dtype` on `device` (None: cpu).

    With `quantization`, the Linears of the decoder layers and the LM head become QuantizedLinear
    before any storage exists, so no float copy of their weights is ever allocated.
    """
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"), _SkipInitFills():
            model = cls(config)
            if quantization is not None:
                replace_linears(model, quantization, dtype)
        # NOTE: Module.to_empty's empty_like of a meta tensor runs torch's reference implementation, which
        # imports sympy (~0.5 s); a plain empty of the same shape and dtype is the same storage (meta tensors
        # built here are contiguous)
        target = device if device is not None else "cpu"
        model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=target))
        if device is not None and device.type != "cpu":
            move_rotary(model, device)
        return model
    finally:
        torch.set_default_dtype(default_dtype)


def move_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """Move rotary cos/sin tables (plain tensors, not buffers, so Module.to leaves them) to `device`."""
    rotary = getattr(model, "rotary", None)
    if rotary is not None:
        rotary.cos, rotary.sin = rotary.cos.to(device), rotary.sin.to(device)


def checkpoint_weights(source: ModelSource):
    """(config, iterator of HF-named tensors) of an HF folder or a GGUF file."""
    if source.format == "gguf":
        return _gguf_weights(source)
    return load_config(source.path), iter_safetensors(source.path)


def load_model(source: ModelSource, dtype: torch.dtype, quantization: str | None = None,
               device: torch.device | None = None, tp_group=None) -> torch.nn.Module:
    """Instantiate the architecture on `device` (None: cpu) with `dtype` weights and load them (no grad).

    The parameters' dtype is ``compute_dtype_for(dtype, device, quantization)``; ``model.weight_dtype`` keeps `dtype`.
    `quantization` (int8 | int4, CPU only) keeps the Linear weights packed (model.quantization says which).
    `tp_group` (a parallel.TensorParallelGroup): keep only this rank's slice of each layer (model/parallel.py).
    """
    on_gpu = device is not None and device.type != "cpu"
    assert not (on_gpu and quantization is not None), "resolve_quantization refuses packed weights off the CPU"
    if quantization is not None and source.format == "gguf":
        config, weights = _gguf_packed_weights(source)
    else:
        config, weights = checkpoint_weights(source)
    cls = get_model_class(getattr(config, "architectures", None))
    run_dtype = compute_dtype_for(dtype, device, quantization)
    if run_dtype != dtype:  # bf16 values held in float32
        weights = ((name, t if isinstance(t, QuantizedWeight) else t.to(dtype).to(run_dtype)) for name, t in weights)
    if quantization is not None and not hasattr(cls, "load_weights"):
        raise InvalidRequest(f"--quantization is not supported for {cls.__name__}", param="quantization")
    # NOTE: on a GPU the storage is materialized there; load_weights' copy_ moves each CPU tensor over
    model = instantiate_empty(cls, config, run_dtype, quantization, device if on_gpu else None)
    if model.tie_word_embeddings and quantization is None:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(weights)
    model.requires_grad_(False)
    if tp_group is not None:  # NOTE: every rank reads the whole checkpoint, then keeps its slice (before packing)
        shard_decoder(model, tp_group)
    model.weight_dtype = dtype
    model.quantization = quantization
    plan = kernels.plan_kernels(device)
    kernels.apply_kernel_plan(model, plan)
    if not on_gpu and plan.packed_linears:  # packing is for CPU matmuls
        pack_linears(model, bf16_gemv=run_dtype != dtype)
    logger.info("model weights %s, compute %s, on %s", dtype, run_dtype, device or "cpu")
    return model.eval()


def load_encoder(model_cls: type[torch.nn.Module], hf_config, source: ModelSource,
                 dtype: torch.dtype, device: torch.device | None = None) -> torch.nn.Module:
    """Instantiate on "meta", materialize on `device` (None: cpu) in `dtype`, load and check the safetensors
    weights."""
    model = instantiate_empty(model_cls, hf_config, dtype, device=device)
    model.load_weights(iter_safetensors(source.path))
    model.requires_grad_(False)
    kernels.apply_kernel_plan(model, kernels.plan_kernels(device))
    return model.eval()
