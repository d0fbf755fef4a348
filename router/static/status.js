// SplitServe status page: polls /status.json, draws the worker table and TTFT/TPOT charts,
// and calls the admin API (bearer token pasted by the operator) to drain workers or switch roles.
"use strict";

const POLL_MS = 1000;
const ROLES = ["prefill", "decode", "both"];

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function setMessage(text, ok) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = ok ? "ok" : "bad";
}

async function admin(method, path, body) {
  const token = document.getElementById("token").value.trim();
  if (!token) { setMessage("paste the admin token first", false); return; }
  const opts = { method, headers: { "Authorization": "Bearer " + token } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  try {
    const r = await fetch(path, opts);
    const data = await r.json();
    if (r.ok) setMessage(method + " " + path + ": ok", true);
    else setMessage(method + " " + path + ": " + r.status + " " + (data.error ? data.error.message : ""), false);
  } catch (err) {
    setMessage(method + " " + path + ": " + err, false);
  }
  poll();
}

function kvCell(w) {
  const td = el("td");
  const frac = w.kv_pages_total ? w.kv_pages_used / w.kv_pages_total : 0;
  const bar = el("span", { class: "bar" });
  bar.appendChild(el("i", { style: "width:" + Math.round(frac * 100) + "%" }));
  td.appendChild(bar);
  td.appendChild(document.createTextNode(" " + w.kv_pages_used + " / " + w.kv_pages_total));
  return td;
}

function actionsCell(w) {
  const td = el("td");
  const id = encodeURIComponent(w.worker_id);
  const drain = el("button", { "data-action": "drain", "data-worker": w.worker_id }, "drain");
  drain.disabled = w.draining;
  drain.onclick = () => admin("POST", "/admin/workers/" + id + "/drain");
  td.appendChild(drain);
  for (const role of ROLES) {
    if (role === w.role) continue;
    const b = el("button", { "data-action": "role-" + role, "data-worker": w.worker_id }, "→ " + role);
    b.onclick = () => admin("POST", "/admin/workers/" + id + "/role", { role });
    td.appendChild(b);
  }
  return td;
}

function workerRow(w) {
  const tr = el("tr", { "data-worker": w.worker_id });
  tr.appendChild(el("td", { class: "id" }, w.worker_id));
  tr.appendChild(el("td", { class: "role" }, w.role));
  const health = w.draining ? "draining" : (w.healthy ? "healthy" : "down");
  tr.appendChild(el("td", { class: w.healthy && !w.draining ? "ok" : "bad" }, health));
  for (const k of ["inflight", "running", "waiting", "queued_tokens"]) tr.appendChild(el("td", {}, String(w[k])));
  tr.appendChild(kvCell(w));
  tr.appendChild(el("td", {}, String(w.kv_pages_cached)));
  tr.appendChild(actionsCell(w));
  return tr;
}

function drawChart(id, title, points) {
  const c = document.getElementById(id);
  const g = c.getContext("2d");
  const W = c.width, H = c.height, L = 50, B = 20, T = 22;
  g.clearRect(0, 0, W, H);
  g.fillStyle = "#222";
  g.font = "12px sans-serif";
  g.fillText(title, L, 14);
  g.strokeStyle = "#999";
  g.strokeRect(L, T, W - L - 10, H - T - B);
  if (points.length === 0) { g.fillText("no data yet", L + 10, T + 20); return; }
  const t0 = points[0][0], t1 = Math.max(points[points.length - 1][0], t0 + 1);
  const vmax = Math.max(...points.map(p => p[1])) * 1.1 || 1;
  g.fillText((vmax * 1000).toPrecision(3) + " ms", 2, T + 10);
  g.fillText("0", 2, H - B);
  g.strokeStyle = g.fillStyle = "#3a78c2";
  g.beginPath();
  points.forEach((p, i) => {
    const x = L + (p[0] - t0) / (t1 - t0) * (W - L - 10);
    const y = H - B - p[1] / vmax * (H - T - B);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    g.fillRect(x - 2, y - 2, 5, 5);
  });
  g.stroke();
}

function render(s) {
  document.getElementById("model").textContent = s.model;
  const h = document.getElementById("health");
  h.textContent = s.healthy ? "healthy" : "unavailable";
  h.className = s.healthy ? "ok" : "bad";
  document.getElementById("inflight").textContent = s.inflight;
  document.getElementById("maxq").textContent = s.max_queued_requests;
  document.getElementById("policies").textContent = "prefill " + s.policies.prefill + ", decode " + s.policies.decode;
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...s.workers.map(workerRow));
  const series = k => s.history.filter(p => p[k] !== null).map(p => [p.t, p[k]]);
  drawChart("ttft", "TTFT (time to first token)", series("ttft"));
  drawChart("tpot", "TPOT (time per output token)", series("tpot"));
  document.body.setAttribute("data-loaded", "1");
}

async function poll() {
  try {
    const r = await fetch("/status.json");
    render(await r.json());
  } catch (err) {
    setMessage("cannot reach the router: " + err, false);
  }
}

poll();
setInterval(poll, POLL_MS);
