"""The help desk server with the real engine: the OpenAI face through the real `openai` client (streaming and
not), the three answer modes, sessions, hand-off, feedback, and clear 4xx errors for bad input."""

from __future__ import annotations

import httpx
import pytest

TEMPLATE_Q = "sorting a list using the values of a second list"  # programming-046, confidence ~0.94
GENERATED_Q = "why does my default list argument keep growing between calls?"  # programming-010, ~0.43
OUTSIDE_Q = "what's the weather in Paris tomorrow?"


@pytest.fixture(scope="module")
def client(helpdesk_url):
    import openai

    return openai.OpenAI(base_url=helpdesk_url[0] + "/v1", api_key="none", max_retries=0)


def test_openai_template_answer_with_sources(client, helpdesk_url):
    service = helpdesk_url[1]
    resp = client.chat.completions.create(model="helpdesk", messages=[{"role": "user", "content": TEMPLATE_Q}])
    extra = resp.model_extra["helpdesk"]
    assert extra["mode"] == "template" and extra["sources"][0]["id"] == "programming-046"
    expected = service.store.entries(["programming-046"])["programming-046"].answer
    assert resp.choices[0].message.content == expected and resp.choices[0].finish_reason == "stop"


def test_openai_streams_a_generated_answer_with_citations_context(client, helpdesk_url):
    stream = client.chat.completions.create(model="helpdesk", stream=True, max_tokens=16,
                                            messages=[{"role": "user", "content": GENERATED_Q}])
    chunks = list(stream)
    first, last = chunks[0].model_extra["helpdesk"], chunks[-1].model_extra["helpdesk"]
    assert first["mode"] == "generated" and [s["id"] for s in first["sources"]][0] == "programming-010"
    assert len(first["sources"]) == 3 and last["turn_id"] is not None
    assert chunks[-1].choices[0].finish_reason == "length"  # 16 tokens cut the answer
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len([c for c in chunks if c.choices[0].delta.content]) >= 3 and text.strip()  # streamed in pieces
    # the fixed system prompt comes first: the second generated answer reuses its cached KV blocks
    again = client.chat.completions.create(model="helpdesk", max_tokens=4,
                                           messages=[{"role": "user", "content": "how to memoize method results"}])
    assert again.model_extra["helpdesk"]["mode"] == "generated"
    assert again.usage.prompt_tokens_details.cached_tokens >= 48


def test_handoff_for_a_question_outside_the_knowledge_base(client, helpdesk_url):
    url = helpdesk_url[0]
    resp = client.chat.completions.create(model="helpdesk", messages=[{"role": "user", "content": OUTSIDE_Q}])
    extra = resp.model_extra["helpdesk"]
    assert extra["mode"] == "handoff" and extra["sources"] == []
    assert "talk to a person" in resp.choices[0].message.content.lower()
    r = httpx.post(url + "/v1/helpdesk/handoff", json={"session_id": extra["session_id"]})
    assert r.status_code == 200 and r.json()["state"] == "handoff"
    turns = httpx.get(url + f"/v1/helpdesk/sessions/{extra['session_id']}").json()["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "handoff"]


def test_session_keeps_turns_and_rewrites_follow_ups(helpdesk_url):
    url = helpdesk_url[0]
    first = httpx.post(url + "/v1/helpdesk/chat", json={"question": "why are python strings immutable?",
                                                         "stream": False}, timeout=60).json()
    assert first["sources"][0]["id"] == "design-004"
    second = httpx.post(url + "/v1/helpdesk/chat", json={"question": "and dictionary keys?", "stream": False,
                                                          "session_id": first["session_id"]}, timeout=60).json()
    assert second["query"] == "dictionary keys (why are python strings immutable?)"
    assert second["sources"][0]["id"] == "design-020"
    turns = httpx.get(url + f"/v1/helpdesk/sessions/{first['session_id']}").json()["turns"]
    assert [t["content"] for t in turns if t["role"] == "user"] == ["why are python strings immutable?",
                                                                    "and dictionary keys?"]
    fb = httpx.post(url + "/v1/helpdesk/feedback", json={"rating": 1, "session_id": first["session_id"],
                                                         "turn_id": second["turn_id"]})
    assert fb.status_code == 200
    assert helpdesk_url[1].store.feedback(1)[0]["turn_id"] == second["turn_id"]


def test_openai_messages_carry_the_conversation(client):
    resp = client.chat.completions.create(model="helpdesk", messages=[
        {"role": "user", "content": "why are python strings immutable?"},
        {"role": "assistant", "content": "Because ..."},
        {"role": "user", "content": "and dictionary keys?"}])
    assert resp.model_extra["helpdesk"]["sources"][0]["id"] == "design-020"


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_bad_input_gets_clear_4xx(client, helpdesk_url):
    import openai

    url = helpdesk_url[0]
    chat = url + "/v1/chat/completions"
    assert "empty" in _error(httpx.post(chat, json={"model": "helpdesk", "messages": [
        {"role": "user", "content": "  "}]}), 400)["message"]
    big = _error(httpx.post(chat, json={"model": "helpdesk", "messages": [
        {"role": "user", "content": "x" * 1_000_000}]}, timeout=60), 400)
    assert "1000000 characters" in big["message"] and big["param"] == "question"
    assert _error(httpx.post(url + "/v1/helpdesk/chat", json={"question": "hi", "session_id": "nope"}),
                  404)["code"] == "session_not_found"
    assert _error(httpx.post(chat, json={"model": "helpdesk", "session_id": "nope", "messages": [
        {"role": "user", "content": "hi"}]}), 404)["param"] == "session_id"
    assert _error(httpx.post(chat, json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
                  404)["code"] == "model_not_found"
    _error(httpx.post(url + "/v1/helpdesk/feedback", json={"rating": 5}), 400)
    _error(httpx.post(url + "/v1/helpdesk/handoff", json={"session_id": "nope"}), 404)
    with pytest.raises(openai.BadRequestError):  # streaming too: the 400 comes before the stream starts
        client.chat.completions.create(model="helpdesk", stream=True, messages=[{"role": "user", "content": ""}])
    ok = client.chat.completions.create(model="helpdesk", messages=[{"role": "user", "content": TEMPLATE_Q}])
    assert ok.model_extra["helpdesk"]["mode"] == "template"  # the server goes on
