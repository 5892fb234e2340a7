"""The `pagellm` command: generate, chat, serve, finetune, evaluate, monitor, recommend."""

from __future__ import annotations

import argparse
import gc
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pagellm.config import (  # noqa: E402 - after the env defaults
    DEFAULT_DECODE_STALL_RATIO,
    DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING,
)


def add_engine_args(p: argparse.ArgumentParser, positional_model: bool = False) -> None:
    """Engine flags shared by every sub-command (vLLM's names)."""
    if positional_model:
        p.add_argument("model", nargs="?", default=None,
                       help="HF folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    else:
        p.add_argument("--model", default=None,
                       help="HF folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    g.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N; auto = cuda when torch.cuda.is_available(), else cpu. On cuda "
                        "a GGUF loads dequantized and --quantization int8/int4, --compile and LoRA are not "
                        "supported yet (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="weights and activations dtype; auto = bfloat16 where the CPU has native bf16, "
                        "else float32 (default: %(default)s)")
    g.add_argument("--quantization", "-q", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantization, kept packed: int8 per channel, int4 in groups of 32; auto = "
                        "a Q4_0/Q4_1 or Q8_0 GGUF runs from its packed weights unless --dtype is given "
                        "(default: %(default)s)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="KV cache dtype; auto = the model's --dtype (so bfloat16 also where activations run in "
                        "float32 on CPUs without native bf16) (default: %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (dynamic shapes; compiling takes minutes at start, "
                        "cached on disk by torch after the first time) (default: off)")
    g.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="max running sequences (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (default: %(default)s)")
    g.add_argument("--max-prefill-tokens-while-decoding", type=int, default=DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING,
                   help="prompt tokens one step may compute while other requests are decoding, so a long "
                        "prompt cannot stall running streams; 0 = no bound (default: %(default)s)")
    g.add_argument("--decode-stall-ratio", type=float, default=DEFAULT_DECODE_STALL_RATIO,
                   help="a prompt longer than that bound, arriving while requests decode, is prefilled in chunks "
                        "sized from measured step times so a step takes at most about this many decode steps "
                        "(the long prompt then takes longer); 0 = off (default: %(default)s)")
    g.add_argument("--block-size", type=int, default=16, help="KV cache block size (default: %(default)s)")
    g.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from memory)")
    g.add_argument("--kv-cache-memory", type=int, default=None,
                   help="KV cache bytes (default: enough for max-num-seqs full contexts, at most 2 GiB)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off (default: on)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="global seed (default: %(default)s)")
    g.add_argument("--speculative-config", default=None,
                   help='speculative decoding as JSON, vLLM\'s fields, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
                        "(default: off)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N worker processes (torch.distributed: gloo on the CPU, nccl on "
                        "CUDA); each rank gets cores/N threads (default: %(default)s)")
    g.add_argument("--distributed-executor-backend", default=None, choices=["mp", "ray"],
                   help="how workers start: with --data-parallel-size, ray (its default: each replica a Ray "
                        "actor); with --tensor-parallel-size, mp (multiprocessing on this machine; ray is not "
                        "supported for tensor parallelism yet) (default: as those say)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_blocks=args.num_blocks, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching, scheduling_policy=args.scheduling_policy,
        max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
        decode_stall_ratio=args.decode_stall_ratio,
        seed=args.seed, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, compile=args.compile,
        device=args.device, speculative_config=args.speculative_config, **lora_kwargs(args),
        tensor_parallel_size=args.tensor_parallel_size, distributed_executor_backend=args.distributed_executor_backend,
    )


def lora_kwargs(args: argparse.Namespace) -> dict:
    """LoRA settings of `serve` (other commands have none)."""
    if not hasattr(args, "max_loras"):
        return {}
    return dict(enable_lora=bool(args.enable_lora or args.lora_modules), max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.7, help="(default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (default: none)")


def sampling_params(args: argparse.Namespace):
    from pagellm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    prompts = args.prompt or [sys.stdin.read()]
    if args.no_chat:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    for out in outs:
        print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.chat_repl import run_repl

    return run_repl(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.openai.api_server import run_server

    return run_server(args)


# ---- task adaptation: finetune / evaluate (logic in pagellm.adapt) -----------------------------
def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_finetune_parser(sub) -> None:
    from pagellm.adapt.finetune import FinetuneArgs

    d = FinetuneArgs(data="", out="")
    p = sub.add_parser("finetune", help="fine-tune a model for classification or generation (transformers Trainer "
                                        "+ PEFT)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, .gguf file, or smollm2 / minilm (the bundled decoder "
                                                 "/ encoder); default: smollm2")
    p.add_argument("--task", default=d.task, choices=["classify", "generate"])
    p.add_argument("--data", required=True, help="train file, .jsonl or .csv: text/label (classify); "
                                                 "prompt/completion or messages (generate)")
    p.add_argument("--eval-data", default=None, help="dev file: per-evaluation report, early stopping, best model")
    p.add_argument("--out", required=True, help="output folder (HF model or PEFT adapter, train_report.json)")
    p.add_argument("--strategy", default=d.strategy, help="head | top-layers:K | full | lora | adalora | prefix")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=None, help="default: per strategy (encoder head 10, else 3)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (linear schedule); default: per "
                   "strategy (encoder head 1e-3, head/top-layers/full 2e-5, lora/adalora 3e-4, prefix 1e-2)")
    g.add_argument("--warmup", type=float, default=d.warmup, help="warmup ratio of the steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--dropout", type=float, default=d.dropout, help="model dropout fields and lora_dropout")
    g.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE evaluations without improvement")
    g.add_argument("--metric", default=d.metric, choices=["accuracy", "macro_f1"], help="dev metric (classify)")
    g.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: every epoch)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-train-samples", type=int, default=None)
    g.add_argument("--max-eval-samples", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="default: encoder head 32, else 8")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps")
    g.add_argument("--max-length", type=int, default=d.max_length, help="max tokens per training row")
    g.add_argument("--logging-steps", type=int, default=d.logging_steps)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    g = p.add_argument_group("labels and adapters")
    g.add_argument("--labels", type=_name_list, default=None, help="class names in order, a,b (default: sorted)")
    g.add_argument("--instruction", default=None, help="decoder prompt instruction, with {labels}")
    g.add_argument("--lora-r", type=int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    g.add_argument("--lora-target-modules", type=_name_list, default=None, help="e.g. q_proj,v_proj "
                                                                                "(default: PEFT's per architecture)")
    g.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens, help="virtual tokens of prefix tuning")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from pagellm.adapt.finetune import FinetuneArgs, run_finetune

    if "PAGELLM_LOG" not in os.environ:
        logging.getLogger("pagellm.adapt").setLevel(logging.INFO)  # the per-epoch dev report
    result = run_finetune(FinetuneArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneArgs)}))
    best = f", best dev {result.best_metric:.4f}" if result.best_metric is not None else ""
    print(f"saved {result.strategy} ({result.num_trainable_params:,} of {result.num_total_params:,} parameters "
          f"trained, {result.epochs_run:g} epochs{best}, {result.wall_s:.0f}s) to {result.out_dir}")
    return 0


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="classification report of a model (or fine-tuned adapter) run by pagellm",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, .gguf file, or smollm2 / minilm; the base of a LoRA "
                                                 "adapter (default: from the adapter, else smollm2)")
    p.add_argument("--adapter", default=None, help="a pagellm finetune output folder")
    p.add_argument("--task", default="classify", choices=["classify"])
    p.add_argument("--data", required=True, help="labelled .jsonl or .csv (text, label)")
    p.add_argument("--labels", type=_name_list, default=None,
                   help="decoder label set a,b (default: the adapter's pagellm_task.json, else the data's)")
    p.add_argument("--instruction", default=None, help="decoder prompt instruction, with {labels}")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate a seeded random subset")
    p.add_argument("--seed", type=int, default=0, help="which --max-samples subset")
    p.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float32", "float16"])
    p.add_argument("--out-json", default=None, help="write the metrics and predictions here")
    p.add_argument("--compare-to", default=None, help="an earlier --out-json: print before/after side by side")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    from pagellm.adapt.evaluate import EvaluateArgs, run_evaluate

    result = run_evaluate(EvaluateArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvaluateArgs)}))
    print(result.format())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagellm", description="pagellm: a paged-KV-cache LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for one or more prompts",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="*", help="prompts (default: read one from stdin)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat that streams tokens")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p, positional_model=True)
    from pagellm.entrypoints.openai.server_args import add_server_args

    add_server_args(p)
    p.set_defaults(func=cmd_serve)

    add_finetune_parser(sub)
    add_evaluate_parser(sub)
    add_prune_parser(sub)
    from pagellm.entrypoints.bench import add_bench_parser

    add_bench_parser(sub, add_engine_args)
    from pagellm.apps.monitor.cli import add_monitor_parser

    add_monitor_parser(sub)
    from pagellm.apps.helpdesk.cli import add_helpdesk_parser

    add_helpdesk_parser(sub)
    from pagellm.apps.recommend.cli import add_recommend_parser

    add_recommend_parser(sub)
    return parser


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="drop whole decoder layers and write a loadable HF folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf file (default: the bundled SmolLM2)")
    p.add_argument("--drop-layers", required=True, help="layer indices to remove, e.g. 20,21 or 18-23")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="dtype of the written weights")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from pagellm.model.prune import prune_layers

    result = prune_layers(args.model, args.drop_layers, args.out, args.dtype)
    print(f"wrote {result.out_dir}: kept layers {result.kept_layers} ({result.num_params / 1e6:.1f}M parameters)")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=os.environ.get("PAGELLM_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from pagellm.errors import InvalidRequest

    try:
        return args.func(args)
    except InvalidRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if argv is None:  # the `pagellm` program, which exits next (tests pass argv and keep their process)
            # NOTE: interpreter shutdown runs the cyclic GC over every object torch and the model created
            # (~0.7 s of a 4 s `pagellm generate`); frozen objects are skipped and the OS frees their memory.
            # Refcounted frees, atexit handlers and stream flushes still run.
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
