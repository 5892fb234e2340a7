"""Speculative decoding, engine side: n-gram proposals per request, the adaptive off-switch, and counters.

The proposer runs after each step on the requests that will decode next; the scheduler budgets the proposed
tokens, the worker verifies them all in one forward (worker/sampler.py: Sampler.verify), and the scheduler
keeps the accepted ones and rolls the rest back (core/scheduler.py).
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass, field

from pagellm.config import SpeculativeConfig
from pagellm.request import Request

# Earlier occurrences of the matched n-gram tried for a continuation of the full length (the latest one may
# run into the end of the sequence: a period-2 repetition leaves it 2 tokens)
_MAX_OCCURRENCES = 8


def ngram_lookup(token_ids: list[int], min_n: int, max_n: int, num_tokens: int) -> list[int]:
    """Up to num_tokens tokens that followed an earlier occurrence of the longest suffix n-gram (n from max_n
    down to min_n) of token_ids: the latest occurrence with that many after it, else the longest found;
    [] when no such n-gram occurred before."""
    length = len(token_ids)
    if length < min_n + 1 or num_tokens <= 0:
        return []
    data = array("i", token_ids).tobytes()  # NOTE: bytes.rfind searches in C; a match must be 4-byte aligned
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = data[(length - n) * 4:]
        end = (length - 1) * 4  # the occurrence must end before the last token, so a token follows it
        best: list[int] = []
        for _ in range(_MAX_OCCURRENCES * 4):
            pos = data.rfind(pattern, 0, end)
            if pos < 0:
                break
            end = pos + len(pattern) - 1
            if pos % 4:
                continue
            start = pos // 4 + n
            found = token_ids[start : start + num_tokens]
            if len(found) > len(best):
                best = found
            if len(best) == num_tokens:
                break
        if best:
            return best
    return []


@dataclass
class SpecDecodeStats:
    """Counters for /metrics (vLLM's names) and `pagellm bench`."""

    num_drafts: int = 0  # request-steps that verified proposals
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_proposed:
            self.accepted_per_position.extend([0] * (num_proposed - len(self.accepted_per_position)))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying step: the accepted drafts plus the one the target always adds."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class StepCostFit:
    """Seconds of a decode-only step as a + b * rows (rows: tokens verified, proposals included), fitted
    online by exponentially weighted least squares over the steps the engine runs."""

    DECAY = 0.98  # weight kept by older steps each new one (a window of ~50 steps)
    PRIOR_ROW_SHARE = 0.25  # b / (a + b) until steps of different sizes were seen

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.DECAY
        self._w, self._x, self._y = d * self._w + 1.0, d * self._x + rows, d * self._y + seconds
        self._xx, self._xy = d * self._xx + rows * rows, d * self._xy + rows * seconds

    def coefficients(self) -> tuple[float, float]:
        """(a, b); before the fit has steps of at least two sizes, a prior in units of a one-row step."""
        if self._w > 0:
            mean_x, mean_y = self._x / self._w, self._y / self._w
            var = self._xx / self._w - mean_x * mean_x
            if var > 0.05 and mean_y > 0:
                b = min(max((self._xy / self._w - mean_x * mean_y) / var, 0.0), mean_y)
                return max(mean_y - b * mean_x, 1e-3 * mean_y), b
        return 1.0 - self.PRIOR_ROW_SHARE, self.PRIOR_ROW_SHARE


class AcceptanceStats:
    """Per draft position i: how often a proposal reached there (every earlier one accepted) was accepted,
    decayed so that recent steps count most."""

    DECAY = 0.9

    def __init__(self, positions: int) -> None:
        self.reached = [0.0] * positions
        self.accepted = [0.0] * positions

    def record(self, num_proposed: int, num_accepted: int) -> None:
        for i in range(len(self.reached)):
            self.reached[i] *= self.DECAY
            self.accepted[i] *= self.DECAY
        for i in range(min(num_proposed, num_accepted + 1)):
            self.reached[i] += 1.0
            self.accepted[i] += 1.0 if i < num_accepted else 0.0

    def rates(self, prior: list[float], prior_weight: float) -> list[float]:
        return [(a + prior_weight * p) / (r + prior_weight) for a, r, p in zip(self.accepted, self.reached, prior)]


class NgramSpeculator:
    """Proposes for each request that decodes next, and stops proposing for a request whose proposals
    keep failing (acceptance under config.min_acceptance_rate over its last acceptance_window tokens)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats()
        self._history: dict[str, deque[tuple[int, int]]] = {}  # req_id -> (proposed, accepted) per step
        self._disabled: set[str] = set()
        k = config.num_speculative_tokens
        self.step_cost = StepCostFit()  # length_policy "cost"
        self._acceptance: dict[str, AcceptanceStats] = {}  # per request
        self._all_acceptance = AcceptanceStats(k)  # every request's: the prior of a request's own

    def observe_step(self, rows: int, seconds: float) -> None:
        """A decode-only step of `rows` verified tokens took `seconds` (length_policy "cost")."""
        self.step_cost.observe(rows, seconds)

    def can_speculate(self, request: Request) -> bool:
        """A decoding request whose proposals have not been switched off (with its grammar ready, if any)."""
        grammar = request.structured_output
        return (request.req_id not in self._disabled and request.num_output_tokens > 0
                and (grammar is None or (grammar.is_ready() and not grammar.is_terminated())))

    def propose(self, requests: list[Request], capacity: int, max_rows: int | None = None) -> None:
        """Set spec_token_ids of each decoding request (empty where there is nothing to propose).

        max_rows: the most decode rows (tokens plus proposals) a step may verify and stay on the worker's
        fused decode path; proposals are trimmed, longest first, to fit. Past it the step would take the
        eager path, slower per row (and summing floats in another order).
        """
        config = self.config
        for request in requests:
            request.spec_token_ids = []
            if request.num_tokens - request.num_computed_tokens != 1 or not self.can_speculate(request):
                continue
            # k drafts take positions num_tokens .. num_tokens + k - 1, and k + 1 tokens may be emitted
            room = min(self.max_model_len, capacity) - request.num_tokens
            if request.max_tokens is not None:
                room = min(room, request.max_tokens - request.num_output_tokens - 1)
            num = min(config.num_speculative_tokens, room)
            if num > 0:
                proposals = ngram_lookup(request.all_token_ids, config.prompt_lookup_min, config.prompt_lookup_max,
                                         num)
                if proposals and request.structured_output is not None:  # only what the grammar allows
                    proposals = proposals[: request.structured_output.num_valid(proposals)]
                request.spec_token_ids = proposals
        decoding = [r for r in requests if r.num_tokens - r.num_computed_tokens == 1]
        if config.length_policy == "cost":
            self._keep_worthwhile(decoding)
        if max_rows is not None:
            extra = sum(len(r.spec_token_ids) for r in decoding) - max(0, max_rows - len(decoding))
            while extra > 0:
                longest = max(decoding, key=lambda r: len(r.spec_token_ids))
                longest.spec_token_ids = longest.spec_token_ids[:-1]
                extra -= 1

    def _keep_worthwhile(self, decoding: list[Request]) -> None:
        """Cut each request's proposals to the positions worth verifying this step.

        Position i of a request is accepted with probability P_i (the product of its positions' acceptance
        rates up to i: the request's own, pulled towards all requests' while it has few steps). A step of R
        rows costs a + b * R and emits E tokens on average; one more row adds b and P_i tokens, which raises
        E / (a + b R) only while P_i > b E / (a + b R). Rows are taken in decreasing P_i (a request's
        positions in order, since P_i only falls), so a CPU where a row costs little next to the weights'
        read (b << a) verifies every proposal, and one where rows cost much verifies only sure ones.
        """
        a, b = self.step_cost.coefficients()
        prior = self._all_acceptance.rates([0.5] * self.config.num_speculative_tokens, 2.0)
        candidates: list[tuple[float, int, Request]] = []
        for request in decoding:
            if not request.spec_token_ids:
                continue
            own = self._acceptance.get(request.req_id)
            rates = own.rates(prior, 4.0) if own is not None else prior
            p = 1.0
            for i in range(len(request.spec_token_ids)):
                p *= rates[i]
                candidates.append((p, i, request))
        keep: dict[str, int] = {}
        expected, rows = float(len(decoding)), len(decoding)
        for p, i, request in sorted(candidates, key=lambda c: (-c[0], c[1])):
            if p * (a + b * rows) <= b * expected:
                break
            expected, rows = expected + p, rows + 1
            keep[request.req_id] = i + 1
        for request in decoding:
            request.spec_token_ids = request.spec_token_ids[: keep.get(request.req_id, 0)]

    def record(self, req_id: str, num_proposed: int, num_accepted: int) -> None:
        self.stats.record(num_proposed, num_accepted)
        if self.config.length_policy == "cost":
            self._all_acceptance.record(num_proposed, num_accepted)
            stats = self._acceptance.get(req_id)
            if stats is None:
                stats = self._acceptance[req_id] = AcceptanceStats(self.config.num_speculative_tokens)
            stats.record(num_proposed, num_accepted)
        window = self._history.setdefault(req_id, deque())
        window.append((num_proposed, num_accepted))
        proposed = sum(p for p, _ in window)
        while window and proposed - window[0][0] >= self.config.acceptance_window:
            proposed -= window.popleft()[0]
        if proposed >= self.config.acceptance_window:
            accepted = sum(a for _, a in window)
            if accepted < self.config.min_acceptance_rate * proposed:
                self._disabled.add(req_id)

    def forget(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            self._history.pop(req_id, None)
            self._disabled.discard(req_id)
            self._acceptance.pop(req_id, None)
