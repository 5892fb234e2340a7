"""Zero-shot classification with a decoder LLM: each label's log-likelihood after one shared prompt.

For one text, every label is scored after the same prompt (pagellm.label_prompt): the request of label
j is ``prompt_ids + label_ids[j]`` with ``max_tokens=1`` (the sampled token is ignored) and prompt
logprobs from position ``len(prompt_ids)`` on. A label's score is the sum of its tokens' logprobs; the
probabilities are the softmax of the scores over the labels.

The shared prompt is computed once per text: the first label's request runs alone, and the other labels
are submitted only once it finished, so their prompts are prefix-cache hits. ``prompt_logprobs_start``
keeps those hits short of the position whose logits score the first label token, so per extra label
only the prompt's last partial block (< block_size tokens) and the label tokens are recomputed.

The engines only drive this module: LLM.classify through LLMEngine (score_with_engine), the /classify
endpoint through AsyncLLM (score_with_async_engine).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm.auto import tqdm

from pagellm.errors import InvalidRequest
from pagellm.label_prompt import check_labels, encode_label_prompt, label_token_ids
from pagellm.lora_request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagellm.engine.async_llm import AsyncLLM, RequestStream
    from pagellm.engine.llm_engine import LLMEngine

T = TypeVar("T")


@dataclass
class LabelScoringPlan:
    """One text's shared prompt and the engine requests that score each label after it."""

    text: str
    prompt_ids: list[int]
    label_ids: list[list[int]]  # [num_labels][label length], from label_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        """Distinct tokens scored: the shared prompt once, then every label's tokens."""
        return len(self.prompt_ids) + sum(len(ids) for ids in self.label_ids)

    def prompt(self, label_index: int) -> dict[str, Any]:
        return {"prompt": None, "prompt_token_ids": self.prompt_ids + self.label_ids[label_index]}

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                              prompt_logprobs_start=len(self.prompt_ids), final_output_only=True)

    def label_logprob(self, label_index: int, output: RequestOutput) -> float:
        """Sum of the label tokens' logprobs given the prompt (and the label tokens before each)."""
        ids = self.label_ids[label_index]
        start = len(self.prompt_ids)
        entries = (output.prompt_logprobs or [])[start : start + len(ids)]
        assert len(entries) == len(ids) and all(e is not None for e in entries), (
            f"request {output.request_id}: prompt logprobs do not cover the label tokens"
        )
        return sum(entry[token_id] for entry, token_id in zip(entries, ids))  # type: ignore[index]


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


class LabelScorer:
    """Owns one call's labels and instruction: builds a plan per text and checks it fits the engine."""

    def __init__(self, tokenizer, labels: Sequence[str], instruction: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.labels = check_labels(labels)
        if instruction is not None and not isinstance(instruction, str):
            raise InvalidRequest("instruction must be a string", param="instruction")
        self.instruction = instruction
        has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.label_ids = [label_token_ids(tokenizer, label, has_chat_template) for label in self.labels]

    def plan(self, text: str) -> LabelScoringPlan:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("each text to classify must be a non-empty string", param="input")
        prompt_ids = encode_label_prompt(self.tokenizer, text, self.labels, self.instruction)
        return LabelScoringPlan(text, prompt_ids, self.label_ids)

    def plans(self, texts: Sequence[str], check: Callable[[list[int], SamplingParams], None]) -> list[LabelScoringPlan]:
        """One plan per text; `check(token_ids, params)` (the engine's length check) sees each longest request."""
        if isinstance(texts, str) or not texts:
            raise InvalidRequest("give a non-empty list of texts to classify", param="input")
        plans = [self.plan(text) for text in texts]
        longest = max(range(len(self.labels)), key=lambda j: len(self.label_ids[j]))
        for plan in plans:
            check(plan.prompt(longest)["prompt_token_ids"], plan.params())
        return plans


def score_with_engine(engine: LLMEngine, plans: list[LabelScoringPlan], lora_request: LoRARequest | None = None,
                      use_tqdm: bool = False) -> list[list[float]]:
    """Label probabilities per plan, stepping a synchronous LLMEngine.

    At most max_num_seqs texts are in flight, so the prompts waiting for their other labels stay in
    the prefix cache (freed blocks join the tail of the LRU free queue: a just-finished prompt is evicted last).
    """
    window = engine.scheduler_config.max_num_seqs
    num_labels = len(plans[0].label_ids)
    scores: list[list[float]] = [[0.0] * num_labels for _ in plans]
    num_left = [num_labels] * len(plans)
    in_flight: dict[str, tuple[int, int]] = {}  # request id -> (text index, label index)
    next_text = num_done = 0

    def submit(i: int, labels: range) -> None:
        for j in labels:
            rid = engine.next_request_id()
            engine.add_request(rid, plans[i].prompt(j), plans[i].params(), lora_request=lora_request)
            in_flight[rid] = (i, j)

    bar = tqdm(total=len(plans), desc="Classified prompts", disable=not use_tqdm, dynamic_ncols=True)
    try:
        while next_text < len(plans) or in_flight:
            while next_text < len(plans) and next_text - num_done < window:
                submit(next_text, range(1))
                next_text += 1
            for out in engine.step():
                if not out.finished or out.request_id not in in_flight:
                    continue
                i, j = in_flight.pop(out.request_id)
                scores[i][j] = plans[i].label_logprob(j, out)
                if j == 0:
                    submit(i, range(1, num_labels))  # the prompt is cached now
                num_left[i] -= 1
                if num_left[i] == 0:
                    num_done += 1
                    bar.update(1)
    except BaseException:
        engine.abort_request(list(in_flight))
        raise
    finally:
        bar.close()
    return [softmax(row) for row in scores]


async def _final_output(stream: RequestStream) -> RequestOutput:
    final = None
    async for out in stream:
        final = out
    assert final is not None and final.finished, f"request {stream.request_id} ended without a final output"
    return final


async def score_with_async_engine(engine: AsyncLLM, plans: list[LabelScoringPlan], request_id: str,
                                  lora_request: LoRARequest | None = None) -> list[list[float]]:
    """Label probabilities per plan through AsyncLLM; cancelling the call aborts its engine requests."""
    window = asyncio.Semaphore(engine.model_info().max_num_seqs)  # see score_with_engine
    num_labels = len(plans[0].label_ids)

    async def score_label(i: int, j: int) -> float:
        stream = engine.add_request(f"{request_id}-{i}-{j}", plans[i].prompt(j), plans[i].params(),
                                    lora_request=lora_request)
        return plans[i].label_logprob(j, await _final_output(stream))

    async def score_text(i: int) -> list[float]:
        async with window:
            first = await score_label(i, 0)
            # the prompt is cached now
            rest = await _gather_or_cancel([score_label(i, j) for j in range(1, num_labels)])
            return softmax([first, *rest])

    return await _gather_or_cancel([score_text(i) for i in range(len(plans))])


async def _gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """asyncio.gather, except that the first failure cancels the others (their streams abort their
    requests) and is raised as itself, not wrapped in an ExceptionGroup like a TaskGroup's."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
