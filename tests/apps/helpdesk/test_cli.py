"""`pagellm helpdesk index|ask|eval` through the real command parser."""

from __future__ import annotations

import json

from pagellm.entrypoints.cli import main
from tests.apps.helpdesk.conftest import FAQ


def test_ask_json_prints_answer_mode_and_sources(faq_index, capsys):
    assert main(["helpdesk", "ask", "--index", str(faq_index), "--json",
                 "how do I turn a list into a tuple and back?"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["mode"] == "template" and out["sources"][0]["id"] == "programming-036"
    assert set(out["sources"][0]) >= {"id", "question", "score"} and "tuple(" in out["answer"]


def test_index_a_folder_then_eval_and_bad_paths(tmp_path, capsys):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "returns.md").write_text("# Returns\n\nYou can return any item within 30 days for a full refund.")
    (kb / "shipping.txt").write_text("Shipping\n\nParcels leave our warehouse within two working days.")
    assert main(["helpdesk", "index", "--kb", str(kb), "--out", str(tmp_path / "idx"), "--fields", "q,a"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 2
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "how long do I have to send something back?",
                                     "id": "returns.md#0"}) + "\n")
    assert main(["helpdesk", "eval", "--index", str(tmp_path / "idx"), "--questions", str(questions)]) == 0
    assert json.loads(capsys.readouterr().out)["fused"]["recall@1"] == 1.0
    assert main(["helpdesk", "index", "--kb", str(FAQ / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["helpdesk", "ask", "--index", str(tmp_path), "hi"]) == 2
    assert "not a help desk index" in capsys.readouterr().err
