"""Structured output cost: decode tokens/s with and without a JSON schema (batch 1 and 16), and TTFT with a
cold and a cached grammar, all in one run on the bundled SmolLM2-135M-Instruct.

Constrained requests use schemas that cannot end before max_tokens, so both sides decode the same number
of tokens: "string" (one long free-text string field: the common case) and "structure" (an array of small
objects: a new mask shape at almost every token). Unconstrained requests ignore EOS. Repeats interleave
the two sides so machine load hits both alike.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid

sys.path.insert(0, __file__.rsplit("/", 1)[0])
sys.path.insert(1, __file__.rsplit("/", 2)[0])  # the repo root: tests.structured_output for a sampler row
from common import base_parser, load_average, write_result  # noqa: E402

GEN_LEN = 128
SCHEMAS = {
    "string": {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
               "required": ["story"]},
    "structure": {"type": "object", "properties": {"rows": {"type": "array", "minItems": 200, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "ok": {"type": "boolean"}},
        "required": ["id", "ok"], "additionalProperties": False}}}, "required": ["rows"]},
}
TOPICS = ["the sea", "a city at night", "an old library", "a mountain road", "a busy kitchen", "a quiet farm",
          "a train station", "a desert camp", "a winter market", "a river town", "a space station", "a forest",
          "a harbour", "a school day", "a football match", "a museum"]


def prompts(llm, batch: int, offset: int = 0) -> list[dict]:
    tok = llm.llm_engine.tokenizer
    out = []
    for i in range(batch):
        ask = f"Write a long story about {TOPICS[(i + offset) % 16]} as a JSON object."
        text = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=False, add_generation_prompt=True)
        out.append({"prompt_token_ids": tok.encode(text, add_special_tokens=False)})
    return out


def run_batch(llm, batch: int, schema: dict | None, offset: int = 0) -> tuple[float, float, int]:
    """(decode tokens/s after every request has its first token, TTFT of the first request, tokens)."""
    from pagellm import SamplingParams
    from pagellm.structured_output import StructuredOutputsParams

    engine = llm.llm_engine
    engine.core.scheduler.reset_prefix_cache()
    so = StructuredOutputsParams(json=schema) if schema is not None else None
    params = SamplingParams(temperature=0, max_tokens=GEN_LEN, ignore_eos=so is None, structured_outputs=so)
    start = time.perf_counter()
    ids = []
    for p in prompts(llm, batch, offset):
        ids.append(f"b{uuid.uuid4().hex[:8]}")
        engine.add_request(ids[-1], p, params)
    num_tokens: dict[str, int] = {}
    first_token_at = decode_from = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            num_tokens[out.request_id] = len(out.outputs[0].token_ids)
        now = time.perf_counter()
        if first_token_at is None and num_tokens:
            first_token_at = now
        if decode_from is None and len(num_tokens) == batch:
            decode_from, tokens_at_decode = now, sum(num_tokens.values())
    end = time.perf_counter()
    decoded = sum(num_tokens.values()) - tokens_at_decode
    return decoded / (end - decode_from), first_token_at - start, sum(num_tokens.values())


def run_batch_ttft(llm, schema: dict | None, offset: int) -> float:
    from pagellm import SamplingParams
    from pagellm.structured_output import StructuredOutputsParams

    engine = llm.llm_engine
    engine.core.scheduler.reset_prefix_cache()
    so = StructuredOutputsParams(json=schema) if schema is not None else None
    params = SamplingParams(temperature=0, max_tokens=1, structured_outputs=so)
    prompt = prompts(llm, 1, offset)[0]
    start = time.perf_counter()
    engine.add_request(f"t{uuid.uuid4().hex[:8]}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def mask_cost_ms(llm, batch: int, name: str, prefix: str, iters: int = 50) -> float:
    """Per-step grammar work of `batch` rows in mid-output state: fill their bitmask rows, then mask the logits."""
    import torch

    from pagellm.structured_output import StructuredOutputsParams
    from pagellm.worker.sampler import apply_grammar_bitmask
    from tests.structured_output.test_bitmask import _row

    engine = llm.llm_engine
    states = [engine.structured_output.grammar_for(StructuredOutputsParams(json=SCHEMAS[name])) for _ in range(batch)]
    states[0].future.result()
    for state in states:
        assert state.is_ready()
        for token_id in engine.tokenizer.encode(prefix, add_special_tokens=False):
            assert state.accept_token(token_id), prefix
    vocab = engine.core.vocab_size
    bitmask = torch.full((batch, -(-vocab // 32)), -1, dtype=torch.int32)
    logits = torch.randn(batch, vocab)
    rows = [_row(f"r{i}") for i in range(batch)]
    ids = [r.req_id for r in rows]
    start = time.perf_counter()
    for _ in range(iters):
        for i, state in enumerate(states):
            state.fill_bitmask(bitmask, i)
        apply_grammar_bitmask(logits, rows, ids, bitmask)
    return 1e3 * (time.perf_counter() - start) / iters


def cached_grammar_cost_ms(manager, schema: dict, iters: int = 50) -> float:
    """What a cached grammar adds before the first token: validation (a cache hit), a matcher, one bitmask row."""
    import torch

    from pagellm.structured_output import StructuredOutputsParams

    manager.prepare(StructuredOutputsParams(json=schema)).result()  # compiled and cached
    bitmask = torch.full((1, -(-manager.vocab_size // 32)), -1, dtype=torch.int32)
    start = time.perf_counter()
    for _ in range(iters):
        params = StructuredOutputsParams(json=schema)
        manager.validate(params)
        state = manager.grammar_for(params)
        assert state.is_ready()
        state.fill_bitmask(bitmask, 0)
    return 1e3 * (time.perf_counter() - start) / iters


def fresh_schema() -> dict:
    """A schema no cache has seen (a new property name), of the usual size: a record of 5 fields."""
    name = f"f{uuid.uuid4().hex[:8]}"
    return {"type": "object", "properties": {
        name: {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4},
        "score": {"type": "number", "minimum": 0, "maximum": 1}, "ok": {"type": "boolean"}},
        "required": [name, "age", "tags", "score", "ok"], "additionalProperties": False}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-len", type=int, default=GEN_LEN)
    args = parser.parse_args()
    globals()["GEN_LEN"] = args.gen_len
    from pagellm import LLM

    llm = LLM(dtype=args.dtype, max_num_seqs=16, max_model_len=1024)
    t0 = time.perf_counter()
    first_ever = run_batch_ttft(llm, fresh_schema(), 0)  # imports xgrammar, builds the tokenizer info
    result: dict = {"model": llm.llm_engine.model_name, "gen_len": GEN_LEN, "repeats": args.repeats,
                    "first_constrained_request_s": first_ever, "load_avg_start": load_average()}
    run_batch(llm, 2, None)  # warm-up
    for batch in (1, 16):
        rates: dict[str, list[float]] = {"none": [], **{k: [] for k in SCHEMAS}}
        for r in range(args.repeats):
            rates["none"].append(run_batch(llm, batch, None, r)[0])
            print(f"batch {batch} repeat {r}: none {rates['none'][-1]:.1f} tok/s", file=sys.stderr, flush=True)
            for name, schema in SCHEMAS.items():
                rate, _, num = run_batch(llm, batch, schema, r)
                print(f"batch {batch} repeat {r}: {name} {rate:.1f} tok/s", file=sys.stderr, flush=True)
                assert num == batch * GEN_LEN, f"{name}: {num} tokens, expected {batch * GEN_LEN}"
                rates[name].append(rate)
        for name, values in rates.items():
            result[f"b{batch}_{name}_tok_s"] = max(values)
        for name in SCHEMAS:
            result[f"b{batch}_{name}_ratio"] = max(rates[name]) / max(rates["none"])
    prefixes = {"string": '{"story": "Once upon a time', "structure": '{"rows": [{"id": 12, "ok": true}, {"id": '}
    for batch in (1, 16):
        for name, prefix in prefixes.items():
            result[f"b{batch}_{name}_mask_ms_per_step"] = mask_cost_ms(llm, batch, name, prefix)
        result[f"b{batch}_step_ms"] = 1e3 * batch / result[f"b{batch}_none_tok_s"]
    plain, cold, cached = [], [], []
    for r in range(max(5, args.repeats)):
        plain.append(run_batch_ttft(llm, None, r))
        cold.append(run_batch_ttft(llm, fresh_schema(), r))
        schema = SCHEMAS["string"]
        cached.append(run_batch_ttft(llm, schema, r))
    result.update(ttft_plain_ms=1e3 * statistics.median(plain), ttft_cold_grammar_ms=1e3 * statistics.median(cold),
                  ttft_cached_grammar_ms=1e3 * statistics.median(cached))
    result["cached_grammar_adds_ms"] = result["ttft_cached_grammar_ms"] - result["ttft_plain_ms"]
    result["cached_grammar_engine_work_ms"] = cached_grammar_cost_ms(llm.llm_engine.structured_output, fresh_schema())
    result["cold_grammar_adds_ms"] = result["ttft_cold_grammar_ms"] - result["ttft_plain_ms"]
    result["load_avg_end"] = load_average()
    result["total_s"] = time.perf_counter() - t0
    write_result("structured_output", result, args.out)


if __name__ == "__main__":
    main()
