"""pagellm's compiled CPU kernels (csrc/): paged decode attention and few-row int8/int4 matmuls.

Built once per CPU kind with torch's C++ extension loader (cached under ~/.cache/torch_extensions,
or $TORCH_EXTENSIONS_DIR, in a folder named for the CPU's instruction-set features, so a cache copied
to another CPU is never loaded there). When no compiler is available, or PAGELLM_KERNELS=torch,
every layer keeps its pure-torch path. `cpu_features()` is the one place that reads what the CPU can
do, and `plan_kernels()` the one place that decides, at load, which kernel each layer runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("bindings.cpp", "paged_decode.cpp", "quant_gemv.cpp",
                                                                   "decode_stack.cpp")]
_module = None
_failed = False


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """The x86 instruction-set extensions that choose pagellm's kernel paths (AVX2 + FMA is the floor)."""

    avx2: bool = False
    fma: bool = False
    avx512f: bool = False
    avx512bw: bool = False
    avx512vl: bool = False
    avx512_vnni: bool = False
    avx512_bf16: bool = False
    amx_tile: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False

    @classmethod
    def from_flags(cls, flags: set[str] | str) -> CpuFeatures:
        """From /proc/cpuinfo's (or lscpu's) flag names."""
        names = set(flags.split()) if isinstance(flags, str) else set(flags)
        return cls(**{f.name: f.name in names for f in dataclasses.fields(cls)})

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware (AVX512-BF16 or AMX-BF16) instead of torch's float32 emulation."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]

    def build_key(self) -> str:
        """A short tag of the feature set: the kernel build folder's suffix."""
        return hashlib.sha1(",".join(self.names).encode()).hexdigest()[:10]


@cache
def cpu_features() -> CpuFeatures:
    """This CPU's features, read once from /proc/cpuinfo (none where it cannot be read).

    PAGELLM_CPU_FLAGS="avx2 fma avx512_bf16 ..." replaces them, to run another CPU kind's branches (which
    activations a model computes in) on this machine, e.g. the test suite as a native-bf16 CPU takes it;
    the C++ kernels stay this machine's build.
    """
    if (override := os.environ.get("PAGELLM_CPU_FLAGS")) is not None:
        return CpuFeatures.from_flags(override)
    return _detected_features()


@cache
def _detected_features() -> CpuFeatures:
    """What /proc/cpuinfo says, whatever PAGELLM_CPU_FLAGS says: what `-march=native` builds for."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return CpuFeatures.from_flags(line.partition(":")[2])
    except OSError:
        pass
    return CpuFeatures()


def kernel_module_name(features: CpuFeatures | None = None) -> str:
    """The extension's name, and so its build folder: one per CPU feature set, since the build is -march=native,
    and one per source folder: torch's loader rebuilds when the sources' path changes, so two checkouts (a
    fresh clone beside a working copy) sharing one folder rebuilt over each other at every first load, and a
    server started meanwhile waited minutes for it."""
    source = hashlib.sha1(str(_SOURCES[0].parent.resolve()).encode()).hexdigest()[:6]
    return f"pagellm_kernels_{(features or _detected_features()).build_key()}_{source}"


def _build_directory(name: str) -> Path:
    """Where torch's loader keeps this extension's build: $TORCH_EXTENSIONS_DIR or its default root."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    path = root / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold the build folder alone while torch's loader builds or loads into it.

    NOTE: torch guards a build with a plain `lock` file that a killed build (a server stopped
    during its first start, a test timeout) leaves behind, and every later load then waits on it
    forever, silently. An flock goes away with the process that held it, so whoever holds this one
    knows any `lock` file in the folder is stale and removes it.
    """
    with open(build_dir / "pagellm.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("removing a kernel build lock left by a build that was killed: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_kernel():
    """The compiled module, or None (disabled, or the build failed: logged once)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("PAGELLM_KERNELS", "auto") == "torch":
        _failed = True
        return None
    try:
        from torch.utils.cpp_extension import load

        name = kernel_module_name()
        build_dir = _build_directory(name)
        # NOTE: torch's loader rebuilds when a source or a flag changes, not a header: the header's
        # hash goes into the flags
        header = hashlib.sha1(_SOURCES[0].with_name("kernels.h").read_bytes()).hexdigest()[:12]
        logger.info("loading the C++ kernels from %s (a first load on this CPU builds them: minutes)", build_dir)
        start = time.monotonic()
        with exclusive_build(build_dir):
            _module = load(name, sources=[str(s) for s in _SOURCES], build_directory=str(build_dir),
                           extra_include_paths=[str(_SOURCES[0].parent)],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp",
                                         f"-DPAGELLM_HEADER={header}"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        logger.info("C++ kernels ready in %.1f s", time.monotonic() - start)
    except Exception as exc:  # no compiler, no ninja, a build error: the torch path still works
        logger.warning("C++ kernels unavailable (%s: %s); using the torch paths", type(exc).__name__, exc)
        _failed = True
    return _module


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Which kernel each kind of layer runs, decided once per model load by `plan_kernels`.

    Layers hold what the plan gives them (`use_kernels`); none reads the environment or probes the
    CPU at call time. The default plan, TORCH_PATHS, runs torch ops everywhere.
    """

    features: CpuFeatures = CpuFeatures()
    module: Any = None  # the compiled C++ kernels; None: torch ops for every layer
    attention: bool = False  # paged decode attention in C++ (PAGELLM_ATTENTION=torch: off)
    fused_decode: bool = False  # decode-only steps through the C++ decoder stack (PAGELLM_FUSED_DECODE=0: off)
    packed_linears: bool = False  # Linears get oneDNN / bf16 copies packed at load (PAGELLM_LINEAR=torch: off)
    int4_q8_activations: bool = True  # int4 kernels quantize activations to int8 (PAGELLM_INT4_ACT=float: off)

    @property
    def attention_module(self) -> Any:
        return self.module if self.attention else None


TORCH_PATHS = KernelPlan()


def plan_kernels(device: torch.device | None = None) -> KernelPlan:
    """Read the CPU's features and the PAGELLM_* switches, once, for a model loading on `device` (None: cpu).

    A GPU gets the torch paths (the C++ kernels are CPU code) and builds nothing.
    """
    features = cpu_features()
    if device is not None and device.type != "cpu":
        return KernelPlan(features=features)
    env = os.environ.get
    module = load_kernel()
    return KernelPlan(
        features=features,
        module=module,
        attention=module is not None and env("PAGELLM_ATTENTION", "auto") != "torch",
        fused_decode=module is not None and env("PAGELLM_FUSED_DECODE", "1") != "0",
        packed_linears=env("PAGELLM_LINEAR", "auto") != "torch",
        int4_q8_activations=env("PAGELLM_INT4_ACT", "int8") != "float",
    )


def apply_kernel_plan(model: torch.nn.Module, plan: KernelPlan) -> None:
    """Hand every layer of `model` that runs a kernel (it has `use_kernels`) its part of `plan`."""
    for module in model.modules():
        if hasattr(module, "use_kernels"):
            module.use_kernels(plan)
    model.kernel_plan = plan


if __name__ == "__main__":  # `python -m pagellm.model.layers.kernels`: build (or find) the kernels
    logging.basicConfig(level=logging.INFO)
    print("CPU features:", " ".join(cpu_features().names) or "none that pagellm uses")
    ready = load_kernel() is not None
    print("C++ kernels:", f"ready ({kernel_module_name()})" if ready else "unavailable (torch paths)")


# ---- the same kernels as torch custom ops, for torch.compile (--compile) ----------------------------
# NOTE: eager code calls the pybind functions directly (a custom op's Python dispatch costs ~20 us a
# call); only traced code goes through these, so the compiled graph holds them as opaque calls.
_ops_registered = False


def compile_ops() -> bool:
    """Register torch.ops.pagellm.* over the C++ kernels; False when the kernels are unavailable."""
    global _ops_registered
    if _ops_registered:
        return True
    module = load_kernel()
    if module is None:
        return False
    @torch.library.custom_op("pagellm::int8_gemv", mutates_args=())
    def int8_gemv(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
        return module.int8_gemv(x, q, scales)

    @torch.library.custom_op("pagellm::int4_gemv", mutates_args=())
    def int4_gemv(x: Tensor, q: Tensor, scales: Tensor, mins: Tensor, q8_activations: bool) -> Tensor:
        return module.int4_gemv(x, q, scales, mins, q8_activations)

    @torch.library.custom_op("pagellm::paged_decode_attention", mutates_args=())
    def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                               seq_lens: Tensor, scale: float) -> Tensor:
        return module.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)

    @torch.library.custom_op("pagellm::write_kv", mutates_args=("k_cache", "v_cache"))
    def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
        from pagellm.model.layers.attention import write_kv as eager_write_kv  # NOTE: attention imports us

        eager_write_kv(k, v, k_cache, v_cache, slot_mapping)

    @int8_gemv.register_fake
    def _(x, q, scales):
        return x.new_empty(x.shape[0], q.shape[0])

    @int4_gemv.register_fake
    def _(x, q, scales, mins, q8_activations):
        return x.new_empty(x.shape[0], q.shape[0])

    @paged_decode_attention.register_fake
    def _(q, k_cache, v_cache, block_table, seq_lens, scale):
        return torch.empty_like(q)

    @write_kv.register_fake
    def _(k, v, k_cache, v_cache, slot_mapping):
        return None

    _ops_registered = True
    return True
