"""MovieLens-100k from the recbole wheel, item text, the leave-last-out split, behaviour baselines and metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pagellm.apps.recommend.behaviour import BehaviourModel
from pagellm.apps.recommend.data import leave_last_out, load_custom, load_movielens_100k
from pagellm.apps.recommend.ranker import hit_ndcg, target_ranks
from pagellm.apps.recommend.semantic import (
    MAX_PAIR_TOKENS,
    CrossScorerSettings,
    bundled_encoder,
    cross_dev_rows,
    cross_training_rows,
    pair_text,
    profile_text,
    profile_weights,
    truncated_encoder,
)
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


def test_profile_text_names_recent_liked_items_and_top_genres(movielens):
    items = [movielens.items[i] for i in range(7)]
    ratings = [5, 2, 5, 5, 4, 1, 5]
    text = profile_text(items, ratings, num_items=3)
    genres, _, titles = text.partition(". ")
    assert titles == f"{items[6].title}; {items[4].title}; {items[3].title}"  # newest first, liked only
    counts: dict[str, float] = {}
    for item, rating in zip(items, ratings):
        for g in item.genres:
            counts[g] = counts.get(g, 0) + rating
    assert genres.split(", ")[0] == max(counts, key=counts.get)
    assert profile_text(items, ratings, num_items=3, extra_titles=["a film about bees"]).endswith(
        f". a film about bees; {items[6].title}; {items[4].title}")


def test_pair_text_puts_the_candidate_first_and_fits_the_token_cap(movielens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_encoder())
    data = movielens.slice_users(100)
    split = leave_last_out(data, seed=0)
    lengths = []
    for case in split.test:
        profile = profile_text([data.items[data.item_index[e.item_id]] for e in case.history],
                               [e.rating for e in case.history])
        text = pair_text(profile, data.items[case.candidates[0]])
        assert text.startswith(data.items[case.candidates[0]].label)
        lengths.append(len(tok(text)["input_ids"]))
    # NOTE: the scoring cost is linear in these tokens (the old 5-item profile: ~58 a pair); the rare longer pair
    # is cut to MAX_PAIR_TOKENS, losing its oldest title
    assert np.mean(lengths) < 40 and np.percentile(lengths, 95) <= MAX_PAIR_TOKENS


def test_cross_training_rows_pair_each_step_with_a_uniform_and_a_popular_negative(movielens):
    data = movielens.slice_users(200)
    split = leave_last_out(data, seed=0)
    settings = CrossScorerSettings(pairs_per_user=4)
    rows = cross_training_rows(data, split.fit, settings)
    assert len(rows) == 200 * 4 * 3
    assert [r["label"] for r in rows[:6]] == ["yes", "no", "no"] * 2
    assert rows == cross_training_rows(data, split.fit, settings), "seeded"
    by_text = {item.label: i for i, item in enumerate(data.items)}
    labels = [item.label for item in data.items]
    duplicated = {label for label in labels if labels.count(label) > 1}
    popularity = np.bincount([data.item_index[e.item_id] for e in split.fit], minlength=len(data.items))
    uniform, popular = [], []
    for u, user_id in enumerate(sorted(data.by_user)):  # the rows' user order
        rated = {data.items[data.item_index[e.item_id]].label for e in data.by_user[user_id]}
        held_out = {data.items[data.item_index[e.item_id]].label for e in data.by_user[user_id][-2:]}
        for step in range(4):
            pos, neg_u, neg_p = rows[u * 12 + step * 3: u * 12 + step * 3 + 3]
            cands = [r["text"].split(" [SEP] ")[0].rsplit(". ", 1)[0] for r in (pos, neg_u, neg_p)]
            assert cands[0] in rated and cands[0] not in held_out - duplicated, "positives: fit interactions only"
            # NOTE: a few MovieLens titles name two item ids (e.g. Fly Away Home (1996)); those cannot be told apart
            assert not {cands[1], cands[2]} & (rated - duplicated)
            uniform.append(popularity[by_text[cands[1]]])
            popular.append(popularity[by_text[cands[2]]])
    # the popularity-sampled negatives are well known items, so "is it popular" cannot tell them apart
    assert np.mean(popular) > 3 * np.mean(uniform)
    dev = cross_dev_rows(data, split.valid[:10], split.fit, seed=0)
    assert [r["label"] for r in dev] == ["yes", "no", "no"] * 10
    assert dev[0]["text"].startswith(data.items[split.valid[0].candidates[0]].label)


def test_truncated_encoder_keeps_the_bottom_layers(tmp_path):
    from safetensors import safe_open

    out = truncated_encoder(bundled_encoder(), 3, tmp_path / "enc")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        layers = {int(k.split("layer.")[1].split(".")[0]) for k in f.keys() if "encoder.layer." in k}
        assert layers == {0, 1, 2} and any("embeddings" in k for k in f.keys())
    with pytest.raises(InvalidRequest, match="6 layers"):
        truncated_encoder(bundled_encoder(), 7, tmp_path / "bad")


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
