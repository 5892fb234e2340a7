"""`pagellm chat`: a multi-turn REPL that streams tokens as they are generated."""

from __future__ import annotations

import argparse
import sys


def run_repl(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.cli import engine_kwargs, sampling_params
    from pagellm.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    engine = llm.llm_engine
    params = sampling_params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    print("pagellm chat: /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        prompt = engine.input_processor.apply_chat_template(history)
        ids = engine.input_processor.tokenize(prompt, add_special_tokens=False)
        rid = engine.next_request_id()
        engine.add_request(rid, {"prompt": prompt, "prompt_token_ids": ids}, params)
        reply = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    delta = out.outputs[0].delta_text
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                    if out.finished:
                        reply = out.outputs[0].text
        except KeyboardInterrupt:
            engine.abort_request([rid])
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
