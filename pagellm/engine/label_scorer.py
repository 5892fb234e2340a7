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


class _ScoringRun:
    """The order of one call's label requests, shared by both engines' drivers.

    At most `window` texts (max_num_seqs) are in flight, so the prompts waiting for their other labels stay
    in the prefix cache (freed blocks join the tail of the LRU free queue: a just-finished prompt is evicted
    last). A text's first label runs alone; its other labels are submitted once it finished, as prefix hits.
    """

    def __init__(self, plans: list[LabelScoringPlan], window: int) -> None:
        self.plans, self.window = plans, window
        self.num_labels = len(plans[0].label_ids)
        self.scores: list[list[float]] = [[0.0] * self.num_labels for _ in plans]
        self._num_left = [self.num_labels] * len(plans)
        self._next_text = self.num_done = 0

    @property
    def is_done(self) -> bool:
        return self.num_done == len(self.plans)

    def start(self) -> list[tuple[int, int]]:
        """(text, label) pairs to submit now: the first label of each text the window admits."""
        pairs = []
        while self._next_text < len(self.plans) and self._next_text - self.num_done < self.window:
            pairs.append((self._next_text, 0))
            self._next_text += 1
        return pairs

    def finish(self, i: int, j: int, output: RequestOutput) -> list[tuple[int, int]]:
        """Record label j of text i; returns the pairs to submit next."""
        self.scores[i][j] = self.plans[i].label_logprob(j, output)
        self._num_left[i] -= 1
        follow = [(i, k) for k in range(1, self.num_labels)] if j == 0 else []  # the prompt is cached now
        if self._num_left[i] == 0:
            self.num_done += 1
            follow += self.start()
        return follow

    def probs(self) -> list[list[float]]:
        return [softmax(row) for row in self.scores]


def score_with_engine(engine: LLMEngine, plans: list[LabelScoringPlan], lora_request: LoRARequest | None = None,
                      use_tqdm: bool = False) -> list[list[float]]:
    """Label probabilities per plan, stepping a synchronous LLMEngine."""
    run = _ScoringRun(plans, engine.scheduler_config.max_num_seqs)
    in_flight: dict[str, tuple[int, int]] = {}  # request id -> (text index, label index)

    def submit(pairs: list[tuple[int, int]]) -> None:
        for i, j in pairs:
            rid = engine.next_request_id()
            engine.add_request(rid, plans[i].prompt(j), plans[i].params(), lora_request=lora_request)
            in_flight[rid] = (i, j)

    bar = tqdm(total=len(plans), desc="Classified prompts", disable=not use_tqdm, dynamic_ncols=True)
    try:
        submit(run.start())
        while in_flight:
            for out in engine.step():
                if out.finished and out.request_id in in_flight:
                    done_before = run.num_done
                    submit(run.finish(*in_flight.pop(out.request_id), out))
                    bar.update(run.num_done - done_before)
    except BaseException:
        engine.abort_request(list(in_flight))
        raise
    finally:
        bar.close()
    return run.probs()


async def _final_output(stream: RequestStream) -> RequestOutput:
    final = None
    async for out in stream:
        final = out
    assert final is not None and final.finished, f"request {stream.request_id} ended without a final output"
    return final


async def score_with_async_engine(engine: AsyncLLM, plans: list[LabelScoringPlan], request_id: str,
                                  lora_request: LoRARequest | None = None) -> list[list[float]]:
    """Label probabilities per plan through AsyncLLM; cancelling the call aborts its engine requests."""
    run = _ScoringRun(plans, engine.model_info().max_num_seqs)

    async def score(i: int, j: int) -> None:
        stream = engine.add_request(f"{request_id}-{i}-{j}", plans[i].prompt(j), plans[i].params(),
                                    lora_request=lora_request)
        follow = run.finish(i, j, await _final_output(stream))
        if follow:
            await _gather_or_cancel([score(*pair) for pair in follow])

    await _gather_or_cancel([score(*pair) for pair in run.start()])
    assert run.is_done, "every text was scored"
    return run.probs()


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
