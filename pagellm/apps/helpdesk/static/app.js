// The chat page: each question goes to POST /v1/helpdesk/chat and the answer streams back as server-sent
// events (plan: mode and sources; delta: text; done: the stored turn). The session id lives in sessionStorage,
// so a reload keeps the conversation going.
"use strict";

const log = document.getElementById("log");
const form = document.getElementById("ask");
const input = document.getElementById("question");
const desk = document.getElementById("desk");
let sessionId = sessionStorage.getItem("helpdesk-session");

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = `msg ${kind}`;
  div.textContent = text;
  log.appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function showSources(div, turn) {
  const badge = document.createElement("span");
  badge.className = "mode";
  badge.textContent = {template: "from the FAQ", generated: "generated from the FAQ", handoff: "no answer found"}[turn.mode];
  div.prepend(badge, document.createElement("br"));
  div.dataset.mode = turn.mode;
  if (turn.mode === "handoff") div.classList.add("handoff");
  if (turn.sources.length) {
    const list = document.createElement("ol");
    list.className = "sources";
    for (const s of turn.sources) {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = s.id;
      li.append(code, ` ${s.question} (${s.score.toFixed(3)})`);
      list.appendChild(li);
    }
    div.appendChild(list);
  }
}

function addFeedback(div, turn) {
  const box = document.createElement("div");
  box.className = "feedback";
  box.append("Helpful? ");
  for (const [rating, label] of [[1, "yes"], [-1, "no"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = rating > 0 ? "helpful" : "not helpful";
    b.onclick = async () => {
      await fetch("/v1/helpdesk/feedback", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({rating, session_id: turn.session_id, turn_id: turn.turn_id})});
      box.querySelectorAll("button").forEach((x) => x.classList.remove("chosen"));
      b.classList.add("chosen");
    };
    box.appendChild(b);
  }
  div.appendChild(box);
}

async function ask(question) {
  bubble("user", question);
  const div = bubble("bot", "");
  const text = document.createElement("span");
  text.className = "answer";
  div.appendChild(text);
  const response = await fetch("/v1/helpdesk/chat", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({question, session_id: sessionId, stream: true})});
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    text.textContent = `Error: ${body.error ? body.error.message : response.status}`;
    if (response.status === 404) { sessionId = null; sessionStorage.removeItem("helpdesk-session"); }
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) { text.textContent += `\nError: ${event.error.message}`; continue; }
      if (event.type === "plan") {
        sessionId = event.session_id;
        sessionStorage.setItem("helpdesk-session", sessionId);
        showSources(div, event);
        div.insertBefore(text, div.querySelector(".sources"));
      } else if (event.type === "delta") {
        text.textContent += event.text;
      } else if (event.type === "done") {
        div.dataset.done = "1";
        addFeedback(div, event);
        if (event.mode === "handoff") document.getElementById("handoff").focus();
      }
    }
  }
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = input.value.trim();
  if (!question) return;
  input.value = "";
  document.getElementById("send").disabled = true;
  try { await ask(question); } finally { document.getElementById("send").disabled = false; input.focus(); }
});

document.getElementById("handoff").addEventListener("click", async () => {
  if (!sessionId) {
    const r = await fetch("/v1/helpdesk/chat", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({question: "I would like to talk to a person", stream: false})});
    sessionId = (await r.json()).session_id;
    sessionStorage.setItem("helpdesk-session", sessionId);
  }
  const r = await fetch("/v1/helpdesk/handoff", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({session_id: sessionId})});
  if (r.ok) {
    desk.dataset.state = "handoff";
    document.getElementById("handoff-banner").hidden = false;
  }
});
