// queueformer batch dashboard: plain browser JavaScript, no build step, no third-party code.
// It calls the public API like any client: the key stays in this tab's sessionStorage and goes out
// as "Authorization: Bearer"; with auth off the API answers without one.
"use strict";

(() => {
  const KEY = "queueformer.apiKey";
  const POLL_MS = 2000;
  const ERROR_ROWS = 200;
  const COLORS = ["#1f6feb", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"];
  const SVG = "http://www.w3.org/2000/svg";
  const ENDED = ["completed", "failed", "expired", "cancelled"];

  const $ = (id) => document.getElementById(id);

  let apiKey = sessionStorage.getItem(KEY) || "";
  let round = 0; // bumped on every (re)connect and sign-out: stale polling loops stop themselves
  let selected = null; // batch whose line errors are shown
  let errorsAt = -1; // its failed count when they were last fetched
  let skew = 0; // server clock minus browser clock, seconds

  class AuthError extends Error {}

  async function api(path, asText = false) {
    const headers = { Accept: "application/json" };
    if (apiKey) headers.Authorization = "Bearer " + apiKey;
    // Relative to /ui/: the API may sit behind a proxy that mounts it on a path.
    const resp = await fetch(new URL("../" + path, location.href), { headers, cache: "no-store" });
    if (resp.status === 401) {
      let message = "the API key was rejected";
      try {
        message = (await resp.json()).error.message || message;
      } catch (_) {
        /* not the API's error shape: keep the generic message */
      }
      throw new AuthError(message);
    }
    if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
    return asText ? resp.text() : resp.json();
  }

  // --- helpers ---------------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function svg(tag, attrs = {}, text = null) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== null) node.textContent = text;
    return node;
  }

  const now = () => Date.now() / 1000 + skew;

  function num(v, digits = 1) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (v >= 1000) return Math.round(v).toLocaleString("en-US");
    return v.toFixed(v >= 100 ? 0 : digits);
  }

  function ago(t) {
    if (!t) return "–";
    const s = Math.max(0, now() - t);
    if (s < 60) return `${Math.floor(s)}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
    return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ");
  }

  function color(name) {
    let h = 0;
    for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    return COLORS[h % COLORS.length];
  }

  const badge = (status) => el("span", { class: `badge ${status}`, text: status.replace("_", " ") });

  function fill(tableId, rows, emptyId) {
    $(tableId).tBodies[0].replaceChildren(...rows);
    if (emptyId) $(emptyId).hidden = rows.length > 0;
  }

  // --- batches ---------------------------------------------------------------------------------

  function batchRates(b) {
    const c = b.request_counts;
    if (!b.in_progress_at) return [null, null];
    const end = b.finalizing_at || b.completed_at || b.cancelled_at || b.expired_at || b.failed_at || now();
    const elapsed = Math.max(1, end - b.in_progress_at); // timestamps are whole seconds
    return [(c.completed + c.failed) / elapsed, (b.usage ? b.usage.output_tokens : 0) / elapsed];
  }

  function progress(b) {
    const c = b.request_counts;
    const done = c.completed + c.failed;
    const pct = c.total ? Math.floor((100 * done) / c.total) : 0;
    const bar = el("div", {
      class: "progress",
      role: "progressbar",
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": String(pct),
      "aria-label": `progress of ${b.id}`,
    });
    const ok = el("div", { class: "fill" });
    ok.style.width = `${c.total ? (100 * c.completed) / c.total : 0}%`;
    const bad = el("div", { class: "fill failed-part" });
    bad.style.width = `${c.total ? (100 * c.failed) / c.total : 0}%`;
    bar.append(ok, bad, el("span", { class: "text", text: `${pct} % · ${done}/${c.total}` }));
    return bar;
  }

  function batchRow(b) {
    const [lines, tokens] = batchRates(b);
    const row = el(
      "tr",
      { "data-batch-id": b.id, "data-status": b.status, title: "show this batch's line errors" },
      el("td", { class: "mono", text: b.id }),
      el("td", {}, badge(b.status)),
      el("td", {}, progress(b)),
      el("td", { class: "failed", text: String(b.request_counts.failed) }),
      el("td", { class: "lines-per-s", text: num(lines) }),
      el("td", { class: "tokens-per-s", text: num(tokens) }),
      el("td", { text: ago(b.created_at) }),
    );
    if (b.id === selected) row.classList.add("selected");
    row.addEventListener("click", () => select(b.id));
    return row;
  }

  function lineError(o) {
    if (o.error) return [o.custom_id, "–", o.error.code, o.error.message];
    const r = o.response || {};
    const e = (r.body && r.body.error) || {};
    return [o.custom_id, String(r.status_code ?? "–"), e.code || e.type || "–", e.message || JSON.stringify(r.body)];
  }

  async function showErrors(batch) {
    if (!batch) {
      $("batch-detail").hidden = true;
      return;
    }
    $("batch-detail").hidden = false;
    $("detail-id").textContent = batch.id;
    if (batch.request_counts.failed === errorsAt) return; // nothing new failed since the last fetch
    const text = await api(`v1/batches/${encodeURIComponent(batch.id)}/output?errors=true`, true);
    if (batch.id !== selected) return;
    errorsAt = batch.request_counts.failed;
    const lines = text.split("\n").filter((l) => l.trim());
    const rows = lines.slice(0, ERROR_ROWS).map((l) => {
      const cells = lineError(JSON.parse(l));
      return el("tr", { class: "line-error" }, ...cells.map((c, i) => el("td", { class: i < 3 ? "mono" : "", text: c })));
    });
    fill("batch-errors", rows, "errors-empty");
    $("detail-count").textContent =
      lines.length > ERROR_ROWS ? `(first ${ERROR_ROWS} of ${lines.length})` : `(${lines.length} failed)`;
  }

  let lastBatches = [];

  function select(id) {
    selected = id;
    errorsAt = -1;
    for (const row of $("batches").tBodies[0].rows) row.classList.toggle("selected", row.dataset.batchId === id);
    showErrors(lastBatches.find((b) => b.id === id)).catch(problem);
  }

  // --- models, queues, jobs, tiles ------------------------------------------------------------------

  function workerChip(w) {
    const mem = w.memory_bytes ? ` · ${(w.memory_bytes / 2 ** 20).toFixed(0)} MiB` : "";
    const detail = `${w.dtype || ""} ${JSON.stringify(w.device_map || {})}${mem}`;
    return el("span", { class: `worker ${w.ready ? "ready" : "starting"}`, title: detail, text: w.worker });
  }

  function renderModels(models, summary) {
    const stats = Object.fromEntries(summary.models.map((m) => [m.model, m]));
    fill(
      "models",
      models.map((m) => {
        const s = stats[m.id] || {};
        const workers = m.workers.length ? m.workers.map(workerChip) : [el("span", { class: "muted", text: "none" })];
        return el(
          "tr",
          { "data-model": m.id, "data-workers": String(m.workers.length) },
          el("td", { class: "mono", text: m.id }),
          el("td", { text: m.task }),
          el("td", { class: "mono", text: m.queue }),
          el("td", { class: "workers" }, ...workers),
          el("td", { text: num(s.tokens_per_s) }),
          el("td", { text: num(s.lines_per_s) }),
        );
      }),
    );
  }

  function renderQueues(summary) {
    fill(
      "queues",
      summary.queues.map((q) =>
        el(
          "tr",
          { "data-queue": q.queue, "data-depth": String(q.depth) },
          el("td", { class: "mono", text: q.queue }),
          el("td", { class: "depth", text: String(q.depth) }),
          el("td", { text: String(q.workers) }),
          el("td", { class: "mono", text: q.models.join(", ") || "–" }),
        ),
      ),
    );
  }

  function renderJobs(jobs) {
    fill(
      "jobs",
      jobs.map((j) =>
        el(
          "tr",
          { "data-job-id": j.id, "data-state": j.state },
          el("td", { class: "mono", text: j.id }),
          el("td", { text: j.task }),
          el("td", { class: "mono", text: j.model }),
          el("td", {}, badge(j.state)),
          el("td", { text: ago(j.created_at) }),
          el("td", { text: j.started_at && j.finished_at ? `${(j.finished_at - j.started_at).toFixed(2)} s` : "–" }),
          el("td", { class: "error", text: j.error ? `${j.error.code}: ${j.error.message}` : "" }),
        ),
      ),
      "jobs-empty",
    );
  }

  function renderTiles(summary) {
    $("tile-tokens").textContent = num(summary.models.reduce((a, m) => a + m.tokens_per_s, 0));
    $("tile-queued").textContent = String(summary.queues.reduce((a, q) => a + q.depth, 0));
    $("tile-workers").textContent = String(summary.workers);
    $("tile-batches").textContent = String(summary.batches.open);
    $("tenant").textContent = `tenant: ${summary.tenant}`;
  }

  // --- plots -----------------------------------------------------------------------------------

  // The top of a 4-step axis whose steps are round numbers (1, 2, 2.5 or 5 times a power of ten).
  function niceTop(v) {
    const step = Math.max(v, 1e-9) / 4;
    const p = 10 ** Math.floor(Math.log10(step));
    const m = [1, 2, 2.5, 5, 10].find((k) => k * p >= step);
    return Math.max(4 * m * p, 1);
  }

  // Draw series {name: [[t, v], ...]} between `since` and `until` as lines with a dot per sample.
  function plot(id, legendId, series, since, until, unit) {
    const chart = $(id);
    const W = chart.clientWidth || 600;
    const H = chart.clientHeight || 220;
    chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const pad = { l: 46, r: 12, t: 10, b: 22 };
    let names = Object.keys(series).filter((n) => series[n].length);
    const active = names.filter((n) => series[n].some((p) => p[1] > 0));
    if (active.length) names = active; // idle series all sit on zero; show them only when nothing moves
    names.sort();
    const top = niceTop(Math.max(0, ...names.flatMap((n) => series[n].map((p) => p[1]))));
    const x = (t) => pad.l + ((t - since) / Math.max(1, until - since)) * (W - pad.l - pad.r);
    const y = (v) => H - pad.b - (v / top) * (H - pad.t - pad.b);
    const nodes = [];
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4;
      nodes.push(svg("line", { class: "grid", x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v) }));
      nodes.push(svg("text", { class: "axis", x: pad.l - 6, y: y(v) + 4, "text-anchor": "end" }, num(v, v < 10 ? 1 : 0)));
    }
    const minutes = Math.round((until - since) / 60);
    for (let i = 0; i <= 4; i++) {
      const t = since + ((until - since) * i) / 4;
      const label = i === 4 ? "now" : `-${Math.round(minutes - (minutes * i) / 4)}m`;
      nodes.push(svg("text", { class: "axis", x: x(t), y: H - 6, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, label));
    }
    for (const name of names) {
      const c = color(name);
      const pts = series[name].filter((p) => p[0] >= since);
      nodes.push(svg("polyline", { stroke: c, points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }));
      for (const [t, v] of pts) {
        const dot = svg("circle", { class: "pt", cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2.5, fill: c, "data-series": name, "data-t": t, "data-v": v });
        dot.append(svg("title", {}, `${name}: ${num(v, 2)} ${unit} at ${new Date(t * 1000).toLocaleTimeString()}`));
        nodes.push(dot);
      }
    }
    if (!names.length) nodes.push(svg("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, "no samples yet"));
    chart.replaceChildren(...nodes);
    $(legendId).replaceChildren(
      ...names.map((n) => {
        const sw = el("span", { class: "swatch" });
        sw.style.background = color(n);
        return el("span", { class: "mono" }, sw, n);
      }),
    );
  }

  async function refreshHistory() {
    const h = await api("v1/dashboard/history?minutes=60");
    plot("plot-tokens", "legend-tokens", h.tokens_per_s, h.since, h.time, "tokens/s");
    plot("plot-queues", "legend-queues", h.queue_depth, h.since, h.time, "messages");
  }

  // --- polling and sign-in -------------------------------------------------------------------------

  let lastHistory = 0;

  async function refresh(summary) {
    const [batches, jobs, models] = await Promise.all([api("v1/batches?limit=20"), api("v1/jobs?limit=20"), api("v1/models")]);
    skew = summary.time - Date.now() / 1000;
    lastBatches = batches.data;
    renderTiles(summary);
    fill("batches", batches.data.map(batchRow), "batches-empty");
    renderModels(models.data, summary);
    renderQueues(summary);
    renderJobs(jobs.data);
    // History is sampled every history_interval_s; asking more often would only redraw the same points.
    const every = Math.min(10, Math.max(1, summary.history_interval_s || 10)) * 1000;
    if (Date.now() - lastHistory >= every) {
      lastHistory = Date.now();
      await refreshHistory();
    }
    if (selected) await showErrors(lastBatches.find((b) => b.id === selected));
  }

  function setLive(ok, text) {
    $("live").className = `live ${ok ? "ok" : "down"}`;
    $("live").textContent = text;
  }

  function problem(err) {
    if (err instanceof AuthError) {
      signOut(`The API key was rejected: ${err.message}`);
      return;
    }
    setLive(false, "API unreachable, retrying");
    $("fetch-error").hidden = false;
    $("fetch-error").textContent = String(err.message || err);
  }

  async function poll(mine, summary) {
    while (mine === round) {
      try {
        await refresh(summary || (await api("v1/dashboard")));
        if (mine !== round) return;
        setLive(true, `updated ${new Date().toLocaleTimeString()}`);
        $("fetch-error").hidden = true;
        document.body.dataset.ready = "1";
      } catch (err) {
        if (mine !== round) return;
        problem(err);
        if (err instanceof AuthError) return;
      }
      summary = null;
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }

  function showLogin(message) {
    round++;
    $("dashboard").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("key-error").hidden = !message;
    $("key-error").textContent = message || "";
    $("live").className = "live";
    $("live").textContent = "signed out";
    $("key-input").value = "";
    $("key-input").focus();
  }

  function signOut(message) {
    apiKey = "";
    sessionStorage.removeItem(KEY);
    showLogin(message);
  }

  async function connect(key) {
    apiKey = key;
    const mine = ++round;
    try {
      const summary = await api("v1/dashboard");
      if (mine !== round) return;
      if (key) sessionStorage.setItem(KEY, key);
      $("login").hidden = true;
      $("dashboard").hidden = false;
      $("sign-out").hidden = !key; // with auth off there is nothing to sign out of
      lastHistory = 0;
      poll(mine, summary);
    } catch (err) {
      if (mine !== round) return;
      if (err instanceof AuthError) {
        // No key yet: just ask for one. A key that was given: say it was refused.
        signOut(key ? `The API key was rejected: ${err.message}` : "");
      } else {
        setLive(false, "API unreachable, retrying");
        setTimeout(() => mine === round && connect(key), POLL_MS);
      }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key-input").value.trim();
      if (key) connect(key);
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    connect(apiKey);
  });
})();
