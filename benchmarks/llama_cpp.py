"""llama.cpp beside pagellm on the bundled Q4_1 GGUF, same run: W1 (batch 1) and optionally W2.

llama.cpp is not a dependency: build it from the llama-cpp-python sdist (vendor/llama.cpp), e.g.
  pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
  cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \\
        -DGGML_F16C=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
  cmake --build build -j2 --target llama-bench llama-batched-bench
(GGML_NATIVE=OFF: gcc 12 miscompiles llama.cpp's native AMX path.) Then:
  python benchmarks/llama_cpp.py --bin-dir build/bin [--w2]
W1 here is llama-bench's pp256 and tg128 (2 threads, flash attention off, its fastest setting on this
CPU) against benchmarks/latency.py's pagellm int4 run (the same Q4_1 blocks); W2 is llama-batched-bench
with 64 parallel sequences of 256 + 128 tokens against benchmarks/throughput.py's pagellm int4.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, run_child, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent


def llama_bench(bin_dir: Path, model: str) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", model, "-p", "256", "-n", "128", "-t", "2", "-fa", "0", "-r", "3",
           "-o", "json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    rates = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in out}
    return {"command": " ".join(cmd), "prefill_tok_s": rates["pp"], "decode_tok_s": rates["tg"],
            "ttft_s": 256 / rates["pp"], "e2e_s": 256 / rates["pp"] + 128 / rates["tg"]}


def batched_bench(bin_dir: Path, model: str) -> dict:
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", model, "-c", "32768", "-b", "2048", "-ub", "512",
           "-npp", "256", "-ntg", "128", "-npl", "64", "-t", "2", "-fa", "off"]
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = [line for line in text.splitlines() if line.startswith("|") and line.split("|")[1].strip() == "256"][-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    total_s = float(cells[8])
    return {"command": " ".join(cmd), "elapsed_s": total_s, "output_tok_s": 64 * 128 / total_s,
            "decode_only_tok_s": float(cells[7])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--w2", action="store_true", help="also W2 (about 10 min)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from pagellm.model_source import bundled_gguf_path

    model = str(bundled_gguf_path())
    bin_dir = Path(args.bin_dir)
    result = {"workload": "llama.cpp side by side", "model": model, "load_avg_before": load_average()}
    result["w1_llama_cpp"] = llama_bench(bin_dir, model)
    result["w1_pagellm_int4"] = run_child(str(HERE / "latency.py"), ["--engine", "pagellm:int4", "--dtype", "bfloat16"])
    a, b = result["w1_pagellm_int4"], result["w1_llama_cpp"]
    result["w1_ratios_pagellm_vs_llama_cpp"] = {"decode_tok_s": a["decode_tok_s"] / b["decode_tok_s"],
                                                "ttft_llama_over_pagellm": b["ttft_s"] / a["ttft_s"],
                                                "e2e_llama_over_pagellm": b["e2e_s"] / a["e2e_s"]}
    if args.w2:
        result["w2_llama_cpp"] = batched_bench(bin_dir, model)
        result["w2_pagellm_int4"] = run_child(str(HERE / "throughput.py"),
                                              ["--engine", "pagellm:int4", "--dtype", "bfloat16",
                                               "--max-num-seqs", "64", "--max-num-batched-tokens", "2048"])
        result["w2_ratio_pagellm_vs_llama_cpp"] = (result["w2_pagellm_int4"]["output_tok_s"]
                                                   / result["w2_llama_cpp"]["output_tok_s"])
    result["load_avg_after"] = load_average()
    write_result("llama_cpp", result, args.out)


if __name__ == "__main__":
    main()
