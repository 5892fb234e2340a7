"""The store interface on SQLite (embedded default) and on PostgreSQL with pgvector (pgserver fixture): items,
their vectors and interactions round-trip exactly; a model folder pointed at PostgreSQL serves the same answers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pagellm.apps.recommend.data import Interaction, Item
from pagellm.apps.recommend.store import open_store

ITEMS = [Item("1", "Toy Story", "1995", ("Animation", "Comedy")), Item("x", "Notes", "", (), "a description")]
INTER = [Interaction("u1", "1", 5.0, 10.0), Interaction("u2", "x", 3.5, 7.0), Interaction("u1", "x", 1.0, 11.0)]


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "store.sqlite"
    return request.getfixturevalue("postgres_uri")


def test_items_vectors_and_interactions_round_trip(location):
    vectors = np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32)
    store = open_store(location)
    store.save_items(ITEMS, vectors)
    store.save_interactions(INTER)
    store.close()
    store = open_store(location)  # a new connection reads what the first wrote
    assert store.items() == ITEMS
    assert store.interactions() == INTER
    np.testing.assert_array_equal(store.item_vectors(), vectors)
    store.save_items(ITEMS[:1], vectors[:1])  # saving again replaces, never appends
    assert store.items() == ITEMS[:1] and store.item_vectors().shape == (1, 384)
    store.close()


@pytest.mark.slow
def test_model_on_postgres_serves_the_same_recommendations(trained_model, service, postgres_uri, tmp_path):
    from pagellm.apps.recommend.service import RecommendService

    model = tmp_path / "pg_model"
    shutil.copytree(trained_model[0], model)
    source = open_store(model / "store.sqlite")
    target = open_store(postgres_uri)
    target.save_items(source.items(), source.item_vectors())
    target.save_interactions(source.interactions())
    source.close()
    target.close()
    (model / "store.sqlite").unlink()
    config = json.loads((model / "config.json").read_text())
    config["settings"]["store"] = postgres_uri
    (model / "config.json").write_text(json.dumps(config))
    on_pg = RecommendService(model, load_cross=False)
    user = service.data.user_ids[2]
    assert on_pg.recommend(user_id=user, k=5, mode="fast") == service.recommend(user_id=user, k=5, mode="fast")
