"""Batched sampling: logits processors, greedy/random selection, logprobs.

One ``Sampler.sample`` call handles every row of an engine step that needs a token:

1. logits processors on a float32 copy: ``logit_bias``, the ``min_tokens`` stop mask,
   repetition (HF-style, prompt + output) and presence/frequency (OpenAI-style, output only);
2. greedy rows (``temperature < 1e-5`` or ``top_k == 1``) take the argmax;
3. random rows: temperature, top-k, top-p, min-p, then the exponential race
   ``argmax(probs / q)`` with ``q ~ Exponential(1)``, which draws from ``probs``;
4. logprobs of the sampled token (and top-k alternatives) from the RAW logits.

Seeded rows draw their noise from their own ``torch.Generator``, so their tokens do not
depend on the rest of the batch; unseeded rows share one batched draw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from pagellm.core.sched_output import ScheduledRequest
from pagellm.outputs import TokenLogprob

# Smallest normal float32: keeps the race's divisor non-zero (1 / tiny is still finite).
_TINY = torch.finfo(torch.float32).tiny
# Top-p first looks for the nucleus among this many best tokens (see _truncation_threshold).
_NUCLEUS_CANDIDATES = 1024


@dataclass
class SamplerOutput:
    """One sampled token per row, in row order."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None where sampling_params.logprobs is None


class Sampler:
    """Owns per-request seeded generators; samples one token per row for a whole batch."""

    def __init__(self, vocab_size: int) -> None:
        assert vocab_size > 0, f"vocab_size must be positive, got {vocab_size}"
        self.vocab_size = vocab_size
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, rows: list[ScheduledRequest], grammar_req_ids: Sequence[str] = (),
               grammar_bitmask: torch.Tensor | None = None) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (
            f"logits {tuple(logits.shape)} do not match {len(rows)} rows"
        )
        assert logits.shape[1] >= self.vocab_size, (
            f"logits have {logits.shape[1]} columns, fewer than vocab_size {self.vocab_size}"
        )
        if not rows:
            return SamplerOutput(token_ids=[], logprobs=[])
        # NOTE: a padded lm_head may have more columns than the tokenizer has tokens.
        raw = logits[:, : self.vocab_size].float()  # [num_rows, vocab]
        # NOTE: the grammar mask comes first (penalties and sampling see only allowed tokens); logprobs
        # still come from the raw logits, as without a grammar.
        masked = apply_grammar_bitmask(raw, rows, grammar_req_ids, grammar_bitmask)
        processed = process_logits(masked, rows)

        params = [r.sampling_params for r in rows]
        is_greedy = [p.is_greedy or p.top_k == 1 for p in params]
        if all(is_greedy):
            token_ids = processed.argmax(dim=-1)
        elif not any(is_greedy):
            token_ids = self._sample_random(processed, rows)
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=raw.device)
            greedy_idx = torch.tensor([i for i, g in enumerate(is_greedy) if g], device=raw.device)
            token_ids[greedy_idx] = processed[greedy_idx].argmax(dim=-1)
            random_idx = [i for i, g in enumerate(is_greedy) if not g]
            idx = torch.tensor(random_idx, device=raw.device)
            token_ids[idx] = self._sample_random(processed[idx], [rows[i] for i in random_idx])

        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        lp_idx = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_idx:
            idx = torch.tensor(lp_idx, device=raw.device)
            ks = [params[i].logprobs or 0 for i in lp_idx]
            entries = _gather_logprobs(torch.log_softmax(raw[idx], dim=-1), token_ids[idx], ks)
            for i, entry in zip(lp_idx, entries, strict=True):
                logprobs[i] = entry
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def verify(self, logits: torch.Tensor, row: ScheduledRequest, grammar_bitmask: torch.Tensor | None = None
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Speculative decoding: the tokens one request emits this step, from the logits of its last computed
        token and of each proposal (``logits[i]`` predicts the token after proposal i; row 0 after the last
        accepted token), and their logprobs.

        Greedy: the target's argmax at each position, kept while it equals the proposal, so the output is
        token for token what decoding one token a step gives. Random: proposal d at position i is accepted
        with probability p_i(d) (an n-gram proposal is a point mass: p_draft(d) = 1); on rejection the token
        is drawn from p_i with d removed, renormalised; if all are accepted one more is drawn from the last
        row. Either way each emitted token is distributed as the target's p. ``grammar_bitmask``: the
        request's grammar mask at each position (int32 [1 + k, words]), applied first, as in sample().
        """
        drafts = row.spec_token_ids
        assert logits.shape[0] == len(drafts) + 1, f"{row.req_id}: {logits.shape[0]} rows for {len(drafts)} drafts"
        raw = logits[:, : self.vocab_size].float()  # [1 + k, vocab]
        params = row.sampling_params
        if params.has_penalties or params.min_tokens:
            # NOTE: penalties and min_tokens read the tokens before each position: row i's include the
            # first i proposals, as they would one token a step
            rows = [dataclasses.replace(row, all_token_ids=row.all_token_ids + drafts[:i])
                    for i in range(len(drafts) + 1)]
        else:
            rows = [row] * raw.shape[0]
        masked = raw
        if grammar_bitmask is not None:
            masked = raw.clone()
            _mask_inplace(masked, grammar_bitmask.to(raw.device))
        processed = process_logits(masked, rows)
        if params.is_greedy or params.top_k == 1:
            best = processed.argmax(dim=-1).tolist()
            token_ids = []
            for i, token_id in enumerate(best):
                token_ids.append(token_id)
                if i == len(drafts) or token_id != drafts[i]:
                    break
        else:
            token_ids = self._verify_random(processed, row)
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        if params.logprobs is not None:
            n = len(token_ids)
            logprobs = list(_gather_logprobs(torch.log_softmax(raw[:n], dim=-1), torch.tensor(token_ids),
                                             [params.logprobs] * n))
        return token_ids, logprobs

    def _verify_random(self, processed: torch.Tensor, row: ScheduledRequest) -> list[int]:
        params = row.sampling_params
        logits = processed / params.temperature
        num_rows = logits.shape[0]
        threshold = _truncation_threshold(logits, [params.top_k] * num_rows, [params.top_p] * num_rows)
        if threshold is not None:
            logits.masked_fill_(logits < threshold[:, None], -torch.inf)
        probs = logits.softmax(dim=-1)  # [1 + k, vocab]
        if params.min_p > 0.0:
            probs.masked_fill_(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
            probs.div_(probs.sum(dim=-1, keepdim=True))
        generator = self._generator(row, probs.device) if params.seed is not None else None
        drafts = row.spec_token_ids
        uniforms = torch.rand(len(drafts), generator=generator, device=probs.device).tolist()
        token_ids = []
        for i, draft in enumerate(drafts):
            if uniforms[i] < probs[i, draft].item():
                token_ids.append(draft)
                continue
            residual = probs[i].clone()
            residual[draft] = 0.0  # the race ignores scale: no renormalising needed
            token_ids.append(self._race(residual, row))
            return token_ids
        token_ids.append(self._race(probs[len(drafts)].clone(), row))  # all accepted: one more from the target
        return token_ids

    def _race(self, probs: torch.Tensor, row: ScheduledRequest) -> int:
        """One draw from (unnormalised) probs by the exponential race, with the row's own generator if seeded."""
        return int(probs.div_(self._exponential_noise(probs[None], [row])[0]).argmax())

    def drop(self, req_ids: Iterable[str]) -> None:
        """Forget the generators of finished requests."""
        for req_id in req_ids:
            self._generators.pop(req_id, None)

    def _sample_random(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then one exponential-race draw per row."""
        params = [r.sampling_params for r in rows]
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        threshold = _truncation_threshold(logits, [p.top_k for p in params], [p.top_p for p in params])
        if threshold is not None:
            logits.masked_fill_(logits < threshold[:, None], -torch.inf)
        probs = logits.softmax(dim=-1)  # [num_random, vocab]
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs.masked_fill_(probs < floor, 0.0)  # no renormalising: the race ignores scale
        return probs.div_(self._exponential_noise(probs, rows)).argmax(dim=-1)

    def _exponential_noise(self, probs: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        """Exponential(1) noise shaped like ``probs``: per-request generators for seeded rows."""
        # NOTE: -log(uniform) is several times cheaper on CPU than Tensor.exponential_.
        noise = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(rows) if r.sampling_params.seed is not None]
        if not seeded:
            noise.uniform_()
        elif len(seeded) < len(rows):
            seeded_set = set(seeded)
            unseeded = torch.tensor([i for i in range(len(rows)) if i not in seeded_set], device=probs.device)
            noise[unseeded] = torch.rand(len(unseeded), probs.shape[1], device=probs.device)
        for i in seeded:
            # NOTE: a seeded row's noise depends only on its own generator, never on the
            # batch around it, so its tokens are reproducible at any row index.
            noise[i].uniform_(generator=self._generator(rows[i], probs.device))
        # clamp: a zero divisor would turn a zero probability into NaN, which argmax picks.
        return noise.log_().neg_().clamp_min_(_TINY)

    def _generator(self, row: ScheduledRequest, device: torch.device) -> torch.Generator:
        generator = self._generators.get(row.req_id)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(row.sampling_params.seed)
            self._generators[row.req_id] = generator
        return generator


def apply_grammar_bitmask(logits: torch.Tensor, rows: Sequence[ScheduledRequest], grammar_req_ids: Sequence[str],
                          bitmask: torch.Tensor | None) -> torch.Tensor:
    """A copy of ``logits`` with the tokens each constrained row's grammar forbids at -inf (``logits`` if none).

    ``bitmask`` is int32 [len(grammar_req_ids), ceil(vocab / 32)]: bit t % 32 of word t // 32 set = token t
    allowed (xgrammar's layout). Rows are matched by req_id.
    """
    if bitmask is None or not grammar_req_ids:
        return logits
    index_of = {row.req_id: i for i, row in enumerate(rows)}
    pairs = [(index_of[req_id], j) for j, req_id in enumerate(grammar_req_ids) if req_id in index_of]
    if not pairs:
        return logits
    words = bitmask[[j for _, j in pairs]].to(logits.device)  # [n, num_words]
    logits = logits.clone()
    if [i for i, _ in pairs] == list(range(logits.shape[0])):  # every row, in order: no gather/scatter
        _mask_inplace(logits, words)
    else:
        row_idx = torch.tensor([i for i, _ in pairs], device=logits.device)
        sub = logits[row_idx]
        _mask_inplace(sub, words)
        logits[row_idx] = sub
    return logits


def _mask_inplace(logits: torch.Tensor, words: torch.Tensor) -> None:
    """Set the disallowed tokens of each row to -inf (rows and bitmask rows in the same order)."""
    # NOTE: a row that allows few tokens (mid-number, after a key: JSON structure) is rebuilt from its
    # allowed ids, work in its nonzero words (measured ~10x faster than a whole-row mask for 16 rows);
    # a dense row (inside a string) is masked whole.
    sparse = (words != 0).sum(dim=1) * 4 < words.shape[1]
    if bool(sparse.all()):
        logits.copy_(_keep_allowed(logits, words))
    elif bool(sparse.any()):
        index, dense = sparse.nonzero()[:, 0], (~sparse).nonzero()[:, 0]
        logits[index] = _keep_allowed(logits[index], words[index])
        part = logits[dense]
        _mask_dense(part, words[dense])
        logits[dense] = part
    else:
        _mask_dense(logits, words)


def _keep_allowed(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """-inf except at the tokens whose bit is set."""
    rows, cols = (words != 0).nonzero(as_tuple=True)
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    which, bit = (((words[rows, cols][:, None] >> shifts) & 1) != 0).nonzero(as_tuple=True)
    token_ids = cols[which] * 32 + bit
    rows = rows[which]
    inside = token_ids < logits.shape[1]
    rows, token_ids = rows[inside], token_ids[inside]
    out = torch.full_like(logits, -torch.inf)
    out[rows, token_ids] = logits[rows, token_ids]
    return out


def _mask_dense(logits: torch.Tensor, words: torch.Tensor) -> None:
    if logits.device.type == "cpu":
        # xgrammar's C++ kernel, fast on dense rows; xgrammar is already loaded in this process, since the
        # engine filled the bitmask with it
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, words, vocab_size=logits.shape[1])
    else:
        logits.masked_fill_(~unpack_bitmask(words, logits.shape[1]), -torch.inf)


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [n, vocab_size] of an int32 bitmask [n, ceil(vocab_size / 32)]: one vectorized shift-and-and."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> shifts) & 1).view(words.shape[0], -1)[:, :vocab_size].bool()


def process_logits(logits: torch.Tensor, rows: Sequence[ScheduledRequest]) -> torch.Tensor:
    """Logit bias, min_tokens mask and penalties; returns a new tensor, or ``logits`` if no row needs any."""
    params = [r.sampling_params for r in rows]
    needs_bias = any(p.logit_bias for p in params)
    needs_min_tokens = any(_is_below_min_tokens(r) for r in rows)
    needs_penalties = any(p.has_penalties for p in params)
    if not (needs_bias or needs_min_tokens or needs_penalties):
        return logits
    logits = logits.clone()
    if needs_bias:
        _apply_logit_bias(logits, rows)
    if needs_min_tokens:
        _apply_min_tokens(logits, rows)
    if needs_penalties:
        _apply_penalties(logits, rows)
    return logits


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: list[int], k: int) -> list[TokenLogprob]:
    """Logprob and rank of ``target_ids[t]`` under position t's logits, plus the top-k."""
    assert logits.dim() == 2 and logits.shape[0] == len(target_ids), (
        f"logits {tuple(logits.shape)} do not match {len(target_ids)} target ids"
    )
    if not target_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(target_ids, dtype=torch.long, device=logits.device)
    return _gather_logprobs(logprobs, targets, [k] * len(target_ids))


def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """One TokenLogprob per row of ``logprobs`` [n, vocab]; one top-k for the batch's max k."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [n, 1]
    # Rank 1 = best; tokens tied with the chosen one do not push it down.
    ranks = (logprobs > chosen).sum(dim=-1).add_(1).tolist()
    max_k = max(ks)
    if max_k > 0:
        top_values, top_ids = logprobs.topk(max_k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    entries = []
    for i, (token_id, logprob, rank, k) in enumerate(
        zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks, ks, strict=True)
    ):
        top = list(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k > 0 else []
        entries.append(TokenLogprob(token_id=token_id, logprob=logprob, rank=rank, top=top))
    return entries


def _num_generated(row: ScheduledRequest) -> int:
    return len(row.all_token_ids) - row.num_prompt_tokens


def _is_below_min_tokens(row: ScheduledRequest) -> bool:
    return _num_generated(row) < row.sampling_params.min_tokens


def _stop_ids(row: ScheduledRequest) -> list[int]:
    """Token ids that would end the request now (vLLM: EOS is not a stop under ignore_eos)."""
    params = row.sampling_params
    ids = list(params.stop_token_ids or [])
    if row.eos_token_id is not None and not params.ignore_eos:
        ids.append(row.eos_token_id)
    return ids


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[ScheduledRequest]) -> None:
    vocab = logits.shape[1]
    row_idx: list[int] = []
    token_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        for token_id, bias in (row.sampling_params.logit_bias or {}).items():
            if token_id < vocab:  # NOTE: out-of-vocab ids are the input processor's to reject
                row_idx.append(i)
                token_idx.append(token_id)
                values.append(bias)
    if row_idx:
        device = logits.device
        index = (torch.tensor(row_idx, device=device), torch.tensor(token_idx, device=device))
        logits.index_put_(index, torch.tensor(values, device=device), accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, rows: Sequence[ScheduledRequest]) -> None:
    vocab = logits.shape[1]
    row_idx: list[int] = []
    token_idx: list[int] = []
    for i, row in enumerate(rows):
        if _is_below_min_tokens(row):
            for token_id in _stop_ids(row):
                if token_id < vocab:
                    row_idx.append(i)
                    token_idx.append(token_id)
    if row_idx:
        device = logits.device
        logits[torch.tensor(row_idx, device=device), torch.tensor(token_idx, device=device)] = -torch.inf


def _apply_penalties(logits: torch.Tensor, rows: Sequence[ScheduledRequest]) -> None:
    """Repetition over prompt + output tokens, presence/frequency over output tokens only."""
    pen_idx = [i for i, r in enumerate(rows) if r.sampling_params.has_penalties]
    pen_rows = [rows[i] for i in pen_idx]
    params = [r.sampling_params for r in pen_rows]
    device = logits.device
    idx = torch.tensor(pen_idx, device=device)
    sub = logits[idx]  # [num_penalized, vocab], a copy

    # One flat tensor of every penalised row's tokens, with the row each came from and
    # whether it is an output token (its position in the row >= num_prompt_tokens).
    lengths = torch.tensor([len(r.all_token_ids) for r in pen_rows])
    flat = torch.tensor(list(chain.from_iterable(r.all_token_ids for r in pen_rows)), dtype=torch.long)
    row_of = torch.repeat_interleave(torch.arange(len(pen_rows)), lengths)
    row_start = (lengths.cumsum(0) - lengths)[row_of]
    num_prompt = torch.tensor([r.num_prompt_tokens for r in pen_rows])[row_of]
    is_output = torch.arange(len(flat)) - row_start >= num_prompt
    flat, row_of, is_output = flat.to(device), row_of.to(device), is_output.to(device)

    output_counts = torch.zeros_like(sub)
    output_counts.index_put_(
        (row_of[is_output], flat[is_output]),
        torch.ones(int(is_output.sum()), device=device),
        accumulate=True,
    )
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = torch.zeros(sub.shape, dtype=torch.bool, device=device)
        seen[row_of, flat] = True
        rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        sub = sub - freq * output_counts - pres * (output_counts > 0)
    logits[idx] = sub


def _truncation_threshold(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor | None:
    """Per-row logit threshold of top-k then top-p (keep ``logits >= threshold``); None if no row truncates.

    Ties at the boundary are all kept, so the result never depends on tie order (nor on the
    batch). Top-p is first tried on the best ``_NUCLEUS_CANDIDATES`` tokens: a full-vocab
    sort costs ~10x more, and only rows whose nucleus does not fit there pay for it.
    """
    vocab = logits.shape[1]
    ks = [k if 0 < k < vocab else 0 for k in top_k]  # 0: off
    truncated = [i for i, (k, p) in enumerate(zip(ks, top_p, strict=True)) if k or p < 1.0]
    if not truncated:
        return None
    device = logits.device
    idx = torch.tensor(truncated, device=device)
    k = torch.tensor([ks[i] for i in truncated], device=device)
    p = torch.tensor([top_p[i] for i in truncated], device=device)
    # NOTE: from the Python lists, not the tensors: no device sync on a GPU
    num_candidates = max(max(ks[i] for i in truncated),
                         _NUCLEUS_CANDIDATES if any(top_p[i] < 1.0 for i in truncated) else 0)
    sub = logits[idx]
    row_threshold, fits = _top_k_top_p_threshold(sub, k, p, min(num_candidates, vocab))
    if not fits.all():
        rest = (~fits).nonzero()[:, 0]
        row_threshold[rest] = _top_k_top_p_threshold(sub[rest], k[rest], p[rest], vocab)[0]
    threshold = torch.full((logits.shape[0],), -torch.inf, device=device)
    threshold[idx] = row_threshold
    return threshold


def _top_k_top_p_threshold(
    logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds from each row's best ``num_candidates`` logits, and whether they were enough.

    ``k == 0`` and ``top_p >= 1`` mean off. Not enough: the candidates' mass is below top_p.
    """
    values = logits.topk(num_candidates, dim=-1).values  # [rows, num_candidates], best first
    kth_value = values.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0]
    threshold = torch.where(k > 0, kth_value, -torch.inf)
    has_top_p = top_p < 1.0
    if not has_top_p.any():
        return threshold, torch.ones_like(has_top_p)
    # Probabilities over the top-k survivors (the whole vocab where top-k is off).
    if (k > 0).any():
        logits = logits.masked_fill(logits < threshold[:, None], -torch.inf)
        values = values.masked_fill(values < threshold[:, None], -torch.inf)
    probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()
    cumulative = probs.cumsum(dim=-1)
    # Keep a token while the better ones hold less than top_p: the first is always kept.
    # NOTE: at least the best token is kept, even when top_p underflows to 0 in float32
    num_kept = (cumulative - probs < top_p[:, None]).sum(dim=-1).clamp_(min=1)
    top_p_value = values.gather(1, (num_kept - 1)[:, None])[:, 0]
    threshold = torch.where(has_top_p, torch.maximum(threshold, top_p_value), threshold)
    fits = ~has_top_p | (cumulative[:, -1] >= top_p) | (num_candidates == logits.shape[1])
    return threshold, fits
