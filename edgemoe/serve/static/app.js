// The chat page and its live panel. Plain JavaScript, no build step, nothing from a CDN.
// Chat: POST /v1/chat/completions with stream: true (server-sent events). Panel: GET /api/panel
// once a second (twice while a reply streams).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let modelName = null;
let busy = false;
let apiKey = localStorage.getItem("edgemoe-api-key") || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  return h;
}

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n.toFixed(0)) + " " + units[i];
}

function needKey() {
  const box = $("api-key");
  box.hidden = false;
  box.focus();
}
$("api-key").addEventListener("change", (e) => {
  apiKey = e.target.value.trim();
  localStorage.setItem("edgemoe-api-key", apiKey);
  refresh();
});

// ---- the panel
const SEGMENTS = [
  ["floor", "process floor", "--floor"],
  ["resident", "resident weights", "--resident"],
  ["kv_cache", "KV cache", "--kv"],
  ["io_buffers", "I/O buffers", "--io"],
  ["workspace", "workspace", "--work"],
  ["expert_cache", "expert cache", "--cache"],
];

function drawGauge(p) {
  const g = $("gauge");
  const plan = p.plan;
  const planned = SEGMENTS.reduce((s, [k]) => s + plan[k], 0);
  const total = p.budget || planned;
  g.innerHTML = "";
  const legend = [];
  for (const [key, label, color] of SEGMENTS) {
    const d = document.createElement("div");
    d.style.width = (100 * plan[key] / total).toFixed(2) + "%";
    d.style.background = `var(${color})`;
    let detail = fmtBytes(plan[key]);
    if (key === "kv_cache") detail = `${fmtBytes(p.kv_used)} used of ${fmtBytes(plan[key])}`;
    if (key === "expert_cache") detail = `${fmtBytes(p.expert_cache_used)} used of ${fmtBytes(plan[key])}`;
    d.title = `${label}: ${detail}`;
    d.dataset.part = key;
    g.appendChild(d);
    legend.push(`<span><span class="swatch" style="background:var(${color})"></span>${label} ${detail}</span>`);
  }
  const rss = document.createElement("div");
  rss.className = "rss";
  rss.style.left = Math.min(100, 100 * p.rss / total).toFixed(2) + "%";
  rss.title = "resident set now: " + fmtBytes(p.rss);
  g.appendChild(rss);
  $("gauge-legend").innerHTML = legend.join("");
  $("budget-text").textContent = p.budget ? fmtBytes(p.budget) : "unlimited";
  $("rss-text").textContent =
    `resident set now ${fmtBytes(p.rss)} (red line)` +
    (p.budget ? `, ${(100 * p.rss / p.budget).toFixed(0)}% of the budget` : "") +
    ` · ${p.kv_kept_tokens} tokens of earlier turns kept in idle KV slots`;
}

function drawHeatmap(p) {
  const c = $("heatmap");
  const rows = p.layers.length, cols = p.experts;
  const pad = 28, cell = Math.max(6, Math.min(20, Math.floor((c.width - pad) / cols)));
  c.height = Math.max(40, rows * cell + 18);
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const css = getComputedStyle(document.documentElement);
  let cachedN = 0;
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillStyle = "#6b7385";
  for (let r = 0; r < rows; r++) {
    ctx.fillStyle = "#6b7385";
    ctx.fillText("L" + p.layers[r], 2, 12 + r * cell + cell / 2 - 2);
    for (let e = 0; e < cols; e++) {
      const level = p.cached[r][e], age = p.age[r][e];
      const x = pad + e * cell, y = 4 + r * cell;
      if (level > 0) {
        cachedN++;
        const shade = 0.35 + 0.65 * level / Math.max(1, p.levels);
        ctx.fillStyle = `rgba(109, 75, 176, ${shade})`;
      } else {
        ctx.fillStyle = css.getPropertyValue("--empty");
      }
      ctx.fillRect(x, y, cell - 2, cell - 2);
      if (age >= 0 && age < 16) { // recent use: an orange mark fading over 16 steps
        ctx.fillStyle = `rgba(242, 163, 58, ${1 - age / 16})`;
        ctx.fillRect(x + (cell - 2) / 4, y + (cell - 2) / 4, (cell - 2) / 2, (cell - 2) / 2);
      }
    }
  }
  ctx.fillStyle = "#6b7385";
  ctx.fillText("experts 0…" + (cols - 1) + " →", pad, c.height - 3);
  c.dataset.signature = JSON.stringify([p.cached, p.age.map((r) => r.map((a) => (a >= 0 && a < 16 ? 1 : 0)))]);
  c.dataset.cached = cachedN;
  c.dataset.step = p.step;
  $("cache-text").textContent =
    `${cachedN} of ${rows * cols} experts · ${fmtBytes(p.expert_cache_used)} of ${fmtBytes(p.expert_cache_capacity)}`;
}

function drawSeries(canvas, points, fmt, max) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const pts = points.filter((v) => v.y != null);
  if (!pts.length) {
    ctx.fillStyle = "#6b7385";
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText("no tokens yet", 8, h / 2);
    return;
  }
  const now = Math.floor(Date.now() / 1000);
  const span = Math.min(120, Math.max(20, now - pts[0].t + 4)); // seconds shown: grows to 2 min
  const top = max || Math.max(...pts.map((v) => v.y)) * 1.15 || 1;
  ctx.strokeStyle = "#dde1e8";
  ctx.beginPath(); ctx.moveTo(0, h - 14); ctx.lineTo(w, h - 14); ctx.stroke();
  ctx.strokeStyle = "#2f6fde"; ctx.fillStyle = "#2f6fde"; ctx.lineWidth = 2;
  ctx.beginPath();
  pts.forEach((v, i) => {
    const x = w - (now - v.t) / span * w, y = (h - 16) - (v.y / top) * (h - 22);
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
  pts.forEach((v) => {
    const x = w - (now - v.t) / span * w, y = (h - 16) - (v.y / top) * (h - 22);
    ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
  });
  ctx.fillStyle = "#6b7385"; ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(fmt(top), 4, 10);
  const label = span >= 120 ? "last 2 minutes" : `last ${span} s`;
  ctx.fillText(label, w - ctx.measureText(label).width - 4, h - 3);
}

async function refresh() {
  let p;
  try {
    const r = await fetch("/api/panel", { headers: headers() });
    if (r.status === 401) { needKey(); setState("key needed"); return; }
    p = await r.json();
  } catch (e) {
    setState("down");
    return;
  }
  setState(p.state);
  modelName = p.model;
  $("model").textContent = `${p.model} · ctx ${p.ctx ?? "…"} · max batch ${p.max_batch}`;
  if (!p.plan) return;
  drawGauge(p);
  drawHeatmap(p);
  const s = p.series;
  drawSeries($("hits"), s.map((b) => ({ t: b.t, y: b.hit_rate })), (v) => (100 * v).toFixed(0) + "%", 1);
  drawSeries($("bytes"), s.map((b) => ({ t: b.t, y: b.bytes_per_token })), fmtBytes);
  const t = p.totals;
  $("hit-text").textContent = `${(100 * t.hit_rate).toFixed(1)}% overall`;
  $("bytes-text").textContent = `${fmtBytes(t.bytes_read)} in all`;
  $("requests-text").textContent =
    `requests: ${p.running} running, ${p.waiting} waiting, ${p.served} served · step ${p.step}`;
}

function setState(s) {
  const el = $("state");
  el.textContent = s;
  el.className = "pill " + String(s).split(" ")[0];
}

let timer = null;
function schedule() {
  clearTimeout(timer);
  timer = setTimeout(async () => { await refresh(); schedule(); }, busy ? 500 : 1000);
}

// ---- the chat
function bubble(role, text) {
  const d = document.createElement("div");
  d.className = "msg " + role;
  d.textContent = text;
  $("messages").appendChild(d);
  $("messages").scrollTop = $("messages").scrollHeight;
  return d;
}

async function send(text) {
  busy = true;
  $("send").disabled = true;
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.done = "false";
  const started = performance.now();
  let first = null, reply = "", usage = null, finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: modelName || undefined,
        messages: history,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value) || 96,
        temperature: Number($("temperature").value),
      }),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      if (r.status === 401) needKey();
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          const piece = (c.delta && c.delta.content) || "";
          if (piece && first == null) first = performance.now();
          reply += piece;
          if (c.finish_reason) finish = c.finish_reason;
        }
        out.textContent = reply.trim();
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    history.push({ role: "assistant", content: reply });
    const secs = (performance.now() - started) / 1000;
    const meta = document.createElement("span");
    meta.className = "meta";
    const ttft = first == null ? "–" : ((first - started) / 1000).toFixed(2) + " s";
    if (usage) {
      const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
      meta.textContent =
        `${usage.completion_tokens} tokens · first after ${ttft} · ` +
        `${(usage.completion_tokens / secs).toFixed(1)} tok/s · prompt ${usage.prompt_tokens} tokens` +
        (cached ? `, ${cached} reused from the last turn` : "") + ` · ${finish}`;
    }
    out.appendChild(meta);
  } catch (e) {
    out.className = "msg error";
    out.textContent = "error: " + e.message;
    history.pop();
  } finally {
    out.dataset.done = "true";
    busy = false;
    $("send").disabled = false;
    refresh();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("messages").innerHTML = "";
});

refresh().then(schedule);
