"""The generation prompt: short (its time to first token is its prefill), the right entry kept in it, stable text
first so the prefix cache reuses the best passage; and generated answers that draw on the right passage."""

from __future__ import annotations

import statistics

import httpx
import pytest

from pagellm.apps.helpdesk.quality import cited, drawn_from, reference_answer, rouge_l, token_f1
from pagellm.apps.helpdesk.service import Thresholds, build_messages, passage_text, prompt_hits, prompt_passages
from tests.apps.helpdesk.conftest import load_questions


def prompt_tokens(service, messages) -> list[int]:
    return service.generator.render(messages)["prompt_token_ids"]


def test_generation_prompt_is_short_and_keeps_the_right_passage(retriever, helpdesk_url):
    service = helpdesk_url[1]
    kept, lengths = 0, []
    generated = [q for q in load_questions("eval_questions.jsonl")
                 if Thresholds().mode(retriever.retrieve(q["question"]).confidence) == "generated"]
    assert len(generated) >= 20
    for q in generated:
        retrieval = retriever.retrieve(q["question"])
        kept += q["id"] in [h.entry.id for h in prompt_hits(retrieval)]
        lengths.append(len(prompt_tokens(service, build_messages(q["question"], retrieval))))
    # 3 passages of 90 words made these 330-663 tokens (median 489); the right entry was in all their top 3
    assert kept >= len(generated) - 2, (kept, len(generated))
    assert max(lengths) <= 320 and statistics.median(lengths) <= 224, sorted(lengths)


def test_passages_within_the_margin_and_cut_at_sentences(retriever):
    retrieval = retriever.retrieve("why does my default list argument keep growing between calls?")
    hits = prompt_hits(retrieval)
    assert hits[0] is retrieval.hits[0] and all(retrieval.hits[0].score - h.score <= 0.1 for h in hits)
    assert len(prompt_hits(retrieval, margin=0.0)) == 1 and len(prompt_hits(retrieval, margin=1.0)) == 3
    text = "One two three. Four five six seven. Eight nine ten eleven twelve."
    assert passage_text(text, 20) == text
    assert passage_text(text, 8) == "One two three. Four five six seven. ..."
    assert passage_text("a b c d e f. g h.", 3) == "a b c ..."  # a first sentence longer than the budget is cut
    passages = prompt_passages(retrieval)
    assert [h for h, _ in passages] == hits and passages[0][1].startswith(hits[0].entry.question + "\n")


def test_quality_measures():
    assert rouge_l("default values are created once", "Default values are created exactly once.") > 0.8
    assert token_f1("the cat sat", "a dog ran") == 0.0 and token_f1("sorting lists", "sort the list") == 1.0
    assert cited("see [2] and [1], also [2] and [7]", 3) == [2, 1]
    assert drawn_from("use int() to convert the string", ["floats are binary", "int('42') converts a string"]) == 2
    assert drawn_from("hello", ["nothing shared"]) is None
    assert reference_answer("First one. Second two!  Third three?") == "First one. Second two!"


def test_questions_with_the_same_best_entry_share_its_cached_passage(helpdesk_url):
    """Stable text first: system prompt, then the best passage (the same tokens whatever the question), so a
    second question answered from the same entry finds the passage's KV blocks cached, not only the system's."""
    import openai

    url, service = helpdesk_url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    first, second = "what is the way to remove a file in python", "erase a file on disk from my script"
    plans = [service.plan(q, []) for q in (first, second)]
    assert [p[2] for p in plans] == ["generated", "generated"]
    assert plans[0][1].hits[0].entry.id == plans[1][1].hits[0].entry.id == "library-015"
    messages = build_messages(second, plans[1][1])
    # the tokens up to the end of the best passage: the chat template with the user turn cut after passage 1
    upto = messages[1]["content"].split("\n\n")[0]
    rendered = service.generator.render(messages)["prompt"]
    shared = len(service.generator.llm.tokenizer.encode(rendered[:rendered.index(upto) + len(upto)],
                                                        add_special_tokens=False))
    for question in (first, second):
        resp = client.chat.completions.create(model="helpdesk", max_tokens=2,
                                              messages=[{"role": "user", "content": question}])
    cached = resp.usage.prompt_tokens_details.cached_tokens
    assert shared >= 100 and cached >= shared // 16 * 16 - 16, (cached, shared)  # full 16-token blocks


DRAWS_ON = [("why does my default list argument keep growing between calls?", "programming-010"),
            ("will python ever drop the GIL?", "library-014"),
            ("what is the difference between tuples and lists, why have both?", "design-017")]


@pytest.mark.slow
def test_generated_answers_draw_on_the_right_source(helpdesk_url):
    """Questions whose prompt holds 2-3 passages with the right one first: the bundled 135M model's answer should
    share most of its words with the right passage. It does for 43 of the 50 eval questions (docs/helpdesk.md) and
    never writes [n] citations itself. Greedy answers of this model change with the prefix cache's state (cached
    and recomputed KV differ in the last bits): programming-010 has been seen to miss, so 2 of the 3 are asked."""
    url, service = helpdesk_url
    right = []
    for question, entry_id in DRAWS_ON:
        turn = httpx.post(url + "/v1/helpdesk/chat", json={"question": question, "stream": False, "max_tokens": 48},
                          timeout=300).json()
        assert turn["mode"] == "generated" and len(turn["sources"]) >= 2 and turn["sources"][0]["id"] == entry_id
        passages = [text for _, text in prompt_passages(service.plan(question, [])[1])]
        right.append(drawn_from(turn["answer"], passages) == 1)
    assert sum(right) >= 2, right
