"""A recommender trained once per session on a slice of MovieLens-100k (15 users and the items they rated), so
the service, API and CLI tests run the real stages (engine embeddings, pagellm finetune, the ranker) quickly."""

from __future__ import annotations

import pytest

NUM_USERS = 15
NUM_DEV_AFTER = 10  # the full ranker learns from the first 10 users; the cross scorer's dev set is the rest


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    from pagellm.apps.recommend.data import load_movielens_100k
    from pagellm.apps.recommend.pipeline import TrainSettings, train

    out = tmp_path_factory.mktemp("recommend") / "model"
    data = load_movielens_100k().slice_users(NUM_USERS, only_rated_items=True)
    report = train(data, out, TrainSettings(num_valid_negatives=9, cross_valid_users=NUM_DEV_AFTER))
    return out, report, data


@pytest.fixture(scope="session")
def service(trained_model):
    from pagellm.apps.recommend.service import RecommendService

    return RecommendService(trained_model[0])
