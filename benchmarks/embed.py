"""Embedding throughput on the bundled all-MiniLM-L6-v2: pagellm (packed) vs HF transformers (padded).

Workload: 128 synthetic texts of 1..120 words (~10k tokens), one `embed` call; HF runs AutoModel on
batches of 32 padded to their longest, then mean pooling + L2 normalize (sentence-transformers' recipe).
Also times pagellm with its attention swapped for one padded SDPA call per packed batch, the
alternative to per-sequence attention (`pagellm/model/layers/encoder_attention.py`).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402

WORDS = ("the a cat dog sat on mat quickly running river mountain blue green seven eleven algorithm compute "
         "tensor paris london music quiet loud happy sad bright dark coffee tea morning night engine").split()
NUM_TEXTS, MAX_WORDS, HF_BATCH, REPEATS = 128, 120, 32, 2


def make_texts() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, MAX_WORDS))) for _ in range(NUM_TEXTS)]


def best_of(fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def padded_attention(q, k, v, seq_lens: list[int], scale: float):
    """The alternative: gather every sequence into [B, heads, longest, dim], mask padded keys."""
    import torch
    import torch.nn.functional as F

    lens = torch.tensor(seq_lens)
    pos = torch.arange(int(lens.max()))
    valid = pos[None] < lens[:, None]  # [B, longest]
    tok = torch.where(valid, (lens.cumsum(0) - lens)[:, None] + pos[None], 0)  # [B, longest] flat row
    qs, ks, vs = (x[tok].transpose(1, 2) for x in (q, k, v))  # [B, heads, longest, dim]
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :], scale=scale)
    flat = torch.empty_like(q)
    flat[tok[valid]] = out.transpose(1, 2)[valid]
    return flat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    import pagellm.model.models.bert as bert
    from pagellm import LLM
    from pagellm.model_source import bundled_encoder_path

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = make_texts()
    llm = LLM(task="embed", dtype="float32")
    num_tokens = sum(len(o.prompt_token_ids) for o in llm.embed(texts, use_tqdm=False))
    results: dict[str, float] = {}
    results["pagellm_per_seq_attention_s"] = best_of(lambda: llm.embed(texts, use_tqdm=False))
    per_seq = bert.packed_attention
    bert.packed_attention = padded_attention
    try:
        results["pagellm_padded_attention_s"] = best_of(lambda: llm.embed(texts, use_tqdm=False))
    finally:
        bert.packed_attention = per_seq

    path = str(bundled_encoder_path())
    model, tokenizer = AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)

    def hf_embed() -> None:
        for i in range(0, len(texts), HF_BATCH):
            batch = tokenizer(texts[i : i + HF_BATCH], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    results["hf_padded_batch32_s"] = best_of(hf_embed)
    result = {
        "workload": f"{NUM_TEXTS} texts, 1..{MAX_WORDS} words, {num_tokens} tokens, float32",
        "threads": torch.get_num_threads(),
        **{k: round(v, 3) for k, v in results.items()},
        "pagellm_texts_per_s": round(NUM_TEXTS / results["pagellm_per_seq_attention_s"], 1),
        "hf_texts_per_s": round(NUM_TEXTS / results["hf_padded_batch32_s"], 1),
        "speedup_vs_hf": round(results["hf_padded_batch32_s"] / results["pagellm_per_seq_attention_s"], 2),
        "padded_attention_slowdown": round(results["pagellm_padded_attention_s"]
                                           / results["pagellm_per_seq_attention_s"], 2),
        "load_average_1m": round(load_average(), 2),
    }
    write_result(f"embed_t{torch.get_num_threads()}", result, args.out)


if __name__ == "__main__":
    main()
