"""The `pagellm` command line: generate and the chat REPL, on the tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagellm import LLM, SamplingParams


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_no_chat_prints_the_greedy_text(tiny_llama_dir, tiny_llm):
    proc = _cli("generate", "--model", tiny_llama_dir, "--dtype", "float32", "--no-chat", "--max-tokens", "12",
                "--temperature", "0", "Once upon a time")
    assert proc.returncode == 0, proc.stderr
    expected = tiny_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=12),
                                 use_tqdm=False)[0].outputs[0].text
    assert proc.stdout == expected + "\n"


def test_chat_repl_keeps_the_history(tiny_llama_dir):
    proc = _cli("chat", "--model", tiny_llama_dir, "--dtype", "float32", "--max-tokens", "6", "--temperature", "0",
                stdin="Hello there\nAnd again\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    # the second turn is generated with the first turn (and its reply) in the prompt
    llm = LLM(tiny_llama_dir, dtype="float32", num_blocks=64, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=6)
    history = [{"role": "user", "content": "Hello there"}]
    first = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And again"}]
    second = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    assert proc.stdout == first + "\n" + second + "\n"


def test_missing_model_is_a_clear_error(tmp_path):
    proc = _cli("generate", "--model", str(tmp_path / "nope"), "hi")
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "never downloads" in proc.stderr


# Run in a fresh interpreter: generate (chat template, tokenize, one step, detokenize), then report the
# heavy modules that startup must not pay for.
_GENERATE_AND_LIST_MODULES = """
import sys
from pagellm.entrypoints.cli import main
assert main(sys.argv[1:]) == 0
heavy = ("transformers", "torch._dynamo", "sympy", "fastapi", "uvicorn")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m == "torch._dynamo"))
"""


@pytest.mark.parametrize("bundled", [False, True], ids=["tiny-hf-folder", "bundled-gguf"])
def test_generate_never_imports_transformers(tiny_llama_dir, bundled_tokenizer, bundled):
    # NOTE: bundled_tokenizer has converted (and cached) the GGUF tokenizer: a warm start
    model = [] if bundled else ["--model", tiny_llama_dir]
    proc = subprocess.run([sys.executable, "-c", _GENERATE_AND_LIST_MODULES, "generate", *model, "--max-tokens", "2",
                           "--temperature", "0", "What is the capital of France?"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout
