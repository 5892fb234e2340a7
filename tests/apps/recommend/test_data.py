"""MovieLens-100k from the recbole wheel, item text, the leave-last-out split, behaviour baselines and metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pagellm.apps.recommend.behaviour import BehaviourModel
from pagellm.apps.recommend.data import leave_last_out, load_custom, load_movielens_100k
from pagellm.apps.recommend.ranker import hit_ndcg, target_ranks
from pagellm.apps.recommend.semantic import profile_text, profile_weights
from pagellm.errors import InvalidRequest


@pytest.fixture(scope="module")
def movielens():
    return load_movielens_100k()


def test_movielens_has_the_published_counts_and_item_text(movielens):
    assert len(movielens.items) == 1682 and len(movielens.interactions) == 100_000
    assert len(movielens.by_user) == 943
    toy = movielens.items[movielens.item_index["1"]]
    assert toy.label == "Toy Story (1995)"
    assert toy.text == "Toy Story (1995). Genres: Animation, Children's, Comedy."


def test_split_holds_out_each_users_last_interaction_among_unrated_negatives(movielens):
    data = movielens.slice_users(50)
    split = leave_last_out(data, seed=0)
    assert len(split.test) == len(split.valid) == 50
    for case, valid in zip(split.test, split.valid):
        events = data.by_user[case.user_id]
        assert data.items[case.candidates[0]].item_id == events[-1].item_id
        assert data.items[valid.candidates[0]].item_id == events[-2].item_id
        assert max(e.timestamp for e in case.history) <= events[-1].timestamp
        rated = {data.item_index[e.item_id] for e in events}
        assert len(case.candidates) == 100 and len(set(case.candidates)) == 100
        assert not rated & set(case.candidates[1:]), "negatives are items the user never rated"
    # the training sets never contain a held-out target
    test_pairs = {(c.user_id, data.items[c.candidates[0]].item_id) for c in split.test}
    assert not test_pairs & {(e.user_id, e.item_id) for e in split.train}
    valid_pairs = {(c.user_id, data.items[c.candidates[0]].item_id) for c in split.valid}
    assert not valid_pairs & {(e.user_id, e.item_id) for e in split.fit}
    again = leave_last_out(data, seed=0)
    assert [c.candidates for c in again.test] == [c.candidates for c in split.test], "fixed seed, same negatives"
    assert [c.candidates for c in leave_last_out(data, seed=1).test] != [c.candidates for c in split.test]


def test_metrics_rank_the_target_with_ties_counted_half():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.9], [0.5, 0.5, 0.1]])
    assert target_ranks(scores).tolist() == [0.0, 2.0, 0.5]
    m = hit_ndcg(scores, k=1)
    assert m["hr@1"] == pytest.approx(round(2 / 3, 4))
    assert m["ndcg@1"] == pytest.approx(round((1 + 1 / np.log2(2.5)) / 3, 4))


def test_profile_weights_favour_recent_and_high_ratings():
    w = profile_weights([5, 5, 1, 5], half_life=1.0)
    assert w[3] == pytest.approx(1.0) and w[1] == pytest.approx(0.25) and w[2] == pytest.approx(0.1)


def test_profile_text_names_recent_liked_items(movielens):
    items = [movielens.items[i] for i in range(7)]
    text = profile_text(items, [5, 2, 5, 5, 4, 1, 5], num_items=3)
    assert text == f"Recently watched: {items[6].label}; {items[4].label}; {items[3].label}."  # newest first


def test_behaviour_baselines_beat_chance_on_a_slice(movielens):
    data = movielens.slice_users(200)
    split = leave_last_out(data, seed=0)
    model = BehaviourModel.fit(split.train, data.item_index, len(data.items))
    hist = [[data.item_index[e.item_id] for e in c.history] for c in split.test]
    cands = [c.candidates for c in split.test]
    chance = 0.1  # 10 of 100 candidates
    for name, scores in {"popularity": model.popularity_scores(cands), "item_knn": model.knn_scores(hist, cands, 5),
                         "mf": model.mf_scores(hist, cands)}.items():
        assert hit_ndcg(scores)["hr@10"] > 2 * chance, name


def test_custom_data_errors_name_the_file_and_row(tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"item_id": "a", "title": "Alpha", "genres": "x|y"}) + "\n" +
                     json.dumps({"item_id": "b", "title": "Beta"}) + "\n")
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,rating,timestamp\nu1,a,5,1\nu1,b,4,2\n")
    data = load_custom(str(inter), str(items))
    assert data.items[0].genres == ("x", "y") and len(data.by_user["u1"]) == 2
    inter.write_text("user_id,item_id\nu1,zzz\n")
    with pytest.raises(InvalidRequest, match="row 2: item 'zzz'"):
        load_custom(str(inter), str(items))
    items.write_text("{not json\n")
    with pytest.raises(InvalidRequest, match="line 1: not JSON"):
        load_custom(str(inter), str(items))
