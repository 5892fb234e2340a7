"""build_inputs on its own: a decode, a prefill chunk and a request verifying proposals in one step."""

from __future__ import annotations

from pagellm.core.sched_output import ScheduledRequest, SchedulerOutput
from pagellm.sampling_params import SamplingParams
from pagellm.worker.input_batch import build_inputs


def _req(req_id: str, token_ids: list[int], num_computed: int, blocks: list[int], spec: list[int] = (),
         sample: bool = True, prompt_logprobs: int | None = None) -> ScheduledRequest:
    params = SamplingParams(prompt_logprobs=prompt_logprobs)
    all_ids = list(range(num_computed)) + token_ids
    return ScheduledRequest(req_id, token_ids, num_computed, blocks, sample, params, all_ids, len(all_ids),
                            spec_token_ids=list(spec))


def test_decodes_and_verifying_rows_lead_then_chunks_with_their_logits_rows():
    decode = _req("d", [7], 5, [3, 4])  # position 5 -> block 4, offset 1
    spec = _req("s", [9, 10, 11], 2, [6, 9], spec=[10, 11])  # its token at position 2 plus two proposals
    chunk = _req("c", [20, 21, 22], 0, [8], sample=False)
    inputs = build_inputs(SchedulerOutput([chunk, decode, spec]), block_size=4)  # decodes keep their order
    assert inputs.input_ids.tolist() == [7, 9, 10, 11, 20, 21, 22]
    assert inputs.positions.tolist() == [5, 2, 3, 4, 0, 1, 2]
    meta = inputs.attn_meta
    assert meta.slot_mapping.tolist() == [17, 26, 27, 36, 32, 33, 34]
    # the verifying rows are decode rows, each seeing keys up to its own position
    assert meta.num_decode_tokens == 4 and meta.decode_seq_lens.tolist() == [6, 3, 4, 5]
    assert meta.decode_block_table.tolist() == [[3, 4], [6, 9], [6, 9], [6, 9]]
    assert len(meta.prefills) == 1 and meta.prefills[0].num_tokens == 3
    assert [r.req_id for r in inputs.sample_rows] == ["d", "s"] and inputs.sample_row_counts == [1, 3]
    assert inputs.logits_indices.tolist() == [0, 1, 2, 3]


def test_prompt_logprob_rows_come_first():
    req = _req("p", [11, 12, 13, 14], 0, [2], prompt_logprobs=1)
    inputs = build_inputs(SchedulerOutput([req]), block_size=4)
    plp = inputs.prompt_logprob_rows[0]
    assert plp.target_ids == [12, 13, 14] and plp.row_start == 0 and inputs.num_prompt_logprob_rows == 3
    assert inputs.logits_indices.tolist() == [0, 1, 2, 3]  # positions 0-2 predict 12-14; 3 samples


def test_a_small_chunk_beside_decodes_joins_the_decode_group() -> None:
    """With fuse_rows, a step's prompt chunks ride the decode kernels as one row per token (each row sees the
    keys up to its own position) when the whole step fits; otherwise the chunk stays a prefill chunk."""
    decode = _req("d", [7], 5, [0, 1])
    chunk = _req("c", [1, 2, 3], 4, [2, 3], sample=False)
    fused = build_inputs(SchedulerOutput([decode, chunk]), block_size=4, fuse_rows=16)
    meta = fused.attn_meta
    assert not meta.prefills and meta.num_decode_tokens == 4
    assert meta.decode_seq_lens.tolist() == [6, 5, 6, 7]  # the decode, then positions 4, 5, 6 of the chunk
    assert fused.positions.tolist() == [5, 4, 5, 6]
    assert fused.logits_indices.tolist() == [0]  # the chunk does not finish its prompt: no logits for it
    assert [r.req_id for r in fused.requests] == ["d", "c"]
    for rows in (3, 0):  # too many rows for the group, or fusing off: a prefill chunk as before
        plain = build_inputs(SchedulerOutput([decode, chunk]), block_size=4, fuse_rows=rows).attn_meta
        assert plain.num_decode_tokens == 1 and len(plain.prefills) == 1
    alone = build_inputs(SchedulerOutput([chunk]), block_size=4, fuse_rows=16).attn_meta
    assert alone.num_decode_tokens == 0 and len(alone.prefills) == 1  # no decodes: nothing to ride along
