"""W1 and W2 on two checkouts of pagellm in the same run: a refactor must not cost speed.

    python benchmarks/before_after.py --before /path/to/old/checkout [--rounds 2]

Each measurement is a fresh process running this checkout's benchmark code (latency.py for W1: batch 1, 256
in, 128 out, the bundled GGUF's int4 path; throughput.py for W2: 64 x 256 in, 128 out, bf16 and int4) with `pagellm`
imported from one tree or the other. Rounds alternate before/after so slow drift of a shared machine hits both;
the best of the rounds is compared. Each tree gets its own C++ kernel build folder (the first run builds it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
AFTER = HERE.parent
WORKLOADS = {  # name -> (script, child arguments, the result's key, higher is better)
    "W1_int4_decode_tok_s": ("latency.py", ["--engine", "pagellm:int4", "--dtype", "auto"], "decode_tok_s"),
    "W1_int4_ttft_s": ("latency.py", ["--engine", "pagellm:int4", "--dtype", "auto"], "ttft_s"),
    "W2_bf16_output_tok_s": ("throughput.py", ["--engine", "pagellm", "--dtype", "bfloat16"], "output_tok_s"),
    "W2_int4_output_tok_s": ("throughput.py", ["--engine", "pagellm:int4", "--dtype", "auto"], "output_tok_s"),
}


def run(tree: Path, script: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_EXTENSIONS_DIR": str(tree / ".torch_ext"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(HERE / script), "--child", *args], env=env, capture_output=True,
                          text=True, cwd=tree)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{script} failed on {tree}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="a checkout of the old code (git worktree add ... <rev>)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    trees = {"before": Path(args.before).resolve(), "after": AFTER}
    runs: dict[str, dict[str, list[dict]]] = {name: {"before": [], "after": []} for name in WORKLOADS
                                             if not name.endswith("ttft_s")}
    loads = [load_average()]
    for round_ in range(args.rounds):
        order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
        for workload in runs:
            script, child_args, _ = WORKLOADS[workload]
            for name in order:
                runs[workload][name].append(run(trees[name], script, child_args))
                print(f"round {round_} {workload} {name}: {runs[workload][name][-1]}", file=sys.stderr)
        loads.append(load_average())
    result: dict = {"before": str(trees["before"]), "after": str(trees["after"]), "rounds": args.rounds,
                    "load_average": loads, "runs": runs, "compare": {}}
    for workload, (_, _, key) in WORKLOADS.items():
        lower_is_better = key.endswith("_s") and not key.endswith("tok_s")
        pick = min if lower_is_better else max
        source = runs["W1_int4_decode_tok_s"] if workload == "W1_int4_ttft_s" else runs[workload]
        before = pick(r[key] for r in source["before"])
        after = pick(r[key] for r in source["after"])
        result["compare"][workload] = {"before": before, "after": after,
                                       "after_over_before": after / before}
    write_result("before_after", result, args.out)


if __name__ == "__main__":
    main()
