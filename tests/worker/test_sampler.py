"""Sampler: greedy/random selection, seeded generators, logits processors, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagellm.core.sched_output import ScheduledRequest
from pagellm.sampling_params import SamplingParams
from pagellm.worker import sampler as sampler_module
from pagellm.worker.sampler import Sampler, compute_prompt_logprobs, process_logits


def make_row(
    req_id: str = "r0",
    *,
    prompt: tuple[int, ...] = (1, 2, 3),
    output: tuple[int, ...] = (),
    eos: int | None = None,
    **params,
) -> ScheduledRequest:
    all_token_ids = [*prompt, *output]
    return ScheduledRequest(
        req_id=req_id,
        token_ids=[all_token_ids[-1]],
        num_computed_tokens=len(all_token_ids) - 1,
        block_ids=[0],
        sample=True,
        sampling_params=SamplingParams(**params),
        all_token_ids=all_token_ids,
        num_prompt_tokens=len(prompt),
        eos_token_id=eos,
    )


def fixed_logits(probs: list[float], num_rows: int) -> torch.Tensor:
    return torch.tensor(probs).log().expand(num_rows, -1).clone()


def seeded_stream(sampler: Sampler, row: ScheduledRequest, logits: torch.Tensor, steps: int) -> list[int]:
    return [sampler.sample(logits[None], [row]).token_ids[0] for _ in range(steps)]


# --- greedy -----------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    rows = [make_row(f"r{i}", temperature=0.0) for i in range(8)]
    out = Sampler(50).sample(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_top_k_1_equals_greedy_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = torch.randn(16, 300, generator=gen) * 3
        rows = [
            make_row(f"r{i}", temperature=0.3 + i * 0.2, top_k=1, top_p=0.9, seed=i if i % 2 else None)
            for i in range(16)
        ]
        out = Sampler(300).sample(logits, rows)
        assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_bf16_logits_and_padded_vocab_columns_never_sampled():
    logits = torch.zeros(64, 12, dtype=torch.bfloat16)
    logits[:, 10:] = 50.0  # padding columns past the tokenizer's vocab
    rows = [make_row(f"r{i}", temperature=1.0 if i % 2 else 0.0) for i in range(64)]
    out = Sampler(10).sample(logits, rows)
    assert all(0 <= t < 10 for t in out.token_ids)


def test_sample_does_not_mutate_input_logits():
    logits = torch.randn(3, 20)
    before = logits.clone()
    rows = [
        make_row("a", temperature=0.0, logit_bias={1: 5.0}),
        make_row("b", output=(4, 4), frequency_penalty=1.0, repetition_penalty=1.5, top_p=0.5),
        make_row("c", min_tokens=3, stop_token_ids=[2], eos=0, min_p=0.2, top_k=4),
    ]
    Sampler(20).sample(logits, rows)
    assert torch.equal(logits, before)


# --- seeded generators ------------------------------------------------------------------


def test_seeded_row_is_reproducible_and_independent_of_the_batch():
    vocab = 1000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 0.1
    alone = seeded_stream(Sampler(vocab), make_row("s", seed=7), logits, steps=6)
    assert len(set(alone)) > 1, "the generator state must carry over between steps"

    sampler = Sampler(vocab)
    in_batch = []
    for step in range(6):
        # Different neighbours and a different row index at every step.
        others = [make_row(f"o{step}-{j}", temperature=0.8, top_p=0.9) for j in range(step)]
        rows = [*others, make_row("s", seed=7), make_row(f"x{step}", seed=step + 100, top_k=step + 1)]
        batch = torch.randn(len(rows), vocab)
        batch[step] = logits
        in_batch.append(sampler.sample(batch, rows).token_ids[step])
    assert in_batch == alone


def test_seeded_truncated_row_is_independent_of_the_batch():
    vocab = 500
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 2
    params = {"seed": 11, "temperature": 0.9, "top_p": 0.8, "top_k": 100, "min_p": 0.01}
    alone = seeded_stream(Sampler(vocab), make_row("s", **params), logits, steps=5)
    sampler = Sampler(vocab)
    in_batch = []
    for step in range(5):
        # Neighbours change the candidate count (their top_k) and which rows truncate.
        others = [make_row(f"o{step}-{j}", top_k=450 - j, top_p=0.5 + 0.1 * j) for j in range(step)]
        rows = [*others, make_row("s", **params), make_row(f"g{step}", temperature=0.0)]
        batch = torch.randn(len(rows), vocab) * 4
        batch[step] = logits
        in_batch.append(sampler.sample(batch, rows).token_ids[step])
    assert in_batch == alone


def test_different_seeds_give_different_streams():
    vocab = 1000
    logits = torch.zeros(vocab)
    first = seeded_stream(Sampler(vocab), make_row("a", seed=1), logits, steps=8)
    second = seeded_stream(Sampler(vocab), make_row("b", seed=2), logits, steps=8)
    assert first != second


def test_drop_forgets_generator_and_a_readded_seed_restarts():
    vocab = 1000
    logits = torch.zeros(vocab)
    sampler = Sampler(vocab)
    first = seeded_stream(sampler, make_row("s", seed=3), logits, steps=4)
    sampler.drop(["s", "never-seen"])
    assert seeded_stream(sampler, make_row("s", seed=3), logits, steps=4) == first


# --- distribution and truncation --------------------------------------------------------


def test_unseeded_sampling_follows_the_distribution():
    torch.manual_seed(0)
    probs = [0.1, 0.2, 0.3, 0.4]
    num_rows = 20_000
    rows = [make_row(f"r{i}") for i in range(num_rows)]
    out = Sampler(4).sample(fixed_logits(probs, num_rows), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).tolist()
    chi2 = sum((c - p * num_rows) ** 2 / (p * num_rows) for c, p in zip(counts, probs, strict=True))
    assert chi2 < 16.3, f"counts {counts} (chi2 {chi2:.1f}, 3 dof, p=0.001)"


def test_temperature_sharpens_the_distribution():
    torch.manual_seed(1)
    probs = [0.1, 0.2, 0.3, 0.4]
    num_rows = 20_000
    rows = [make_row(f"r{i}", temperature=0.5) for i in range(num_rows)]
    out = Sampler(4).sample(fixed_logits(probs, num_rows), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).tolist()
    expected = [p**2 / sum(q**2 for q in probs) for p in probs]  # softmax(log p / 0.5)
    chi2 = sum((c - e * num_rows) ** 2 / (e * num_rows) for c, e in zip(counts, expected, strict=True))
    assert chi2 < 16.3, f"counts {counts} (chi2 {chi2:.1f})"


@pytest.mark.parametrize(
    ("params", "probs", "allowed"),
    [
        ({"top_k": 2}, [0.1, 0.4, 0.2, 0.3], {1, 3}),
        ({"top_k": -1}, [0.1, 0.4, 0.2, 0.3], {0, 1, 2, 3}),
        ({"top_p": 0.7}, [0.05, 0.5, 0.15, 0.3], {1, 3}),
        ({"top_p": 0.4}, [0.05, 0.5, 0.15, 0.3], {1}),
        ({"min_p": 0.45}, [0.1, 0.4, 0.2, 0.3], {1, 2, 3}),
        ({"top_k": 3, "top_p": 0.8, "min_p": 0.6}, [0.1, 0.4, 0.2, 0.3], {1, 3}),
    ],
)
def test_truncation_never_samples_excluded_tokens(params, probs, allowed):
    torch.manual_seed(2)
    num_rows = 3000
    # Alternate with untruncated rows so the per-row parameter tensors are exercised.
    rows = [make_row(f"r{i}", **(params if i % 2 == 0 else {})) for i in range(num_rows)]
    out = Sampler(4).sample(fixed_logits(probs, num_rows), rows)
    assert set(out.token_ids[0::2]) == allowed
    assert set(out.token_ids[1::2]) == {0, 1, 2, 3}


def reference_threshold(row: torch.Tensor, top_k: int, top_p: float) -> float:
    """Top-k then top-p by a full sort, one row at a time: the smallest logit kept."""
    values = row.sort(descending=True).values
    if not 0 < top_k < len(values) and top_p >= 1.0:
        return -math.inf
    if 0 < top_k < len(values):
        values = values[values >= values[top_k - 1]]
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    return values[mass_before < top_p][-1].item() if top_p < 1.0 else values[-1].item()


@pytest.mark.parametrize("num_candidates", [4, 16, 1024])  # 4: most rows need the full-sort fallback
def test_truncation_threshold_matches_a_full_sort(monkeypatch, num_candidates):
    monkeypatch.setattr(sampler_module, "_NUCLEUS_CANDIDATES", num_candidates)
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(24, 64, generator=gen) * torch.linspace(0.1, 6.0, 24)[:, None]
    logits[0, :3] = 5.0  # ties at the top-k boundary are all kept
    top_k = [2, 0, 5, -1, 0, 10, 64, 1] * 3
    top_p = [1.0, 0.9, 0.5, 0.3, 1.0, 0.99, 0.7, 0.2] * 3
    threshold = sampler_module._truncation_threshold(logits, top_k, top_p)
    for i in range(24):
        expected = reference_threshold(logits[i], top_k[i], top_p[i])
        assert threshold[i].item() == pytest.approx(expected, abs=1e-6), (i, top_k[i], top_p[i])
    assert sampler_module._truncation_threshold(logits, [0, -1] * 12, [1.0] * 24) is None


# --- logits processors ------------------------------------------------------------------


def test_penalties_exact_values():
    raw = torch.tensor([[1.0, 2.0, -2.0, 3.0, 0.5, -1.0]]).expand(4, -1)
    rows = [
        # prompt tokens {1, 2}, output tokens 2 once and 3 twice; 5 only in the prompt below.
        make_row("rep", prompt=(1, 2), output=(2, 3, 3), repetition_penalty=2.0),
        make_row("freq", prompt=(1, 5), output=(2, 3, 3), frequency_penalty=0.5, presence_penalty=0.25),
        make_row(
            "all",
            prompt=(1, 2),
            output=(2, 3, 3),
            repetition_penalty=2.0,
            frequency_penalty=0.5,
            presence_penalty=0.25,
        ),
        make_row("none", prompt=(1, 2), output=(2, 3, 3)),
    ]
    out = process_logits(raw, rows)
    expected = torch.tensor(
        [
            [1.0, 1.0, -4.0, 1.5, 0.5, -1.0],  # positive / 2, negative * 2 over prompt + output
            [1.0, 2.0, -2.75, 1.75, 0.5, -1.0],  # only output tokens: -0.5*count - 0.25
            [1.0, 1.0, -4.75, 0.25, 0.5, -1.0],  # repetition first, then presence/frequency
            [1.0, 2.0, -2.0, 3.0, 0.5, -1.0],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert process_logits(raw, [rows[3]]) is raw, "no processor needed: no copy"


def test_frequency_penalty_flips_greedy_choice():
    logits = torch.tensor([[0.0, 5.0, 4.0, 0.0]]).expand(2, -1)
    rows = [
        make_row("p", output=(1, 1, 1), temperature=0.0, frequency_penalty=1.0),
        make_row("q", output=(1, 1, 1), temperature=0.0),
    ]
    assert Sampler(4).sample(logits, rows).token_ids == [2, 1]


def test_logit_bias_added_and_out_of_vocab_ignored():
    raw = torch.zeros(2, 5)
    rows = [make_row("a", logit_bias={3: 2.5, 0: -1.0, 99: 4.0}), make_row("b")]
    expected = torch.tensor([[-1.0, 0.0, 0.0, 2.5, 0.0], [0.0] * 5])
    torch.testing.assert_close(process_logits(raw, rows), expected, rtol=0, atol=0)
    greedy = [make_row("a", temperature=0.0, logit_bias={4: 100.0})]
    assert Sampler(5).sample(torch.randn(1, 5), greedy).token_ids == [4]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[10.0, 9.0, 0.0, 1.0]])
    sampler = Sampler(4)
    for num_generated in range(3):
        row = make_row(output=(2,) * num_generated, eos=0, min_tokens=2, stop_token_ids=[1], temperature=0.0)
        token = sampler.sample(logits, [row]).token_ids[0]
        assert token == (3 if num_generated < 2 else 0), num_generated

    row = make_row(output=(2,), eos=0, min_tokens=2, stop_token_ids=[1])
    masked = process_logits(logits, [row])
    assert masked[0, :2].tolist() == [-math.inf, -math.inf] and masked[0, 2:].tolist() == [0.0, 1.0]
    ignore = make_row(output=(2,), eos=0, min_tokens=2, stop_token_ids=[1], ignore_eos=True)
    assert process_logits(logits, [ignore])[0].tolist() == [10.0, -math.inf, 0.0, 1.0]


# --- logprobs ---------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits_with_ranks_and_top_k():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 40, generator=gen)
    rows = [
        make_row("none", temperature=0.0),
        make_row("zero", logprobs=0, temperature=0.0),
        make_row("three", logprobs=3, temperature=0.7, seed=5),
        # The bias forces a token that is not the raw best: its rank must be > 1.
        make_row("biased", logprobs=5, temperature=0.0, logit_bias={int(logits[3].argmin()): 100.0}),
        make_row("pen", logprobs=2, output=(7, 7), repetition_penalty=1.3, temperature=0.9),
    ]
    out = Sampler(40).sample(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[0] is None
    for i, k in [(1, 0), (2, 3), (3, 5), (4, 2)]:
        entry = out.logprobs[i]
        token = out.token_ids[i]
        assert entry is not None and entry.token_id == token
        assert entry.logprob == pytest.approx(expected[i, token].item(), abs=1e-6)
        assert entry.rank == int((expected[i] > expected[i, token]).sum()) + 1
        values, ids = expected[i].topk(k)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[1].rank == 1 and out.logprobs[1].top == []
    assert out.logprobs[3].rank == 40


def test_compute_prompt_logprobs():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 10, generator=gen).to(torch.bfloat16)
    targets = [3, 0, 9, 9, 1]
    entries = compute_prompt_logprobs(logits, targets, k=2)
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert [e.token_id for e in entries] == targets
    for t, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(expected[t, targets[t]].item(), abs=1e-6)
        assert entry.rank == int((expected[t] > expected[t, targets[t]]).sum()) + 1
        assert [tok for tok, _ in entry.top] == expected[t].topk(2).indices.tolist()
    assert [e.top for e in compute_prompt_logprobs(logits, targets, k=0)] == [[]] * 5
    assert compute_prompt_logprobs(torch.zeros(0, 10), [], k=3) == []


def test_top_p_that_underflows_keeps_the_best_token():
    """Regression: a top_p of 1e-300 is 0 in float32 and used to keep no token at all."""
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    row = ScheduledRequest("tiny-p", [1], 0, [0], True, SamplingParams(temperature=1.0, top_p=1e-300), [1], 1)
    assert Sampler(4).sample(logits, [row]).token_ids == [1]


def test_seeded_generators_go_when_the_engine_goes_idle(tiny_llm):
    """Finished ids reach the runner with the next step; an idle engine takes none, so it hands them over
    at once (a finished, a stopped-by-string and an aborted seeded request left generators behind)."""
    from pagellm.entrypoints.llm import LLM

    assert isinstance(tiny_llm, LLM)
    runner = tiny_llm.llm_engine.core.worker.runner
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=4, ignore_eos=True)
    tiny_llm.generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)
    assert runner.sampler._generators == {}
    engine = tiny_llm.llm_engine
    engine.add_request("abort-me", [9, 8, 7], SamplingParams(temperature=1.0, seed=3, max_tokens=50))
    engine.step()
    assert "abort-me" in runner.sampler._generators
    engine.abort_request(["abort-me"])
    assert runner.sampler._generators == {} and not engine.has_unfinished_requests()
