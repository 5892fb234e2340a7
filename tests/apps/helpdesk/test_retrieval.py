"""Retrieval on the committed FAQ: recall@k on the held-out questions, incremental re-index, the knowledge base
loaders and the follow-up rewrite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pagellm.apps.helpdesk.kb import chunk_text, clean_rest, lexical_tokens, load_kb
from pagellm.apps.helpdesk.retrieval import Retriever, build_index, recall_at
from pagellm.apps.helpdesk.service import is_follow_up, rewrite_follow_up
from pagellm.apps.helpdesk.store import EmbeddedStore
from pagellm.errors import InvalidRequest
from tests.apps.helpdesk.conftest import load_questions


def test_eval_set_is_held_out_and_labelled(faq_entries):
    ids = {e.id for e in faq_entries}
    questions = load_questions("eval_questions.jsonl")
    assert len(questions) >= 40 and all(q["id"] in ids for q in questions)
    faq_questions = {e.question.lower() for e in faq_entries}
    assert not any(q["question"].lower() in faq_questions for q in questions)  # the user's words, not the FAQ's
    dev = {q["question"] for q in load_questions("dev_questions.jsonl")}
    assert not dev & {q["question"] for q in questions}


def test_fused_recall_meets_target(retriever):
    questions = load_questions("eval_questions.jsonl")
    fused = recall_at(retriever, questions)
    dense = recall_at(Retriever(retriever.store, retriever.embedder, use_lexical=False), questions)
    lexical = recall_at(Retriever(retriever.store, retriever.embedder, use_dense=False), questions)
    assert fused[1] >= 0.85 and fused[5] >= 0.98, fused
    assert fused[1] >= dense[1] and fused[1] > lexical[1], (fused, dense, lexical)


def test_confidence_separates_out_of_scope_questions(retriever):
    from pagellm.apps.helpdesk.service import Thresholds

    t = Thresholds()
    outside = [q["question"] for q in load_questions("dev_questions.jsonl") if q["id"] is None]
    modes = [t.mode(retriever.retrieve(q).confidence) for q in outside]
    assert "template" not in modes and modes.count("handoff") >= 9, modes
    sure = retriever.retrieve("why does my default list argument keep growing between calls?")
    assert sure.hits[0].entry.id == "programming-010" and t.mode(sure.confidence) != "handoff"
    exact = retriever.retrieve("How do I convert between tuples and lists?")
    assert exact.hits[0].entry.id == "programming-036" and t.mode(exact.confidence) == "template"


def test_incremental_reindex_embeds_only_changed_entries(tmp_path, faq_entries, embedder):
    from dataclasses import replace

    entries = faq_entries[:12]
    store = EmbeddedStore(tmp_path, embedder.dim)
    first = build_index(entries, store, embedder, ["q"])
    assert (first.num_added, first.num_changed, first.num_unchanged) == (12, 0, 0)
    # the first entry edited, the last one gone
    changed = [replace(entries[0], answer=entries[0].answer + " Also: pagellm.")] + entries[1:11]
    second = build_index(changed, store, embedder, ["q"])
    assert (second.num_added, second.num_changed, second.num_removed, second.num_unchanged) == (0, 1, 1, 10)
    assert store.count() == 11 and store.entries([entries[0].id])[entries[0].id].answer.endswith("pagellm.")
    assert entries[11].id not in dict(store.dense_search(embedder.embed([entries[11].question])[0], 20))
    store.close()
    reopened = EmbeddedStore(tmp_path, embedder.dim)  # the faiss file and SQLite agree after a restart
    top = reopened.dense_search(embedder.embed([entries[3].question])[0], 1)
    assert top[0][0] == entries[3].id and top[0][1] == pytest.approx(1.0, abs=1e-4)


def test_lexical_tokens_and_markup():
    assert lexical_tokens("How do I sort lists of __init__ methods?") == ["sort", "list", "init", "method"]
    assert clean_rest("Use :func:`sorted` or ``x.sort()``, see `the docs <https://d.org>`_.") == \
        "Use sorted or x.sort(), see the docs (https://d.org)."
    assert clean_rest("One.\n\n.. _why-self:\n\nTwo.") == "One.\n\nTwo."


def test_folder_knowledge_base_is_chunked(tmp_path):
    (tmp_path / "returns.md").write_text("# Returns policy\n\n" + "word " * 450 + "\n\nLast paragraph.")
    (tmp_path / "shipping.html").write_text("<h1>Shipping</h1><script>x()</script><p>We ship in 3 days.</p>")
    entries = load_kb(tmp_path)
    assert [e.id for e in entries] == ["returns.md#0", "returns.md#1", "returns.md#2", "shipping.html#0"]
    assert entries[0].question == "Returns policy" and "x()" not in entries[3].answer
    assert all(len(c.split()) <= 200 for c in chunk_text("a " * 1000))


def test_bad_knowledge_base_is_refused(tmp_path):
    bad = tmp_path / "kb.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(InvalidRequest, match="line 1"):
        load_kb(bad)
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_kb(tmp_path / "nope.jsonl")


def test_follow_up_is_rewritten_with_the_previous_question(retriever):
    history = [{"role": "user", "content": "why are python strings immutable?", "meta": {}},
               {"role": "assistant", "content": "...", "meta": {}}]
    assert is_follow_up("and dictionary keys?") and not is_follow_up("how do I copy a file in python?")
    query = rewrite_follow_up("and dictionary keys?", history)
    assert query == "dictionary keys (why are python strings immutable?)"
    assert retriever.retrieve(query).hits[0].entry.id == "design-020"  # "Why must dictionary keys be immutable?"
    assert rewrite_follow_up("how do I copy a file in python?", history) == "how do I copy a file in python?"


def test_vectors_are_normalized(embedder):
    v = embedder.embed(["hello", "a much longer sentence about lists"])
    assert v.shape == (2, embedder.dim) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
