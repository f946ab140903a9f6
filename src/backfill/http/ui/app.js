// backfill's dashboard: a few pages over /ui/api, polled every POLL_MS, charts drawn as SVG. No dependencies.
const POLL_MS = 2000;
const main = document.getElementById("main");
let me = null;
let timer = null;

const esc = (value) =>
  String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const when = (unix) => (unix ? new Date(unix * 1000).toLocaleString() : "—");
const num = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString());

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.method === "POST") {
    headers["content-type"] = "application/json";
    if (me) headers["x-csrf-token"] = me.csrf;
  }
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 && !path.endsWith("/login")) {
    me = null;
    go("/ui/login");
    throw new Error("signed out");
  }
  if (!response.ok) throw new Error(body?.error?.message || response.statusText);
  return body;
}

function go(path) {
  if (location.pathname !== path) history.pushState({}, "", path);
  route();
}

function poll(fn) {
  clearTimeout(timer);
  const tick = async () => {
    try {
      await fn();
    } catch (err) {
      if (err.message !== "signed out") console.warn(err);
    }
    if (timer !== null) timer = setTimeout(tick, POLL_MS);
  };
  timer = 0;
  tick();
}

function stop() {
  clearTimeout(timer);
  timer = null;
}

async function route() {
  stop();
  const path = location.pathname.replace(/\/$/, "") || "/ui";
  if (path === "/ui/login") return loginPage();
  if (!me) {
    try {
      me = await api("/ui/api/session");
    } catch {
      return;
    }
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = me.admin ? `admin (${me.tenant})` : `tenant ${me.tenant}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === path);
  if (path.startsWith("/ui/batches/")) return batchPage(decodeURIComponent(path.slice("/ui/batches/".length)));
  if (path === "/ui/endpoints") return endpointsPage();
  if (path === "/ui/usage") return usagePage();
  return batchesPage();
}

function loginPage() {
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  main.innerHTML = `<form class="login" id="login">
    <h2>Sign in</h2>
    <label>API key <input type="password" id="key" autocomplete="off" placeholder="bf-…" style="width:100%"></label>
    <button type="submit">Sign in</button><p class="error" id="login-error"></p></form>`;
  document.getElementById("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      me = await api("/ui/api/login", { method: "POST", body: JSON.stringify({ key: document.getElementById("key").value }) });
      go("/ui");
    } catch (err) {
      document.getElementById("login-error").textContent = err.message;
    }
  });
}

function progressBar(b) {
  const total = Math.max(b.total, 1);
  const ok = (100 * b.completed) / total;
  const bad = (100 * b.failed) / total;
  return `<span class="bar"><i style="width:${ok}%"></i><i class="failed" style="left:${ok}%;width:${bad}%"></i></span>`;
}

function etaCell(b) {
  if (!b.eta_at) return "—";
  return `<span class="${b.late ? "late" : ""}">${when(b.eta_at)}</span>`;
}

function batchRow(b) {
  return `<tr data-id="${esc(b.id)}"><td><a href="/ui/batches/${esc(b.id)}" data-link>${esc(b.id)}</a></td>
    <td>${esc(b.api)}</td><td>${esc(b.tenant)}</td><td class="status-${esc(b.status)}">${esc(b.status)}</td>
    <td>${esc(b.model)}</td><td>${progressBar(b)} <span class="progress">${b.done} / ${b.total}</span>
    ${b.failed ? `<span class="error">(${b.failed} failed)</span>` : ""}</td>
    <td>${b.throughput_per_s ? b.throughput_per_s.toFixed(1) + "/s" : "—"}</td><td>${etaCell(b)}</td>
    <td>${when(b.expires_at)}</td><td class="schedule">${esc(b.schedule || "")}</td></tr>`;
}

function batchesPage() {
  const params = new URLSearchParams(location.search);
  const field = (name, label) =>
    `<input name="${name}" placeholder="${label}" value="${esc(params.get(name) || "")}">`;
  const statuses = ["", "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"];
  main.innerHTML = `<h2>Batches</h2><form class="filters" id="filters">
    <select name="status">${statuses.map((s) => `<option ${params.get("status") === s ? "selected" : ""} value="${s}">${s || "any status"}</option>`).join("")}</select>
    ${me.admin ? field("tenant", "tenant") : ""}${field("model", "model")}${field("metadata", "metadata key=value")}
    <button>Filter</button></form>
    <table><thead><tr><th>id</th><th>api</th><th>tenant</th><th>status</th><th>model</th><th>progress</th>
    <th>throughput</th><th>ETA</th><th>deadline</th><th>schedule</th></tr></thead><tbody id="rows"></tbody></table>
    <p class="muted"><span id="count"></span> · rendered in <span id="render-ms"></span> ms</p>`;
  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams([...new FormData(event.target)].filter(([, v]) => v));
    history.pushState({}, "", `/ui?${query}`);
    route();
  });
  poll(async () => {
    const query = new URLSearchParams([...params].filter(([, v]) => v));
    const { data } = await api(`/ui/api/batches?${query}`);
    const started = performance.now();
    document.getElementById("rows").innerHTML = data.map(batchRow).join("");
    document.getElementById("count").textContent = `${data.length} batches`;
    const ms = performance.now() - started;
    document.getElementById("render-ms").textContent = ms.toFixed(1);
    document.body.dataset.renderMs = String(ms);
  });
}

function card(label, value, id = "") {
  return `<div class="card"><span class="muted">${label}</span><b ${id ? `id="${id}"` : ""}>${value}</b></div>`;
}

function batchPage(id) {
  poll(async () => {
    let b;
    try {
      b = await api(`/ui/api/batches/${encodeURIComponent(id)}`);
    } catch (err) {
      if (err.message === "signed out") throw err;
      stop();
      main.innerHTML = `<h2>Batch</h2><p class="error" id="not-found">${esc(err.message)}</p>`;
      return;
    }
    const files = Object.entries(b.files)
      .filter(([, fileId]) => fileId)
      .map(([kind]) => `<a href="/ui/api/batches/${esc(b.id)}/files/${kind}" download>${kind} file</a>`)
      .join(" · ");
    const groups = b.error_groups
      .map((g) => `<tr><td>${esc(g.code)}</td><td>${g.count}</td><td>${g.examples.map((e) => `${esc(e.custom_id)}: ${esc(e.message)}`).join("<br>")}</td></tr>`)
      .join("");
    const lineErrors = b.errors.map((e) => `<li>line ${esc(e.line)}: ${esc(e.code)} — ${esc(e.message)}</li>`).join("");
    main.innerHTML = `<h2>${esc(b.id)} <span class="status-${esc(b.status)}" id="status">${esc(b.status)}</span></h2>
      <p class="muted">${esc(b.api)} · tenant ${esc(b.tenant)} · ${esc(b.model)} · ${esc(b.endpoint)} ·
      created ${when(b.created_at)} · deadline ${when(b.expires_at)}</p>
      <div class="cards">${card("done", `<span id="done">${b.done}</span> / ${b.total}`)}${card("completed", b.completed)}
      ${card("failed", b.failed)}${card("throughput", b.throughput_per_s ? b.throughput_per_s.toFixed(1) + "/s" : "—")}
      ${card("ETA", etaCell(b))}${card("schedule", esc(b.schedule || "—"))}
      ${card("input tokens", num(b.usage.input_tokens))}${card("output tokens", num(b.usage.output_tokens))}</div>
      <p>${progressBar(b)}</p>
      <p>${b.cancellable ? '<button id="cancel">Cancel</button>' : ""} ${b.retryable ? '<button id="retry">Retry failed lines</button>' : ""}
      <span class="error" id="action-error"></span></p>
      <p>${files || '<span class="muted">no files yet</span>'}</p>
      ${b.waiting ? `<p class="error">${esc(b.waiting)}</p>` : ""}
      ${lineErrors ? `<h3>Validation errors</h3><ul>${lineErrors}</ul>` : ""}
      ${groups ? `<h3>Errors by code</h3><table><thead><tr><th>code</th><th>lines</th><th>examples</th></tr></thead><tbody>${groups}</tbody></table>` : ""}`;
    const act = async (what) => {
      try {
        const answer = await api(`/ui/api/batches/${encodeURIComponent(b.id)}/${what}`, { method: "POST", body: "{}" });
        if (what === "retry") go(`/ui/batches/${answer.id}`);
      } catch (err) {
        document.getElementById("action-error").textContent = err.message;
      }
    };
    document.getElementById("cancel")?.addEventListener("click", () => act("cancel"));
    document.getElementById("retry")?.addEventListener("click", () => act("retry"));
  });
}

// A line chart of `series` ({label, color, values: [[t, v|null]]}) over [t0, t1].
function chart(series, t0, t1, id) {
  const W = 900, H = 200, pad = 30;
  const values = series.flatMap((s) => s.values.map(([, v]) => v)).filter((v) => v !== null);
  const top = Math.max(1, ...values) * 1.1;
  const x = (t) => pad + ((W - 2 * pad) * (t - t0)) / Math.max(1, t1 - t0);
  const y = (v) => H - pad - ((H - 2 * pad) * v) / top;
  const lines = series.map((s) => {
    const points = s.values.filter(([, v]) => v !== null).map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    if (!points.length) return "";
    const [lx, ly] = points[points.length - 1].split(",");  // the latest value, seen even when it is the only one
    return `<polyline class="series" data-series="${esc(s.label)}" fill="none" stroke="${s.color}" stroke-width="2" points="${points.join(" ")}"/>
      <circle cx="${lx}" cy="${ly}" r="3" fill="${s.color}"/>`;
  });
  const legend = series.map((s) => `<span><i style="background:${s.color}"></i>${esc(s.label)}</span>`).join("");
  return `<div class="legend">${legend}</div><svg class="chart" id="${id}" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">
    <line x1="${pad}" y1="${H - pad}" x2="${W - pad}" y2="${H - pad}" stroke="#ccc"/>
    <text x="2" y="${pad}">${top.toFixed(top < 10 ? 2 : 0)}</text><text x="2" y="${H - pad}">0</text>
    <text x="${pad}" y="${H - 8}">${new Date(t0 * 1000).toLocaleTimeString()}</text>
    <text x="${W - pad - 60}" y="${H - 8}">${new Date(t1 * 1000).toLocaleTimeString()}</text>${lines.join("")}</svg>`;
}

function endpointsPage() {
  const params = new URLSearchParams(location.search);
  const window = params.get("window") === "day" ? "day" : "hour";
  main.innerHTML = `<h2>Endpoints</h2><p><a href="/ui/endpoints?window=hour" data-link>last hour</a> ·
    <a href="/ui/endpoints?window=day" data-link>last day</a></p><div id="backends"></div>`;
  poll(async () => {
    const data = await api(`/ui/api/endpoints?window=${window}`);
    const t1 = Date.now() / 1000;
    // From the first sample on: a process that started a minute ago shows its minute across the chart.
    const first = Math.min(t1 - 60, ...Object.values(data.backends).flatMap((samples) => samples.slice(0, 1).map((s) => s.at)));
    const t0 = Math.max(t1 - (window === "day" ? 86400 : 3600), first);
    const parts = Object.entries(data.backends).map(([name, samples]) => {
      const last = samples[samples.length - 1] || {};
      const pick = (key, scale = 1) => samples.map((s) => [s.at, s[key] === null ? null : s[key] * scale]);
      const state = last.up === false ? '<span class="error">down</span>' : last.up ? '<span class="status-completed">up</span>' : "—";
      return `<section class="backend" data-backend="${esc(name)}"><h3>${esc(name)} · ${state}</h3>
        <p class="muted">now: batch lines in flight <b class="batch-in-flight">${num(last.batch_in_flight)}</b> ·
        harvest ceiling <b class="ceiling">${num(last.harvest_ceiling)}</b> · interactive in flight ${num(last.interactive_in_flight)} ·
        engine queue <b class="engine-queue">${num(last.engine_waiting)}</b></p>
        ${chart([
          { label: "batch lines in flight", color: "#2563eb", values: pick("batch_in_flight") },
          { label: "harvest ceiling", color: "#d97706", values: pick("harvest_ceiling") },
          { label: "interactive in flight", color: "#16a34a", values: pick("interactive_in_flight") },
          { label: "engine queue", color: "#7c3aed", values: pick("engine_waiting") },
        ], t0, t1, `load-${name}`)}
        ${chart([
          { label: "interactive TTFT p50 (ms)", color: "#16a34a", values: pick("ttft_p50_s", 1000) },
          { label: "interactive TTFT p99 (ms)", color: "#dc2626", values: pick("ttft_p99_s", 1000) },
          { label: "TTFT baseline (ms)", color: "#64748b", values: pick("ttft_baseline_s", 1000) },
        ], t0, t1, `ttft-${name}`)}</section>`;
    });
    document.getElementById("backends").innerHTML = parts.join("") || '<p class="muted">No backends.</p>';
  });
}

function usagePage() {
  main.innerHTML = `<h2>Usage, last 7 days</h2><div id="usage"></div>`;
  poll(async () => {
    const { usage, costs, slas } = await api("/ui/api/usage?days=7");
    const rows = usage.data.flatMap((bucket) => bucket.results.map((r) => ({ ...r, day: bucket.start_time })));
    const table = rows
      .filter((r) => r.num_model_requests)
      .map((r) => {
        const tokens = r.input_tokens + r.output_tokens;
        const harvested = r.batch && tokens ? Math.round((100 * (r.harvested_tokens + r.off_peak_tokens)) / tokens) + "%" : "—";
        return `<tr><td>${new Date(r.day * 1000).toLocaleDateString()}</td><td>${esc(r.project_id)}</td><td>${esc(r.model)}</td>
          <td>${r.batch ? "batch" : "interactive"}</td><td>${num(r.num_model_requests)}</td><td>${num(r.input_tokens)}</td>
          <td>${num(r.output_tokens)}</td><td>${harvested}</td></tr>`;
      })
      .join("");
    const cost = costs.data.flatMap((b) => b.results.map((r) => ({ ...r, day: b.start_time })))
      .filter((r) => r.amount.value)
      .map((r) => `<tr><td>${new Date(r.day * 1000).toLocaleDateString()}</td><td>${esc(r.project_id)}</td><td>${esc(r.line_item)}</td><td>${r.amount.value.toFixed(6)}</td></tr>`)
      .join("");
    const sla = slas.data.flatMap((b) => b.results.map((r) => ({ ...r, day: b.start_time })))
      .filter((r) => r.batches_ended)
      .map((r) => `<tr><td>${new Date(r.day * 1000).toLocaleDateString()}</td><td>${esc(r.project_id)}</td><td>${r.batches_ended}</td><td>${r.batches_in_window}</td></tr>`)
      .join("");
    document.getElementById("usage").innerHTML = `<h3>Tokens a day</h3>${bars(usage.data)}<table id="tokens"><thead><tr><th>day</th><th>tenant</th><th>model</th><th>kind</th>
      <th>requests</th><th>input</th><th>output</th><th>harvested</th></tr></thead><tbody>${table}</tbody></table>
      <h3>Cost (USD)</h3><table><thead><tr><th>day</th><th>tenant</th><th>line item</th><th>amount</th></tr></thead><tbody>${cost || '<tr><td colspan="4" class="muted">nothing priced: no [[prices]] in the config, or no tokens</td></tr>'}</tbody></table>
      <h3>Windows met</h3><table><thead><tr><th>day</th><th>tenant</th><th>batches ended</th><th>in window</th></tr></thead><tbody>${sla}</tbody></table>`;
  });
}

// Tokens a day as stacked bars: batch (harvested part darker) under interactive.
function bars(buckets) {
  const W = 900, H = 160, pad = 30;
  const days = buckets.map((b) => {
    const sum = (pick) => b.results.filter(pick).reduce((n, r) => n + r.input_tokens + r.output_tokens, 0);
    const harvested = b.results.filter((r) => r.batch).reduce((n, r) => n + r.harvested_tokens + r.off_peak_tokens, 0);
    return { at: b.start_time, batch: sum((r) => r.batch), interactive: sum((r) => !r.batch), harvested };
  });
  const top = Math.max(1, ...days.map((d) => d.batch + d.interactive));
  const step = (W - 2 * pad) / Math.max(1, days.length);
  const h = (v) => ((H - 2 * pad) * v) / top;
  const rects = days.map((d, i) => {
    const x = pad + i * step + 4, w = step - 8, base = H - pad;
    return `<rect x="${x}" y="${base - h(d.batch)}" width="${w}" height="${h(d.batch)}" fill="#93c5fd"/>
      <rect x="${x}" y="${base - h(d.harvested)}" width="${w}" height="${h(d.harvested)}" fill="#2563eb"/>
      <rect x="${x}" y="${base - h(d.batch) - h(d.interactive)}" width="${w}" height="${h(d.interactive)}" fill="#16a34a"/>
      <text x="${x}" y="${H - 10}">${new Date(d.at * 1000).toLocaleDateString()}</text>`;
  });
  const legend = [["#2563eb", "batch, harvested"], ["#93c5fd", "batch, other"], ["#16a34a", "interactive"]]
    .map(([color, label]) => `<span><i style="background:${color}"></i>${label}</span>`).join("");
  return `<div class="legend">${legend}</div><svg class="chart" id="usage-chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">
    <text x="2" y="${pad}">${num(top)}</text>${rects.join("")}</svg>`;
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (!link || event.metaKey || event.ctrlKey) return;
  event.preventDefault();
  history.pushState({}, "", link.getAttribute("href"));
  route();
});
document.getElementById("logout").addEventListener("click", async () => {
  await api("/ui/api/logout", { method: "POST", body: "{}" });
  me = null;
  go("/ui/login");
});
window.addEventListener("popstate", route);
route();
