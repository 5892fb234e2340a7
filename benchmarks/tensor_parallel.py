"""Tensor parallelism on one machine: decode tokens/s with tensor_parallel_size 1 and 2, and the gloo costs.

W1's shape (256 prompt tokens, 128 generated, EOS ignored) at batch 1 and at batch 8, on the bundled SmolLM2,
each configuration in its own process:
  tp1        one process, all cores, the default decode path (the fused C++ layer stack)
  tp1-eager  one process, all cores, the per-layer path that tensor parallelism runs (PAGELLM_FUSED_DECODE=0)
  tp2        2 worker processes of cores/2 threads each, gloo over 127.0.0.1
plus the gloo collectives a tp2 decode step makes (2 all-reduces of [rows, hidden] per layer, one all-gather
of the [rows, vocab / 2] logits), timed alone over 2 processes: the arithmetic of docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, make_prompts, run_child, write_result  # noqa: E402

PROMPT_LEN, GEN_LEN = 256, 128
CONFIGS = {"tp1": (1, "1"), "tp1-eager": (1, "0"), "tp2": (2, "1")}  # name: (tensor_parallel_size, FUSED_DECODE)


def measure(config: str, batch: int, dtype: str, quantization: str) -> dict:
    from pagellm import LLM, SamplingParams

    tp, fused = CONFIGS[config]
    os.environ["PAGELLM_FUSED_DECODE"] = fused  # read when the kernel plan is made, at load (ranks inherit it)
    t0 = time.perf_counter()
    llm = LLM(dtype=dtype, quantization=quantization, max_num_seqs=batch, max_model_len=1024,
              tensor_parallel_size=tp)
    load_s = time.perf_counter() - t0
    prompts = make_prompts(batch + 1, PROMPT_LEN)
    llm.generate([prompts[-1]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    engine = llm.llm_engine
    rates = []
    for rep in range(2):
        params = SamplingParams(temperature=0, max_tokens=GEN_LEN, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{rep}-{i}", prompts[i], params)
        first, started = None, set()
        while engine.has_unfinished_requests():
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
            if first is None and len(started) == batch:  # decode is timed from when every request has a token
                first = time.perf_counter()
        rates.append(batch * (GEN_LEN - 1) / (time.perf_counter() - first))
        engine.reset_prefix_cache()
    if tp > 1:
        engine.worker.close()
    return {"load_s": round(load_s, 2), "decode_tok_s": round(max(rates), 2),
            "step_ms": round(1000 * batch / max(rates), 2)}


def _collective_rank(rank: int, port: int, hidden: int, vocab_shard: int, rows: int, iters: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.randn(rows, hidden)
    logits = torch.randn(rows, vocab_shard)
    parts = [torch.empty_like(logits) for _ in range(2)]
    for _ in range(20):
        dist.all_reduce(x)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    reduce_us = (time.perf_counter() - start) / iters * 1e6
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters // 4):
        dist.all_gather(parts, logits)
    gather_us = (time.perf_counter() - start) / (iters // 4) * 1e6
    if rank == 0:
        out[rows] = {"all_reduce_us": round(reduce_us, 1), "all_gather_logits_us": round(gather_us, 1)}
    dist.destroy_process_group()


def measure_collectives(batches: list[int]) -> dict:
    import socket

    import torch.multiprocessing as mp

    results = {}
    with mp.Manager() as manager:
        out = manager.dict()
        for rows in batches:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_collective_rank, args=(port, 576, 49152 // 2, rows, 400, out), nprocs=2, join=True)
        results = {f"rows_{k}": v for k, v in dict(out).items()}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tp1,tp1-eager,tp2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.batch, args.dtype, args.quantization)))
        return
    batches = [int(b) for b in args.batches.split(",")]
    result = {"workload": "W1 shape: 256 prompt tokens, 128 generated", "model": "bundled SmolLM2-135M-Instruct",
              "dtype": args.dtype, "quantization": args.quantization, "cores": os.cpu_count(),
              "lscpu_flags": _lscpu_flags(), "load_avg_before": list(os.getloadavg())}
    for batch in batches:
        for config in args.configs.split(","):
            result[f"{config}_batch{batch}"] = run_child(
                __file__, ["--config", config, "--batch", str(batch), "--dtype", args.dtype,
                           "--quantization", args.quantization])
            result[f"{config}_batch{batch}"]["load_avg_1min"] = load_average()
    result["gloo_collectives_2_ranks"] = measure_collectives(batches)
    for batch in batches:
        if f"tp2_batch{batch}" in result and f"tp1_batch{batch}" in result:
            tp2 = result[f"tp2_batch{batch}"]["decode_tok_s"]
            result[f"tp2_over_tp1_batch{batch}"] = round(tp2 / result[f"tp1_batch{batch}"]["decode_tok_s"], 3)
            if f"tp1-eager_batch{batch}" in result:
                eager = result[f"tp1-eager_batch{batch}"]["decode_tok_s"]
                result[f"tp2_over_tp1_eager_batch{batch}"] = round(tp2 / eager, 3)
    result["load_avg_after"] = list(os.getloadavg())
    write_result("tensor_parallel", result, args.out)


def _lscpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Flags")), "unknown")


if __name__ == "__main__":
    main()
