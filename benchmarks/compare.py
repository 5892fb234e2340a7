"""pagellm against HF transformers on the same weights, W1 and W2, in one run: a table of ratios.

Runs benchmarks/latency.py (W1) and benchmarks/throughput.py (W2) with the same --engines, each engine
in its own process, and prints one markdown table (ratios are pagellm over HF; for TTFT and end to end,
HF's time over pagellm's, so above 1 is better everywhere). JSON of both runs goes to --out-dir.
Usage: python benchmarks/compare.py [--engines pagellm,pagellm:int4,pagellm:int4+compile,hf] [--skip-w2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, engines: str, dtype: str, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / script), "--engines", engines, "--dtype", dtype, "--out", str(out)]
    print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def table(w1: dict, w2: dict | None, engines: list[str]) -> str:
    rows = ["| engine | W1 TTFT | W1 decode tok/s | W1 end to end | W2 output tok/s | W2 peak RSS |",
            "|---|---:|---:|---:|---:|---:|"]
    for engine in engines:
        a = w1[engine]
        b = w2[engine] if w2 else None
        cells = [f"{a['ttft_s']:.2f} s", f"{a['decode_tok_s']:.1f}", f"{a['e2e_s']:.2f} s",
                 f"{b['output_tok_s']:.1f}" if b else "-", f"{b['peak_rss_mib']:.0f} MiB" if b else "-"]
        if engine != "hf":
            r1 = w1["ratios_vs_hf"][engine]
            cells[0] += f" ({r1['ttft_s']:.2f}x)"
            cells[1] += f" ({r1['decode_tok_s']:.2f}x)"
            cells[2] += f" ({r1['e2e_s']:.2f}x)"
            if w2:
                r2 = w2["ratios_vs_hf"][engine]
                cells[3] += f" ({r2['output_tok_s']:.2f}x)"
                cells[4] += f" ({r2['peak_rss_mib']:.2f}x)"
        rows.append(f"| {engine} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="pagellm,pagellm:int4,hf")
    p.add_argument("--dtype", default="bfloat16", help="HF's dtype and pagellm's unquantized dtype")
    p.add_argument("--w2-dtype", default="float32",
                   help="W2's dtype: HF's bf16 prefill is ~3x slower than its float32 on CPUs without AMX")
    p.add_argument("--skip-w2", action="store_true", help="W1 only (W2's HF run takes ~10 min here)")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    w1 = run("latency.py", args.engines, args.dtype, out / "compare_w1.json")
    w2 = None if args.skip_w2 else run("throughput.py", args.engines, args.w2_dtype, out / "compare_w2.json")
    print(table(w1, w2, engines))
    print(f"\nload average before/after: W1 {w1['load_avg_before']:.2f}/{w1['load_avg_after']:.2f}"
          + (f", W2 {w2['load_avg_before']:.2f}/{w2['load_avg_after']:.2f}" if w2 else ""))


if __name__ == "__main__":
    main()
