"""The `pagellm` command: generate, chat, serve."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="weights and activations dtype; auto = bfloat16 where the CPU has native bf16, "
                        "else float32 (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="max running sequences (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step (default: %(default)s)")
    g.add_argument("--block-size", type=int, default=16, help="KV cache block size (default: %(default)s)")
    g.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from memory)")
    g.add_argument("--kv-cache-memory", type=int, default=None,
                   help="KV cache bytes (default: enough for max-num-seqs full contexts, at most 2 GiB)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off (default: on)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="global seed (default: %(default)s)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_blocks=args.num_blocks, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching, scheduling_policy=args.scheduling_policy,
        seed=args.seed,
    )


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
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
