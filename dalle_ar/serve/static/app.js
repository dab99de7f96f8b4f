// The dalle-ar page: calls the server's own OpenAI-style API (relative URLs, so it also works
// behind a reverse proxy under a path prefix) and polls the request's progress while it runs.
"use strict";

const $ = (id) => document.getElementById(id);
const OPTIONAL = { candidates: parseInt, seed: parseInt, guidance_scale: parseFloat, temperature: parseFloat,
                   top_k: parseInt, top_p: parseFloat };

for (let i = 1; i <= 10; i++) $("n").add(new Option(String(i), String(i), i === 4, i === 4));
$("api_key").value = localStorage.getItem("dalle-ar-key") || "";

function headers(extra) {
  const h = { "Content-Type": "application/json", ...extra };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function requestId() {
  const r = crypto.getRandomValues(new Uint32Array(4));
  return "page-" + Array.from(r, (x) => x.toString(16).padStart(8, "0")).join("");
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const j = await r.json();
    if (!r.ok) {
      $("model").textContent = r.status === 401 ? "API key needed (sampling options)" : j.error.message;
      if (r.status === 401) $("more").open = true;
      return;
    }
    const m = j.data[0];
    $("model").textContent = m.size ? `model ${m.id} · ${m.size} · reranker ${m.reranker ? "CLIP" : "none"}`
                                    : `model ${m.id} (loading…)`;
    if (m.default_candidates) $("candidates").placeholder = String(m.default_candidates);
    if (!m.size) setTimeout(loadModel, 2000);
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

function body() {
  const b = { prompt: $("prompt").value, n: parseInt($("n").value, 10), response_format: "b64_json" };
  for (const [name, parse] of Object.entries(OPTIONAL)) {
    const v = $(name).value.trim();
    if (v !== "") b[name] = parse(v, 10);
  }
  if (b.candidates === undefined && b.n > 8) b.candidates = b.n;
  return b;
}

function showProgress(p, started) {
  const elapsed = ((performance.now() - started) / 1000).toFixed(1);
  if (!p) { $("status-text").textContent = `working… ${elapsed} s`; return; }
  if (p.state === "queued") {
    $("bar").removeAttribute("value");
    $("status-text").textContent = `queued, ${p.requests_ahead} request(s) ahead · ${elapsed} s`;
  } else {
    $("bar").value = p.progress;
    const eta = p.eta_seconds != null ? ` · ~${p.eta_seconds} s left` : "";
    $("status-text").textContent = `sampling ${p.candidates} candidates: ${Math.round(p.progress * 100)}%${eta} · ${elapsed} s`;
  }
}

function render(j, prompt, seconds) {
  const grid = $("grid");
  grid.replaceChildren();
  $("summary").textContent = `“${prompt}” · best ${j.data.length} of ${j.candidates} candidates · seed ${j.seed}` +
                             ` · ${j.size} · ${seconds.toFixed(1)} s`;
  $("summary").hidden = false;
  for (const item of j.data) {
    const src = "data:image/png;base64," + item.b64_json;
    const card = document.createElement("figure");
    card.className = "card";
    const img = document.createElement("img");
    img.src = src;
    img.alt = `${prompt} (rank ${item.rank + 1})`;
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${item.rank + 1}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = item.score == null ? "no score" : `score ${item.score.toFixed(2)}`;
    const link = document.createElement("a");
    link.href = src;
    link.download = `dalle-ar-seed${j.seed}-rank${item.rank + 1}.png`;
    link.textContent = "download";
    meta.append(rank, score, link);
    card.append(img, meta);
    grid.append(card);
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  localStorage.setItem("dalle-ar-key", $("api_key").value.trim());
  const id = requestId(), b = body(), started = performance.now();
  $("generate").disabled = true;
  $("status").hidden = false;
  $("bar").removeAttribute("value");
  showProgress(null, started);
  let polling = true;
  const poll = async () => {
    while (polling) {
      await new Promise((r) => setTimeout(r, 300));
      if (!polling) break;
      try {
        const r = await fetch(`v1/images/progress/${id}`, { headers: headers() });
        showProgress(r.ok ? await r.json() : null, started);
      } catch (e) { /* the generation request reports errors */ }
    }
  };
  poll();
  try {
    const r = await fetch("v1/images/generations", { method: "POST", headers: headers({ "X-Request-ID": id }),
                                                     body: JSON.stringify(b) });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : `HTTP ${r.status}`);
    render(j, b.prompt.trim(), (performance.now() - started) / 1000);
  } catch (e) {
    showError(String(e.message || e));
  } finally {
    polling = false;
    $("generate").disabled = false;
    $("status").hidden = true;
  }
}

$("form").addEventListener("submit", generate);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
loadModel();
