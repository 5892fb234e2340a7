// The monitor dashboard: polls the monitor API every 2 s and draws the per-topic chart as SVG (no library).
"use strict";
const COLORS = ["#e63946", "#457b9d", "#2a9d8f", "#f4a261", "#6a4c93", "#8d99ae", "#264653", "#ffb703"];
const BUCKET = 100;
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawChart(points, alerts) {
  const svg = document.getElementById("chart");
  svg.replaceChildren();
  const W = 800, H = 300, L = 40, R = 10, T = 10, B = 25;
  const topics = [...new Set(points.map(p => p.topic))].sort();
  const maxBucket = Math.max(1, ...points.map(p => p.bucket));
  const x = b => L + (W - L - R) * (maxBucket ? b / maxBucket : 0);
  const y = s => T + (H - T - B) * (1 - s);
  for (const s of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(el("line", {x1: L, x2: W - R, y1: y(s), y2: y(s), stroke: "#ddd"}));
    svg.append(el("text", {x: 4, y: y(s) + 4, "font-size": 11, fill: "#667"}, `${Math.round(s * 100)}%`));
  }
  svg.append(el("text", {x: W - R, y: H - 5, "font-size": 11, fill: "#667", "text-anchor": "end"},
                `stream texts (x${BUCKET})`));
  for (const a of alerts) {
    const b = Math.floor(a.end_seq / BUCKET);
    svg.append(el("line", {x1: x(b), x2: x(b), y1: T, y2: H - B, stroke: "#b00020", "stroke-dasharray": "4 3",
                           class: "alert-marker"}));
  }
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  topics.forEach((topic, i) => {
    const color = COLORS[i % COLORS.length];
    const mine = points.filter(p => p.topic === topic);
    const d = mine.map((p, j) => `${j ? "L" : "M"}${x(p.bucket).toFixed(1)},${y(p.negative_share).toFixed(1)}`);
    svg.append(el("path", {d: d.join(" "), fill: "none", stroke: color, "stroke-width": 2, class: "series",
                           "data-topic": topic}));
    const item = document.createElement("span");
    item.innerHTML = `<i style="background:${color}"></i>`;
    item.append(topic);
    legend.append(item);
  });
}

function drawTopics(topics) {
  const body = document.querySelector("#topics tbody");
  body.replaceChildren();
  const pct = v => (v === null || v === undefined) ? "–" : `${(100 * v).toFixed(1)}%`;
  for (const t of topics) {
    const row = document.createElement("tr");
    for (const v of [t.topic, pct(t.share), pct(t.baseline), t.cusum.toFixed(2)]) {
      const cell = document.createElement("td");
      cell.textContent = v;
      row.append(cell);
    }
    body.append(row);
  }
}

function drawAlerts(alerts) {
  const list = document.getElementById("alerts");
  list.replaceChildren();
  if (!alerts.length) {
    list.textContent = "no alerts";
    return;
  }
  for (const a of alerts) {
    const item = document.createElement("li");
    item.className = "alert";
    const head = document.createElement("div");
    head.className = "alert-head";
    head.textContent = `${a.topic}: negative share ${(100 * a.share).toFixed(0)}% vs baseline ` +
      `${(100 * a.baseline).toFixed(0)}% (texts ${a.start_id} … ${a.end_id}, ${new Date(a.created * 1000).toLocaleString()})`;
    const texts = document.createElement("ul");
    texts.className = "texts";
    for (const t of a.texts || []) {
      const li = document.createElement("li");
      li.textContent = t.text;
      texts.append(li);
    }
    item.append(head, texts);
    list.append(item);
  }
}

async function refresh() {
  try {
    const [series, topics, alerts] = await Promise.all([
      fetch(`/v1/monitor/series?bucket=${BUCKET}`).then(r => r.json()),
      fetch("/v1/monitor/topics").then(r => r.json()),
      fetch("/v1/monitor/alerts?limit=20").then(r => r.json()),
    ]);
    drawChart(series.points, alerts.alerts);
    drawTopics(topics.topics);
    drawAlerts(alerts.alerts);
    document.getElementById("status").textContent = `${topics.texts} texts · updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("status").textContent = `offline (${err})`;
  }
}

document.getElementById("bucket").textContent = BUCKET;
refresh();
setInterval(refresh, 2000);
