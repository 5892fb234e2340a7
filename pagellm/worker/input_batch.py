"""SchedulerOutput -> flat model inputs, built once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagellm.core.sched_output import ScheduledRequest, SchedulerOutput
from pagellm.model.layers.attention import AttentionMetadata, PrefillChunk


@dataclass
class PromptLogprobRows:
    """Rows of the logits tensor whose next token is a known prompt token."""

    req_id: str
    row_start: int
    target_ids: list[int]
    k: int


@dataclass
class ModelInputs:
    """Flat tensors for one forward pass plus which hidden rows need logits."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn_meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states to turn into logits
    sample_rows: list[ScheduledRequest]  # in logits order, after the prompt-logprob rows
    # logits rows of each sample row: 1, or 1 + its proposals (speculative decoding verifies each position)
    sample_row_counts: list[int]
    num_prompt_logprob_rows: int
    prompt_logprob_rows: list[PromptLogprobRows]
    requests: list[ScheduledRequest]  # in token order (decodes, then chunks)


def _wants_prompt_logprobs(req: ScheduledRequest) -> bool:
    return req.sampling_params.prompt_logprobs is not None and req.num_computed_tokens < req.num_prompt_tokens - 1


def build_inputs(so: SchedulerOutput, block_size: int, device: torch.device | None = None,
                 fuse_rows: int = 0) -> ModelInputs:
    """Every tensor is built on `device` (None: the CPU, with no device argument at all).

    fuse_rows: in a step that has decodes, the prompt chunks join the decode group too (one row per token,
    as proposals do) when the whole group fits in this many rows, so that the step runs on the decode
    kernels (the fused stack) instead of the eager path: small chunks beside running streams, which the
    scheduler's prefill bound makes (docs/reliability.md#fairness-under-long-prompts). 0: never.
    """
    # Single-token requests form the batched "decode" group; multi-token chunks follow. A request verifying
    # proposals (speculative decoding) joins the decode group as one row per token, row i attending to the
    # keys up to its own position: every row's keys are written before any row attends, so it sees the
    # proposals before it, and the step runs on the decode kernels (the fused stack included).
    decodes = [r for r in so.scheduled if len(r.token_ids) == 1 or r.spec_token_ids]
    chunks = [r for r in so.scheduled if len(r.token_ids) > 1 and not r.spec_token_ids]
    if fuse_rows and decodes and chunks and sum(len(r.token_ids) for r in so.scheduled) <= fuse_rows:
        decodes, chunks = decodes + chunks, []
    ordered = decodes + chunks
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for req in ordered:
        start = req.num_computed_tokens
        input_ids.extend(req.token_ids)
        table = req.block_ids
        for pos in range(start, start + len(req.token_ids)):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)

    rows = [(r, r.num_computed_tokens + i + 1) for r in decodes for i in range(len(r.token_ids))]  # (req, length)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                             num_decode_tokens=len(rows))
    if decodes:
        lengths = [length for _, length in rows]
        max_blocks = (max(lengths) + block_size - 1) // block_size
        table = [r.block_ids[:max_blocks] + [0] * (max_blocks - min(len(r.block_ids), max_blocks)) for r, _ in rows]
        meta.decode_block_table = torch.tensor(table, dtype=torch.long, device=device)
        meta.decode_max_len = max(lengths)
        meta.decode_seq_lens = torch.tensor(lengths, dtype=torch.long, device=device)
        if min(lengths) != max(lengths):  # equal lengths: keys are cut to that length, no mask
            span = torch.arange(max_blocks * block_size, device=device)
            meta.decode_mask = (span.unsqueeze(0) < meta.decode_seq_lens.unsqueeze(1)).view(len(rows), 1, 1, -1)

    offset = len(rows)
    for req in chunks:
        n, done = len(req.token_ids), req.num_computed_tokens
        chunk = PrefillChunk(offset, n, done, None, None)
        if done > 0:
            num_blocks = (done + n + block_size - 1) // block_size
            chunk.block_ids = torch.tensor(req.block_ids[:num_blocks], dtype=torch.long, device=device)
            # query i sits at position done+i and sees keys 0..done+i
            chunk.mask = torch.ones(n, done + n, dtype=torch.bool, device=device).tril(diagonal=done)
        meta.prefills.append(chunk)
        offset += n

    # Logits rows: prompt-logprob rows first, then one row per sampled request.
    logits_rows: list[int] = []
    plp_rows: list[PromptLogprobRows] = []
    offset = 0
    last_row: dict[str, int] = {}
    for req in ordered:
        n = len(req.token_ids)
        if _wants_prompt_logprobs(req):
            # position p predicts token p+1; only known prompt tokens from prompt_logprobs_start on are targets
            start = max(req.num_computed_tokens, req.sampling_params.first_prompt_logprob_position)
            count = min(req.num_computed_tokens + n, req.num_prompt_tokens - 1) - start
            if count > 0:
                plp_rows.append(PromptLogprobRows(
                    req.req_id, len(logits_rows), req.all_token_ids[start + 1 : start + 1 + count],
                    req.sampling_params.prompt_logprobs,
                ))
                row = offset + start - req.num_computed_tokens
                logits_rows.extend(range(row, row + count))
        last_row[req.req_id] = offset + n - 1
        offset += n
    num_plp = len(logits_rows)
    sample_rows = [r for r in ordered if r.sample]
    counts = [1 + len(r.spec_token_ids) for r in sample_rows]
    for req, count in zip(sample_rows, counts):
        last = last_row[req.req_id]
        logits_rows.extend(range(last - count + 1, last + 1))
    return ModelInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        attn_meta=meta,
        logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=device),
        sample_rows=sample_rows,
        sample_row_counts=counts,
        num_prompt_logprob_rows=num_plp,
        prompt_logprob_rows=plp_rows,
        requests=ordered,
    )
