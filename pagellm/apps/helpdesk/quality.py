"""Simple, automatic measures of a generated answer against the knowledge base: ROUGE-L (Google's `rouge-score`,
stemmed) and content-word F1 against the right entry's answer, the passages it cites as [n], and the passage it
draws on (the one holding the largest share of its content words). They measure overlap with the FAQ's words,
not correctness: an answer can paraphrase well and score low, or copy a wrong sentence and score high.
"""

from __future__ import annotations

import re
from collections import Counter

from pagellm.apps.helpdesk.kb import lexical_tokens

CITATION = re.compile(r"\[(\d+)\]")


def reference_answer(answer: str, max_sentences: int = 2) -> str:
    """The first sentences of an entry's answer: the reference an answer is scored against and the LoRA target."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(answer.split()))
    return " ".join(sentences[:max_sentences]).rstrip()


def rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the stemmed, stop-word-free words (the BM25 tokens), counted as multisets."""
    pred, ref = Counter(lexical_tokens(prediction)), Counter(lexical_tokens(reference))
    common = sum((pred & ref).values())
    if not common:
        return 0.0
    precision, recall = common / sum(pred.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def cited(answer: str, num_passages: int) -> list[int]:
    """The passage numbers (1-based) the answer cites as [n], in order, each once; numbers out of range dropped."""
    found = [int(n) for n in CITATION.findall(answer)]
    return [n for n in dict.fromkeys(found) if 1 <= n <= num_passages]


def drawn_from(answer: str, passages: list[str]) -> int | None:
    """The passage (1-based) holding the largest share of the answer's content words; None when none holds any."""
    words = set(lexical_tokens(answer))
    shares = [len(words & set(lexical_tokens(p))) for p in passages]
    if not words or not any(shares):
        return None
    return max(range(len(passages)), key=lambda i: (shares[i], -i)) + 1
