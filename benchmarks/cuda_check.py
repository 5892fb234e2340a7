"""One-shot GPU check of device="cuda": greedy tokens against HF transformers, then throughput, then the GPU tests.

    PYTHONPATH=. PAGELLM_KERNELS=torch python3 benchmarks/cuda_check.py --out $OUT/cuda_check.json
    PYTHONPATH=. python3 benchmarks/cuda_check.py --device cpu --small --out /tmp/cuda_check.json   # dry run

Needs torch, transformers, tokenizers, safetensors, jinja2, numpy, pytest (not gguf/fastapi/pydantic): every model is
built from random weights (tests/tiny_models.py). Sections:
1. correctness: tiny Llama and Qwen2, a batch of prompts of different lengths on `--device`, float32 greedy tokens
   equal to HF `generate` on the same device (PASS/FAIL per case, also chunked prefill and a prefix-cache hit);
   bf16 match rate.
2. throughput: SmolLM2-135M's shapes (random weights), bf16: W2-like 64 x 256 prompt tokens, 128 generated
   (EOS ignored) and W1-like batch-1 decode, pagellm and HF `generate` in the same run, with ratios.
3. `python -m pytest -q tests/worker/test_cuda.py` (skipped with --no-pytest or --small).
Each section records an error instead of stopping the others; all results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONUNBUFFERED", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.tiny_models import llama_config, qwen2_config, save_causal_lm, smollm2_135m_config  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(num)]


def hf_model(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def hf_greedy_one_by_one(model, prompts: list[list[int]], max_new: int, device: str) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, pad_token_id=0)
            out.append(ref[0, len(p):].tolist())
    return out


def pagellm_greedy(path: str, prompts, max_new: int, device: str, dtype: str, **kw) -> tuple[list[list[int]], object]:
    from pagellm import LLM, SamplingParams

    args = dict(max_num_seqs=16, max_num_batched_tokens=512, block_size=16, num_blocks=256) | kw
    llm = LLM(path, dtype=dtype, device=device, **args)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def matched_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- 1. correctness --------------------------------------------------------------------------------------
def check_correctness(workdir: Path, device: str) -> dict:
    prompts = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate([3, 17, 40, 9, 25, 61, 1, 33])]
    max_new = 24
    cases: dict[str, dict] = {}
    for name, config in (("llama", llama_config()), ("qwen2", qwen2_config())):
        path = save_causal_lm(workdir / name, config)
        hf32 = hf_model(path, torch.float32, device)
        ref = hf_greedy_one_by_one(hf32, prompts, max_new, device)
        del hf32
        runs = {
            "fp32_batch": dict(),
            "fp32_chunked_prefill": dict(max_num_seqs=4, max_num_batched_tokens=7, enable_prefix_caching=False),
        }
        for case, kw in runs.items():
            tokens, _ = pagellm_greedy(path, prompts, max_new, device, "float32", **kw)
            cases[f"{name}_{case}"] = {"pass": tokens == ref,
                                       "prompts_equal": sum(t == r for t, r in zip(tokens, ref)),
                                       "num_prompts": len(prompts)}
        # prefix cache: the same batch twice on one engine; the second run must hit the cache and still match
        from pagellm import SamplingParams

        tokens, llm = pagellm_greedy(path, prompts, max_new, device, "float32", max_num_batched_tokens=64)
        again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True),
                             use_tqdm=False)
        hits = llm.llm_engine.core.scheduler.prefix_cache_hits
        cases[f"{name}_fp32_prefix_cache_hit"] = {
            "pass": tokens == ref and [o.outputs[0].token_ids for o in again] == ref and hits > 0,
            "prefix_cache_hits": hits}
        del llm
        # bf16: kernels differ between the two engines, so near-ties may flip; a match rate, not a verdict
        hf16 = hf_model(path, torch.bfloat16, device)
        ref16 = hf_greedy_one_by_one(hf16, prompts, max_new, device)
        del hf16
        tokens16, _ = pagellm_greedy(path, prompts, max_new, device, "bfloat16")
        cases[f"{name}_bf16_batch"] = {
            "prompts_equal": sum(t == r for t, r in zip(tokens16, ref16)), "num_prompts": len(prompts),
            "matched_prefix_fraction": sum(matched_prefix(t, r) for t, r in zip(tokens16, ref16))
            / (max_new * len(prompts)),
            "first_token_match": sum(t[0] == r[0] for t, r in zip(tokens16, ref16)) / len(prompts)}
        for case in (k for k in cases if k.startswith(name)):
            verdict = cases[case].get("pass")
            label = "INFO" if verdict is None else ("PASS" if verdict else "FAIL")
            log(f"{label} {case}: {json.dumps(cases[case])}")
    return cases


# ---- 2. throughput ---------------------------------------------------------------------------------------
def measure_pagellm(path: str, device: str, w2: tuple[int, int, int], w1: tuple[int, int]) -> dict:
    from pagellm import LLM, SamplingParams

    num, prompt_len, gen = w2
    llm = LLM(path, dtype="bfloat16", device=device, max_num_seqs=num, max_num_batched_tokens=2048,
              max_model_len=1024, enable_prefix_caching=False)
    prompts = random_prompts(num, prompt_len, llm.llm_engine.worker.model.config.vocab_size)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == gen for o in outs)
    result = {"w2_s": elapsed, "w2_output_tok_s": num * gen / elapsed,
              "w2_total_tok_s": num * (prompt_len + gen) / elapsed}
    w1_prompt, w1_gen = w1
    prompt = random_prompts(1, w1_prompt, llm.llm_engine.worker.model.config.vocab_size, seed=1)
    ttft, total = _two_runs(lambda n: llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                                   use_tqdm=False), w1_gen, device)
    result |= {"w1_ttft_s": ttft, "w1_decode_tok_s": (w1_gen - 1) / (total - ttft)}
    if device.startswith("cuda"):
        result["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure_hf(path: str, device: str, w2: tuple[int, int, int], w1: tuple[int, int]) -> dict:
    num, prompt_len, gen = w2
    model = hf_model(path, torch.bfloat16, device)
    vocab = model.config.vocab_size
    prompts = torch.tensor(random_prompts(num, prompt_len, vocab), device=device)

    def generate(ids: torch.Tensor, n: int):
        with torch.inference_mode():
            # every prompt has the same length, so left padding never applies; the mask is all ones
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)

    generate(prompts[:2], 4)  # warm-up
    sync(device)
    start = time.perf_counter()
    out = generate(prompts, gen)
    sync(device)
    elapsed = time.perf_counter() - start
    assert out.shape == (num, prompt_len + gen)
    result = {"w2_s": elapsed, "w2_output_tok_s": num * gen / elapsed,
              "w2_total_tok_s": num * (prompt_len + gen) / elapsed}
    w1_prompt, w1_gen = w1
    prompt = torch.tensor(random_prompts(1, w1_prompt, vocab, seed=1), device=device)
    ttft, total = _two_runs(lambda n: generate(prompt, n), w1_gen, device)
    result |= {"w1_ttft_s": ttft, "w1_decode_tok_s": (w1_gen - 1) / (total - ttft)}
    return result


def _two_runs(run, gen: int, device: str) -> tuple[float, float]:
    """(seconds for 1 token, seconds for `gen` tokens), each the best of 2."""
    times = []
    for n in (1, gen):
        best = float("inf")
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            run(n)
            sync(device)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return times[0], times[1]


def check_throughput(workdir: Path, device: str, small: bool) -> dict:
    if small:  # the dry run: a 4-layer model of the same widths, a small workload
        config = smollm2_135m_config()
        config.num_hidden_layers, config.max_position_embeddings = 4, 1024
        w2, w1 = (8, 64, 16), (64, 16)
    else:
        config = smollm2_135m_config()
        config.max_position_embeddings = 1024  # room for 256 + 128; a smaller KV cache and rotary table
        w2, w1 = (64, 256, 128), (256, 128)
    log(f"saving a random {config.num_hidden_layers}-layer SmolLM2-135M-shaped model")
    path = save_causal_lm(workdir / "smollm2_shape", config, std=0.02)
    result: dict = {"workload": {"w2_prompts_prompt_len_gen": w2, "w1_prompt_len_gen": w1, "dtype": "bfloat16"}}
    for name, fn in (("pagellm", measure_pagellm), ("hf", measure_hf)):
        try:
            result[name] = fn(path, device, w2, w1)
            log(f"{name}: {json.dumps(result[name])}")
        except Exception:
            result[name] = {"error": traceback.format_exc()}
            log(f"{name} FAILED:\n{result[name]['error']}")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "error" not in result["pagellm"] and "error" not in result["hf"]:
        p, h = result["pagellm"], result["hf"]
        result["ratios_pagellm_over_hf"] = {
            "w2_output_tok_s": p["w2_output_tok_s"] / h["w2_output_tok_s"],
            "w1_decode_tok_s": p["w1_decode_tok_s"] / h["w1_decode_tok_s"],
            "w1_ttft_lower_by": h["w1_ttft_s"] / p["w1_ttft_s"],
        }
        log(f"ratios: {json.dumps(result['ratios_pagellm_over_hf'])}")
    return result


# ---- 3. the GPU tests ------------------------------------------------------------------------------------
def run_pytest(timeout_s: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/worker/test_cuda.py"]
    log(f"running {' '.join(cmd[1:])}")
    env = os.environ | {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {"returncode": None, "error": f"timed out after {timeout_s}s", "tail": str(exc.stdout)[-3000:]}
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(tail, flush=True)
    return {"returncode": proc.returncode, "pass": proc.returncode == 0, "tail": tail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cuda_check.json")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: a dry run of this script)")
    parser.add_argument("--small", action="store_true", help="a small throughput workload, no pytest (dry run)")
    parser.add_argument("--no-pytest", action="store_true")
    parser.add_argument("--pytest-timeout", type=int, default=150)
    args = parser.parse_args()
    result: dict = {"device": args.device, "torch": torch.__version__,
                    "cuda_available": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "PAGELLM_KERNELS": os.environ.get("PAGELLM_KERNELS")}
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    log(f"start: {json.dumps(result)}")
    with tempfile.TemporaryDirectory(prefix="cuda_check_") as tmp:
        for section, fn in (("correctness", lambda: check_correctness(Path(tmp), args.device)),
                            ("throughput", lambda: check_throughput(Path(tmp), args.device, args.small))):
            log(f"== {section}")
            try:
                result[section] = fn()
            except Exception:
                result[section] = {"error": traceback.format_exc()}
                log(f"{section} FAILED:\n{result[section]['error']}")
            Path(args.out).write_text(json.dumps(result, indent=2))  # partial results survive a later crash
    cases = result.get("correctness", {})
    result["correctness_pass"] = "error" not in cases and all(c.get("pass", True) for c in cases.values())
    if not (args.no_pytest or args.small):
        log("== pytest")
        result["pytest"] = run_pytest(args.pytest_timeout)
    result["wall_s"] = time.perf_counter() - T0
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "pytest"}, indent=2), flush=True)
    log(f"wrote {args.out}; correctness {'PASS' if result['correctness_pass'] else 'FAIL'}")
    return 0 if result["correctness_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
