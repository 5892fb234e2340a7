"""The PostgreSQL + pgvector store (pgserver) gives the same top-5 as the embedded store on the evaluation set."""

from __future__ import annotations

import pytest

from pagellm.apps.helpdesk.kb import lexical_tokens
from pagellm.apps.helpdesk.retrieval import Retriever, build_index
from pagellm.apps.helpdesk.store import open_store
from tests.apps.helpdesk.conftest import load_questions


@pytest.fixture(scope="module")
def pg_store(pg_server, faq_entries, embedder, tmp_path_factory):
    import psycopg

    base = pg_server.get_uri()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS helpdesk_faq")
        conn.execute("CREATE DATABASE helpdesk_faq")
    store = open_store(tmp_path_factory.mktemp("unused"), embedder.dim, base.replace("/postgres?", "/helpdesk_faq?"))
    build_index(faq_entries, store, embedder, ["q", "qa"])
    yield store
    store.close()


def test_postgres_top5_equals_embedded_top5(pg_store, retriever):
    pg = Retriever(pg_store, retriever.embedder, retriever.calibration)
    assert pg_store.count() == retriever.store.count() == 179
    for q in load_questions("eval_questions.jsonl"):
        vector = retriever.embedder.embed([q["question"]])[0]
        tokens = lexical_tokens(q["question"])
        dense_pg, dense_sq = pg_store.dense_search(vector, 5), retriever.store.dense_search(vector, 5)
        assert [i for i, _ in dense_pg] == [i for i, _ in dense_sq]
        lex_pg, lex_sq = pg_store.lexical_search(tokens, 5), retriever.store.lexical_search(tokens, 5)
        assert [i for i, _ in lex_pg] == [i for i, _ in lex_sq], q
        assert [s for _, s in lex_pg] == pytest.approx([s for _, s in lex_sq], rel=1e-6)  # the same BM25
        a, b = pg.retrieve(q["question"]), retriever.retrieve(q["question"])
        assert [h.entry.id for h in a.hits] == [h.entry.id for h in b.hits], q
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


@pytest.mark.parametrize("kind", ["embedded", "postgres"])
def test_sessions_and_feedback_contract(kind, tmp_path, request, embedder):
    uri = request.getfixturevalue("postgres_uri") if kind == "postgres" else None
    store = open_store(tmp_path, embedder.dim, uri)
    sid = store.create_session()
    assert store.has_session(sid) and not store.has_session("nope")
    store.add_turn(sid, "user", "hi", {"query": "hi"})
    turn_id = store.add_turn(sid, "assistant", "hello", {"mode": "template"})
    assert [(t["role"], t["content"], t["meta"]) for t in store.turns(sid)] == [
        ("user", "hi", {"query": "hi"}), ("assistant", "hello", {"mode": "template"})]
    assert store.add_feedback(sid, turn_id, -1, "wrong") == 1
    assert store.feedback()[0]["rating"] == -1 and store.feedback()[0]["turn_id"] == turn_id
    store.close()
