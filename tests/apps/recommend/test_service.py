"""Train -> evaluate -> recommend on a small slice, through the real engine stages; the API's answers to good
and bad requests. Slow: the session's training (item embeddings, a fine-tuning run) takes about a minute."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from pagellm.apps.recommend.api import build_recommend_app
from pagellm.apps.recommend.pipeline import evaluate
from pagellm.apps.recommend.service import MAX_CANDIDATES, MAX_K
from pagellm.entrypoints.cli import main

pytestmark = pytest.mark.slow

METHODS = {"popularity", "item_knn", "mf", "bi_encoder", "finetuned", "combined", "combined_fast"}


def test_train_writes_every_stage_and_its_time(trained_model):
    out, report, data = trained_model
    for name in ("config.json", "store.sqlite", "behaviour.joblib", "ranker.joblib", "ranker_fast.joblib",
                 "finetuned/config.json", "finetuned/pagellm_task.json"):
        assert (out / name).is_file(), name
    assert report["num_users"] == 15 and report["num_items"] == len(data.items)
    assert set(report["timings"]) >= {"item_embeddings_s", "behaviour_models_s", "finetune_s", "ranker_s"}
    cross = report["cross_scorer"]
    assert cross["pairs"] == 15 * 4 * 3  # 4 steps per user: a positive, a uniform and a popular negative each
    assert cross["dev_pairs"] == 5 * 3  # the validation items of the users after the full ranker's 10
    assert len(cross["dev_history"]) == 10 and all(0.0 < h["loss"] < 5.0 for h in cross["dev_history"])
    assert json.loads((out / "finetuned" / "config.json").read_text())["num_hidden_layers"] == 3


def test_evaluate_reports_every_method_and_cold_start(trained_model, capsys):
    out = trained_model[0]
    report = evaluate(out, max_users=3, cold_users=2)
    assert set(report["methods"]) == METHODS and report["num_users"] == 3 and report["num_candidates"] == 100
    for m in list(report["methods"].values()) + list(report["cold_start"]["methods"].values()):
        assert 0.0 <= m["ndcg@10"] <= m["hr@10"] <= 1.0
    assert report["cold_start"]["history_items"] == 3
    assert main(["recommend", "evaluate", "--model", str(out), "--max-users", "4", "--finetuned-users", "1",
                 "--cold-users", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["methods"]) == METHODS - {"finetuned", "combined"}
    assert printed["finetuned_subset"]["num_users"] == 1 and set(printed["finetuned_subset"]["methods"]) == METHODS
    assert printed["cold_start"]["num_users"] == 2 and printed["cold_start"]["finetuned_subset"]["num_users"] == 1


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_known_user_gets_unseen_items_ranked_with_explanations(service, mode):
    user = service.data.user_ids[0]
    seen = {e.item_id for e in service.data.by_user[user]}
    out = service.recommend(user_id=user, k=5, mode=mode)
    recs = out["data"]
    assert len(recs) == 5 and not seen & {r["item_id"] for r in recs}
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    for r in recs:
        assert 1 <= len(r["because"]) <= 3 and {b["item_id"] for b in r["because"]} <= seen


def test_candidates_limit_the_ranking_and_exclude_seen_filters(service):
    user = service.data.user_ids[1]
    events = service.data.by_user[user]
    seen_id = events[-1].item_id
    unseen = [it.item_id for it in service.data.items if it.item_id not in {e.item_id for e in events}][:4]
    out = service.recommend(user_id=user, candidates=[seen_id, *unseen], k=10, mode="fast")
    assert {r["item_id"] for r in out["data"]} == set(unseen)
    out = service.recommend(user_id=user, candidates=[seen_id, *unseen], k=10, exclude_seen=False, mode="fast")
    assert {r["item_id"] for r in out["data"]} == {seen_id, *unseen}


def test_cold_start_history_by_title_and_outside_text(service):
    titles = [service.data.items[i].label for i in range(3)]
    out = service.recommend(history=[*titles, "a heist film set in a casino"], k=4, mode="full")
    recs = out["data"]
    assert len(recs) == 4 and not set(titles) & {r["title"] for r in recs}
    sources = {b["title"] for r in recs for b in r["because"]}
    assert sources <= {*titles, "a heist film set in a casino"}


@pytest.fixture
def client(service):
    return TestClient(build_recommend_app(service))


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"user_id": "no-such-user"}, 404, "user_id"),
    ({"history": []}, 400, "history"),
    ({"history": ["  "]}, 400, "history"),
    ({"user_id": "1", "k": 0}, 400, "k"),
    ({"user_id": "1", "k": MAX_K + 1}, 400, "k"),
    ({"user_id": "1", "candidates": [str(i) for i in range(10_000)]}, 400, "candidates"),
    ({"user_id": "1", "candidates": ["not a movie"]}, 400, "candidates[0]"),
    ({"user_id": "1", "history": ["Toy Story (1995)"]}, 400, "user_id"),
    ({}, 400, "user_id"),
    ({"user_id": "1", "mode": "slow"}, 400, None),
    ({"user_id": "1", "colour": "red"}, 400, None),
])
def test_bad_requests_get_openai_style_4xx(client, body, status, param):
    resp = client.post("/v1/recommend", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    if param is not None:
        assert error["param"] == param
    if status == 404:
        assert error["code"] == "user_not_found"
    assert client.post("/v1/recommend", json={"user_id": "1", "k": 2, "mode": "fast"}).status_code == 200


def test_max_candidates_is_accepted(client, service):
    ids = [it.item_id for it in service.data.items][:MAX_CANDIDATES]
    resp = client.post("/v1/recommend", json={"user_id": "1", "candidates": ids, "k": 3, "mode": "fast"})
    assert resp.status_code == 200 and len(resp.json()["data"]) == 3


def test_served_over_http(serve_app, service):
    base = serve_app(build_recommend_app(service))
    health = httpx.get(f"{base}/v1/recommend/health").json()
    assert health["users"] == 15 and health["modes"] == ["fast", "full"]
    resp = httpx.post(f"{base}/v1/recommend", json={"user_id": 1, "k": 3}, timeout=60)
    assert resp.status_code == 200 and len(resp.json()["data"]) == 3 and resp.json()["mode"] == "fast"


def test_cross_scorer_cuts_a_long_pair_to_the_token_cap_in_one_batched_call(service):
    from pagellm.apps.recommend.semantic import MAX_PAIR_TOKENS, pair_text

    items = service.data.items
    long_profile = "; ".join(item.title for item in items[:150])  # a description-sized profile
    texts = [pair_text(long_profile, items[0])] + [pair_text("Drama. Fargo", item) for item in items[1:8]]
    tokenizer = service.cross.llm.get_tokenizer()
    assert len(tokenizer(texts[0])["input_ids"]) > 4 * MAX_PAIR_TOKENS
    together = service.cross.score(texts)  # NOTE: the scoring cost follows the tokens: the cap bounds it
    cut = tokenizer(texts[0], truncation=True, max_length=MAX_PAIR_TOKENS)["input_ids"]
    alone = service.cross.llm.classify([cut], use_tqdm=False)[0].outputs.probs[service.cross.positive_index]
    assert together[0] == pytest.approx(alone, abs=1e-5)
    assert together[1:] == pytest.approx(service.cross.score(texts[1:]), abs=1e-5)
