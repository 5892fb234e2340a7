"""`pagellm recommend train` on a user's own interactions.csv + items.jsonl, then evaluate; bad arguments exit 2
with a message, before any model loads."""

from __future__ import annotations

import json
import random

import pytest

from pagellm.entrypoints.cli import main

GENRES = ["Drama", "Comedy", "Action", "Horror"]


def write_custom(tmp_path, num_users: int = 8, num_items: int = 40):
    rng = random.Random(0)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"item_id": f"i{i}", "title": f"Film {i}", "year": str(1990 + i % 10),
                                         "genres": [GENRES[i % 4]]}) + "\n" for i in range(num_items)))
    lines = ["user_id,item_id,rating,timestamp"]
    for u in range(num_users):
        for t, i in enumerate(rng.sample(range(num_items), 8)):
            lines.append(f"u{u},i{i},{rng.randint(1, 5)},{t}")
    inter = tmp_path / "inter.csv"
    inter.write_text("\n".join(lines) + "\n")
    return inter, items


@pytest.mark.slow
def test_train_and_evaluate_on_custom_files(tmp_path, capsys):
    inter, items = write_custom(tmp_path)
    out = tmp_path / "model"
    assert main(["recommend", "train", "--interactions", str(inter), "--items", str(items), "--out", str(out),
                 "--num-negatives", "9", "--num-valid-negatives", "4"]) == 0
    # NOTE: the Trainer prints its loss lines to stdout too; the command's own line is the last
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["users"] == 8 and trained["items"] == 40
    assert main(["recommend", "evaluate", "--model", str(out), "--json", "--cold-users", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_users"] == 8 and report["num_candidates"] == 10
    assert set(report["methods"]) >= {"popularity", "item_knn", "mf", "bi_encoder", "finetuned", "combined"}
    # 10 candidates: every target is in the top 10, and NDCG says where
    assert all(m["hr@10"] == 1.0 and 0.28 < m["ndcg@10"] <= 1.0 for m in report["methods"].values())


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "movielens-100k", "--interactions", "x.csv"], "not both"),
    ([], "give --data movielens-100k"),
])
def test_train_argument_errors_exit_2(tmp_path, capsys, argv, message):
    assert main(["recommend", "train", "--out", str(tmp_path / "m"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_too_few_items_for_the_negatives_is_a_clear_error(tmp_path, capsys):
    inter, items = write_custom(tmp_path, num_items=12)
    assert main(["recommend", "train", "--interactions", str(inter), "--items", str(items),
                 "--out", str(tmp_path / "m")]) == 2
    assert "negatives are needed" in capsys.readouterr().err


def test_evaluate_needs_a_trained_folder(tmp_path, capsys):
    assert main(["recommend", "evaluate", "--model", str(tmp_path)]) == 2
    assert "not a trained recommender" in capsys.readouterr().err
