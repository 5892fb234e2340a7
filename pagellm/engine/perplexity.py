"""Perplexity of a fixed text through the engine (prompt logprobs), for quantization and pruning checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pagellm.sampling_params import SamplingParams


@dataclass
class PerplexityResult:
    """exp(mean negative log-likelihood) over every scored token."""

    perplexity: float
    num_tokens: int
    nll: float


def perplexity(llm, text: str, window: int = 512) -> PerplexityResult:
    """Split the tokenized text into `window`-token pieces (no overlap) and score each piece's tokens
    after its first; the pieces run as one batch."""
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    pieces = [ids[i : i + window] for i in range(0, len(ids), window)]
    pieces = [p for p in pieces if len(p) > 1]
    outs = llm.generate([list(p) for p in pieces], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                        use_tqdm=False)
    nll, count = 0.0, 0
    for piece, out in zip(pieces, outs):
        for position, token_id in enumerate(piece[1:], start=1):
            nll -= out.prompt_logprobs[position][token_id]
            count += 1
    return PerplexityResult(math.exp(nll / count), count, nll)
