"""Accuracy of packed int8/int4 weights against bf16, on the bundled SmolLM2, in one run.

For each scheme, in its own process: perplexity on the fixed English text (benchmarks/common.py:
the committed sentiment sample), both through prefill (windows of 512 tokens, the path of long
prompts) and through decode (the first DECODE_TOKENS tokens fed one per step, teacher-forced: the
path, and the kernels, that generate text), greedy outputs of 6 prompts x 48 tokens compared with
bf16, the packed weight bytes, load time and peak RSS. Schemes:
  bf16         the GGUF dequantized to bfloat16 values (the reference)
  int4-gguf    the GGUF's own Q4_1 blocks, kept packed (the default: --quantization auto); its
               few-row kernel quantizes activations to int8 per 32-wide block (as llama.cpp does)
  int4-gguf-float-act  the same with float activations (PAGELLM_INT4_ACT=float)
  int4-gguf-bf16-act   the same Q4_1 blocks under bf16 activations: the branch CPUs with native bf16
               took before issue 12 (now through the packed kernels, not dequantization); kept to
               measure what computing a packed model in bf16 would cost
  int8         bf16 weights quantized per channel by pagellm
  int4         bf16 weights quantized in groups of 32 by pagellm
The last two start from an HF folder of the dequantized model, so pagellm's own quantizers run.
--cpu-kind avx2|avx512_bf16|amx takes that CPU kind's branch (patched detection: numerics only);
--schemes picks some schemes (bf16 is always measured: the reference).
Usage: python benchmarks/quantization.py [--out FILE] [--cpu-kind KIND] [--schemes a,b]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    CPU_KINDS,
    apply_cpu_kind,
    base_parser,
    fixed_text,
    load_average,
    peak_rss_mib,
    run_child,
    write_result,
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "List three prime numbers.",
    "Once upon a time",
    "The stock market today",
]
GEN_LEN = 48
DECODE_TOKENS = 1024
SCHEMES = {  # name -> (source, LLM keyword arguments)
    "bf16": ("gguf", {"dtype": "bfloat16", "quantization": "none"}),
    "int4-gguf": ("gguf", {"quantization": "auto"}),
    "int4-gguf-float-act": ("gguf", {"quantization": "auto"}),
    "int4-gguf-bf16-act": ("gguf", {"quantization": "auto"}),
    "int8": ("folder", {"dtype": "bfloat16", "quantization": "int8"}),
    "int4": ("folder", {"dtype": "bfloat16", "quantization": "int4"}),
}


def measure(scheme: str, folder: str) -> dict:
    from pagellm import LLM, SamplingParams
    from pagellm.engine.perplexity import perplexity
    from pagellm.model.layers.quant import QuantizedLinear

    source, kwargs = SCHEMES[scheme]
    if scheme.endswith("-float-act"):
        os.environ["PAGELLM_INT4_ACT"] = "float"  # read by the C++ int4 kernel on each call
    if scheme.endswith("-bf16-act"):  # packed weights under bf16 activations, as before issue 12
        import torch

        from pagellm.model.loader import model_loader

        dtype_for = model_loader.compute_dtype_for
        model_loader.compute_dtype_for = lambda dtype, device=None, quantization=None: (
            torch.bfloat16 if quantization else dtype_for(dtype, device))
    start = time.perf_counter()
    llm = LLM(folder if source == "folder" else None, max_num_seqs=8, **kwargs)
    load_s = time.perf_counter() - start
    model = llm.llm_engine.worker.model
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    ppl = perplexity(llm, fixed_text(), window=512)
    decode_ppl = decode_perplexity(llm, fixed_text(), DECODE_TOKENS)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                    SamplingParams(temperature=0, max_tokens=GEN_LEN), use_tqdm=False)
    return {"quantization": model.quantization, "load_s": load_s, "perplexity": ppl.perplexity,
            "num_tokens": ppl.num_tokens, "decode_perplexity": decode_ppl,
            "greedy": [o.outputs[0].token_ids for o in outs],
            "texts": [o.outputs[0].text for o in outs],
            "packed_weight_mib": sum(m.weight_bytes() for m in linears) / 2**20, "peak_rss_mib": peak_rss_mib()}


def decode_perplexity(llm, text: str, num_tokens: int) -> float:
    """Perplexity of the text's first tokens, each fed as a one-token decode step (what generation runs)."""
    import math

    import torch

    runner = llm.llm_engine.core.worker.runner
    model, block_size = runner.model, runner.block_size
    ids = llm.get_tokenizer().encode(text)[:num_tokens]
    table = torch.arange(-(-len(ids) // block_size)).view(1, -1)
    nll = 0.0
    with torch.inference_mode():
        for t in range(len(ids) - 1):
            token, pos, seq_len = torch.tensor([ids[t]]), torch.tensor([t]), torch.tensor([t + 1])
            blocks = table[:, : t // block_size + 1].contiguous()
            if runner.fused_decode is not None:
                hidden = runner.fused_decode.forward(model.embed_tokens(token), pos, pos, blocks, seq_len)
            else:
                hidden = model.decode_forward(token, pos, runner.kv_caches, pos, blocks, seq_len)
            nll -= torch.log_softmax(model.compute_logits(hidden)[0], -1)[ids[t + 1]].item()
    return math.exp(nll / (len(ids) - 1))


def write_dequantized_folder(path: str) -> None:
    """The bundled GGUF as a bf16 HF folder (what an unquantized checkpoint looks like)."""
    import torch
    from safetensors.torch import save_file

    from pagellm.model.loader.model_loader import checkpoint_weights
    from pagellm.model_source import resolve_model
    from pagellm.tokenizer import load_hf_tokenizer

    source = resolve_model(None)
    config, weights = checkpoint_weights(source)
    config.save_pretrained(path)
    save_file({n: t.to(torch.bfloat16).contiguous() for n, t in weights}, f"{path}/model.safetensors")
    load_hf_tokenizer(source).save_pretrained(path)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical sequences, and the mean length of the common prefix, in tokens."""
    prefixes = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefixes.append(n)
    return {"identical": sum(x == y for x, y in zip(a, b)), "of": len(a),
            "mean_common_prefix": sum(prefixes) / len(prefixes)}


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--scheme", default=None, help=__import__("argparse").SUPPRESS)
    p.add_argument("--folder", default="", help=__import__("argparse").SUPPRESS)
    p.add_argument("--cpu-kind", default="native", choices=["native", *CPU_KINDS])
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma list (default: all)")
    args = p.parse_args()
    if args.child:
        apply_cpu_kind(args.cpu_kind)
        print(json.dumps(measure(args.scheme, args.folder)))
        return
    schemes = ["bf16"] + [s for s in args.schemes.split(",") if s != "bf16"]
    if unknown := set(schemes) - set(SCHEMES):
        raise SystemExit(f"unknown schemes {sorted(unknown)}; choose from {', '.join(SCHEMES)}")
    result = {"workload": "quantization accuracy", "text": "tests/data/sentiment (joined)", "gen_len": GEN_LEN,
              "cpu_kind": args.cpu_kind, "load_avg_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        if any(SCHEMES[s][0] == "folder" for s in schemes):
            write_dequantized_folder(tmp)
        for scheme in schemes:
            result[scheme] = run_child(__file__, ["--scheme", scheme, "--folder", tmp, "--cpu-kind", args.cpu_kind])
    ref = result["bf16"]
    for scheme in schemes:
        r = result[scheme]
        r["perplexity_vs_bf16"] = r["perplexity"] / ref["perplexity"]
        r["decode_perplexity_vs_bf16"] = r["decode_perplexity"] / ref["decode_perplexity"]
        r["greedy_vs_bf16"] = agreement(r["greedy"], ref["greedy"])
    result["load_avg_after"] = load_average()
    write_result("quantization", result, args.out)


if __name__ == "__main__":
    main()
