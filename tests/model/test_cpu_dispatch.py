"""Every CPU kind's branch, forced by patching the feature detection, on any machine.

Issue 12: on a CPU with native bf16 (AVX512-BF16 or AMX) a packed int4/int8 model computed in bf16, so
its few-row matmuls fell back to dequantizing the whole matrix and the fused decode stack was skipped.
These tests run that branch here: packed models decode through the packed kernels and the C++ stack on
every CPU kind, and their greedy tokens do not depend on the kind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.model.layers import kernels
from pagellm.model.layers.kernels import CpuFeatures
from pagellm.model.layers.quant import QuantizedLinear
from pagellm.model.loader.model_loader import compute_dtype_for, load_model
from pagellm.model_source import resolve_model

# What lscpu reported on the three CPU kinds this project has run on
AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 avx2 bmi2"
ZEN4 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx512vbmi"
SAPPHIRE_RAPIDS = ZEN4 + " avx512_fp16 amx_bf16 amx_tile amx_int8"
CPU_KINDS = {"avx2": AVX2, "avx512_bf16": ZEN4, "amx": SAPPHIRE_RAPIDS}

needs_kernels = pytest.mark.skipif(kernels.load_kernel() is None, reason="C++ kernels unavailable (no compiler)")


@pytest.fixture(params=list(CPU_KINDS))
def cpu_kind(request, monkeypatch) -> str:
    """Make pagellm see this CPU kind's features (the kernels themselves stay the machine's build)."""
    features = CpuFeatures.from_flags(CPU_KINDS[request.param])
    monkeypatch.setattr(kernels, "cpu_features", lambda: features)
    return request.param


def test_features_parse_the_cpuinfo_flags():
    avx2, zen4, spr = (CpuFeatures.from_flags(CPU_KINDS[k]) for k in ("avx2", "avx512_bf16", "amx"))
    assert avx2.avx2 and avx2.fma and not avx2.avx512f and not avx2.native_bf16
    assert zen4.avx512_vnni and zen4.avx512_bf16 and zen4.native_bf16 and not zen4.amx_bf16
    assert spr.amx_bf16 and spr.amx_int8 and spr.amx_tile and spr.native_bf16
    assert len({avx2.build_key(), zen4.build_key(), spr.build_key()}) == 3  # one kernel build per kind
    assert kernels.kernel_module_name(zen4) != kernels.kernel_module_name(avx2)
    assert CpuFeatures.from_flags("") == CpuFeatures() and not CpuFeatures().native_bf16


def test_this_machine_is_read_from_proc_cpuinfo():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    features = kernels._detected_features()  # NOTE: what the build is for, whatever PAGELLM_CPU_FLAGS says
    assert features.avx2 == ("avx2" in flags) and features.avx512_bf16 == ("avx512_bf16" in flags)
    assert features.build_key() in kernels.kernel_module_name()


def test_each_source_folder_builds_into_its_own_folder(monkeypatch, tmp_path):
    """Two checkouts share ~/.cache/torch_extensions: one build folder each, or they rebuild over each other."""
    here = kernels.kernel_module_name()
    monkeypatch.setattr(kernels, "_SOURCES", [tmp_path / "other_checkout" / "csrc" / "x.cpp"])
    assert kernels.kernel_module_name() != here


def test_pagellm_cpu_flags_takes_another_kinds_branch_but_not_its_build(monkeypatch):
    monkeypatch.setenv("PAGELLM_CPU_FLAGS", ZEN4)
    kernels.cpu_features.cache_clear()
    try:
        assert kernels.cpu_features() == CpuFeatures.from_flags(ZEN4)
        assert kernels.kernel_module_name() == kernels.kernel_module_name(kernels._detected_features())
    finally:
        monkeypatch.delenv("PAGELLM_CPU_FLAGS")
        kernels.cpu_features.cache_clear()


@needs_kernels
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load(tmp_path):
    """torch's loader waits forever on the `lock` file a killed build leaves; pagellm's loader clears it."""
    name = kernels.kernel_module_name()
    built = kernels._build_directory(name)
    ext_root = tmp_path / "ext"
    copy = ext_root / built.parent.name / name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "pagellm.flock"))  # keeps mtimes: no rebuild
    (copy / "lock").touch()  # what a build killed mid-way leaves behind
    code = "from pagellm.model.layers.kernels import load_kernel; assert load_kernel() is not None"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_root)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removing a kernel build lock" in done.stderr
    assert not (copy / "lock").exists()


def test_activation_dtype_per_cpu_kind(cpu_kind):
    native = cpu_kind != "avx2"
    assert compute_dtype_for(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    for scheme in ("int8", "int4"):  # packed weights: float32 activations on every kind
        assert compute_dtype_for(torch.bfloat16, None, scheme) == torch.float32
    assert compute_dtype_for(torch.float32) == torch.float32


class _CountingStack:
    """Wraps the C++ decode stack to count the steps it runs."""

    def __init__(self, stack) -> None:
        self.stack, self.calls = stack, 0

    def forward(self, *args):
        self.calls += 1
        return self.stack.forward(*args)


@needs_kernels
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_packed_decode_runs_the_kernels_and_fused_stack_on_every_cpu_kind(cpu_kind, scheme, tiny_llama_dir,
                                                                          monkeypatch):
    llm = LLM(tiny_llama_dir, dtype="bfloat16", quantization=scheme, block_size=4, num_blocks=64)
    runner = llm.llm_engine.core.worker.runner
    assert runner.model.embed_tokens.weight.dtype == torch.float32  # activations, whatever the kind
    assert runner.fused_decode is not None, f"no fused decode stack on {cpu_kind}"
    counting = _CountingStack(runner.fused_decode)
    runner.fused_decode = counting
    dequantized = []
    original = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, *a: dequantized.append(self) or original(self, *a))
    out = llm.generate([list(range(100, 120)), list(range(300, 310))],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]
    assert counting.calls == 5  # every step after the prompt's
    assert dequantized == [], f"{len(dequantized)} dequantize calls on {cpu_kind}"


@needs_kernels
def test_packed_greedy_tokens_do_not_depend_on_the_cpu_kind(tiny_llama_dir, monkeypatch):
    tokens = {}
    prompts = [list(range(40, 70)), list(range(500, 507))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    for kind, flags in CPU_KINDS.items():
        monkeypatch.setattr(kernels, "cpu_features", lambda flags=flags: CpuFeatures.from_flags(flags))
        llm = LLM(tiny_llama_dir, dtype="bfloat16", quantization="int4", block_size=4, num_blocks=64)
        tokens[kind] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["avx512_bf16"] == tokens["avx2"] and tokens["amx"] == tokens["avx2"]


@needs_kernels
def test_packed_layer_takes_bf16_rows_without_dequantizing(tiny_llama_dir, monkeypatch):
    """A caller holding bf16 activations (e.g. an adapter computing in bf16) still gets the kernel."""
    model = load_model(resolve_model(tiny_llama_dir), torch.float32, "int4")
    layer = model.layers[0].mlp.down_proj
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda *a: pytest.fail("dequantized a packed layer"))
    x = torch.randn(3, layer.in_features)
    with torch.inference_mode():
        got = layer(x.to(torch.bfloat16))
        want = layer(x.to(torch.bfloat16).float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16))


@needs_kernels
def test_the_kernel_plan_is_read_once_at_load_and_handed_to_every_layer(tiny_llama_dir, monkeypatch):
    from pagellm.model.layers.linear import Linear
    from pagellm.model.layers.norm import RMSNorm

    monkeypatch.setenv("PAGELLM_ATTENTION", "torch")
    monkeypatch.setenv("PAGELLM_INT4_ACT", "float")
    model = load_model(resolve_model(tiny_llama_dir), torch.float32, "int4")
    plan = model.kernel_plan
    assert plan.module is kernels.load_kernel() and not plan.attention and not plan.int4_q8_activations
    assert plan.features == kernels.cpu_features() and plan.fused_decode and plan.packed_linears
    monkeypatch.setenv("PAGELLM_INT4_ACT", "int8")  # after the load: changes nothing
    monkeypatch.delenv("PAGELLM_ATTENTION")
    layers = list(model.modules())
    assert all(m.cpp is plan.module and not m.q8_activations for m in layers if isinstance(m, QuantizedLinear))
    assert all(m.cpp is plan.module for m in layers if isinstance(m, (Linear, RMSNorm)))
    assert all(layer.self_attn.decode_kernel is None for layer in model.layers)
    other = load_model(resolve_model(tiny_llama_dir), torch.float32, "int4")  # a new load reads the switches anew
    assert other.kernel_plan.int4_q8_activations and other.layers[0].self_attn.decode_kernel is plan.module


def test_a_gpu_load_plans_the_torch_paths():
    plan = kernels.plan_kernels(torch.device("cuda"))
    assert plan.module is None and not plan.fused_decode and not plan.attention
