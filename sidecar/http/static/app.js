// rankside's page: the workers of a node (or of the job), their actions, events and dumps.
//
// Every string that comes from the API (host names, roles, handler names,
// exception messages, handler output) is put into the page with textContent or
// as a Text node, never parsed as HTML: workers control those strings. The
// Content-Security-Policy the sidecar sends is the second line of defence.
"use strict";

const TOKEN_KEY = "rankside.token";
const REFRESH_MS = 2000;
const DUMPS_REFRESH_MS = 5000;
const MAX_EVENTS = 100;
const STREAM_RETRY_MS = 2000;

// The one-click actions of a worker row; any other handler is in its "more" menu.
const ACTIONS = [
  { label: "Stacks", handler: "dump_traceback", title: "Python stacks of every thread" },
  { label: "py-spy", handler: "pyspy_dump", title: "py-spy dump: stacks read from outside" },
  {
    label: "Profile 5 s",
    handler: "py_profile",
    params: { duration: "5" },
    title: "sample every thread for 5 seconds",
  },
];
const LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"];
const EVENT_CLASSES = {
  worker_stalled: "bad",
  dump_failed: "bad",
  worker_exited: "warn",
  worker_disconnected: "warn",
  handler_failed: "warn",
  frame_rejected: "warn",
  worker_restarted: "warn",
  worker_resumed: "good",
  worker_connected: "quiet",
};

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  job: false,
  booted: false,
  streaming: false,
  needToken: false,
  workers: [],
  nodes: [],
  serverTime: null,
  fetchedAt: 0,
  events: [],
  lastEventId: null,
  rows: new Map(), // row id -> {tr, cells, resultRow, handlers}
  results: new Map(), // row id -> the last action's result, shown under the row
};

const $ = (id) => document.getElementById(id);

// -- building elements (textContent only) --------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function setText(node, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

// -- formatting -----------------------------------------------------------------------

function formatBytes(bytes) {
  if (typeof bytes !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function formatRate(rate) {
  if (typeof rate !== "number") return "–";
  if (rate >= 100) return rate.toFixed(0);
  if (rate >= 10) return rate.toFixed(1);
  return rate.toFixed(2);
}

function formatAge(seconds) {
  if (typeof seconds !== "number") return "–";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function formatTime(unixSeconds) {
  if (typeof unixSeconds !== "number") return "";
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function rankLabel(worker) {
  return worker.rank === null || worker.rank === undefined ? worker.key : String(worker.rank);
}

function nodeHost(url) {
  try {
    return new URL(url).host;
  } catch {
    return url;
  }
}

// What state a worker is in, for the eye: stalled and down ones sort first.
function condition(worker) {
  if (worker.stalled) {
    return { label: "stalled", cls: "bad", order: 0, detail: worker.stall_reason };
  }
  if (worker.state === "disconnected") {
    return { label: "disconnected", cls: "bad", order: 1, detail: "connection lost" };
  }
  if (worker.state === "exited") {
    const exit = worker.exit || {};
    if (exit.reason === "exception") {
      return {
        label: "failed",
        cls: "bad",
        order: 1,
        detail: `${exit.exc_type || "exception"}: ${exit.exc_message || ""}`,
      };
    }
    if (exit.exit_code) {
      return { label: "failed", cls: "bad", order: 1, detail: `exit code ${exit.exit_code}` };
    }
    return { label: "exited", cls: "quiet", order: 3, detail: null };
  }
  return { label: "running", cls: "good", order: 2, detail: null };
}

function progressAge(worker) {
  const elapsed = Date.now() / 1000 - state.fetchedAt;
  if (typeof worker.progress_age === "number") return worker.progress_age + elapsed;
  if (typeof worker.progress_time !== "number" || state.serverTime === null) return null;
  return Math.max(0, state.serverTime - worker.progress_time) + elapsed;
}

function rowId(worker) {
  return state.job ? `${worker.node}|${worker.key}` : worker.key;
}

// -- talking to the sidecar --------------------------------------------------------------

class AuthNeeded extends Error {}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) {
    const challenge = response.headers.get("www-authenticate") || "";
    askForToken(challenge.includes("invalid_token"));
    throw new AuthNeeded("token needed");
  }
  return response;
}

async function errorText(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (typeof body.error === "string") return body.error;
  } catch {
    // not JSON: the text itself says it
  }
  return text.slice(0, 500) || `HTTP ${response.status}`;
}

async function apiJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

function showError(message) {
  const box = $("error");
  setText(box, message);
  box.hidden = !message;
}

// -- token ------------------------------------------------------------------------------

function askForToken(refused) {
  state.needToken = true;
  setText(
    $("token-prompt"),
    refused
      ? "The sidecar refused this token. Paste the right one:"
      : "This sidecar requires a token (its --token-file). Paste it here:"
  );
  $("token-form").hidden = false;
  setLive("token needed", "bad");
  $("token-input").focus();
}

function useToken(event) {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  state.token = value;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-input").value = "";
  $("token-form").hidden = true;
  state.needToken = false;
  $("forget-token").hidden = false;
  boot();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  $("forget-token").hidden = true;
  location.reload();
}

function setLive(text, cls) {
  const live = $("live");
  setText(live, text);
  live.className = `live ${cls}`;
}

// -- workers ----------------------------------------------------------------------------

async function refreshWorkers() {
  try {
    const data = await apiJson(state.job ? "/api/v1/job/workers" : "/api/v1/workers");
    state.workers = data.workers || [];
    state.nodes = data.nodes || [];
    state.serverTime = typeof data.time === "number" ? data.time : null;
    state.fetchedAt = Date.now() / 1000;
    showError("");
    renderWorkers();
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError(`Cannot load the workers: ${error.message}`);
  }
}

function sortedWorkers() {
  return state.workers
    .map((worker, index) => ({ worker, index, cond: condition(worker) }))
    .sort((a, b) => a.cond.order - b.cond.order || a.index - b.index);
}

function renderWorkers() {
  const body = $("workers").tBodies[0];
  const seen = new Set();
  const ordered = [];
  for (const { worker, cond } of sortedWorkers()) {
    const id = rowId(worker);
    seen.add(id);
    let row = state.rows.get(id);
    if (!row) {
      row = buildRow(id);
      state.rows.set(id, row);
    }
    updateRow(row, worker, cond);
    ordered.push(row.tr, row.resultRow);
  }
  for (const [id, row] of state.rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      row.resultRow.remove();
      state.rows.delete(id);
    }
  }
  // Re-append only when the order changed: moving rows would close an open menu.
  const current = Array.from(body.children);
  if (current.length !== ordered.length || current.some((node, i) => node !== ordered[i])) {
    body.append(...ordered);
  }
  $("empty").hidden = state.workers.length > 0;
  renderNodes();
  renderBanner();
}

function buildRow(id) {
  const cells = {
    rank: el("td", { class: "num rank" }),
    host: el("td", { class: "host" }),
    state: el("td", { class: "state" }),
    step: el("td", { class: "num" }),
    rate: el("td", { class: "num" }),
    age: el("td", { class: "num" }),
    restarts: el("td", { class: "num" }),
    memory: el("td", { class: "num" }),
    actions: el("td", { class: "actions" }),
  };
  const tr = el("tr", { class: "worker" }, ...Object.values(cells));
  const resultCell = el("td", { colspan: "9" });
  const resultRow = el("tr", { class: "result-row" }, resultCell);
  resultRow.hidden = true;
  const row = { id, tr, cells, resultRow, resultCell, worker: null, handlers: null };
  buildActions(row);
  return row;
}

function buildActions(row) {
  const buttons = ACTIONS.map((action) =>
    el("button", {
      type: "button",
      text: action.label,
      title: action.title,
      "data-handler": action.handler,
      onclick: () => runAction(row, action.handler, action.params || {}, action.label),
    })
  );
  const level = el(
    "select",
    { title: "set the root logger's level", "data-handler": "set_log_level" },
    el("option", { value: "", text: "log level…" }),
    ...LOG_LEVELS.map((name) => el("option", { value: name, text: name }))
  );
  level.addEventListener("change", () => {
    const value = level.value;
    level.value = "";
    if (value) runAction(row, "set_log_level", { level: value }, `log level ${value}`);
  });
  const more = el("select", { title: "call any handler of this worker", class: "more" });
  more.addEventListener("change", () => {
    const name = more.value;
    more.value = "";
    if (name) runAction(row, name, {}, name);
  });
  row.controls = { buttons, level, more };
  row.cells.actions.append(...buttons, level, more);
}

function updateRow(row, worker, cond) {
  row.worker = worker;
  const { cells } = row;
  row.tr.className = `worker ${cond.cls}`;
  setText(cells.rank, rankLabel(worker));

  cells.host.replaceChildren(
    el("div", { text: worker.hostname || "?" }),
    el("div", {
      class: "muted small",
      text: [
        worker.local_rank !== null && worker.local_rank !== undefined
          ? `local ${worker.local_rank}`
          : null,
        worker.role,
        `pid ${worker.pid}`,
        state.job ? nodeHost(worker.node) : null,
      ]
        .filter((part) => part !== null && part !== undefined && part !== "")
        .join(" · "),
    })
  );
  const stateChildren = [el("span", { class: `badge ${cond.cls}`, text: cond.label })];
  if (cond.detail) stateChildren.push(el("div", { class: "detail", text: cond.detail }));
  if (worker.stalled && typeof worker.stalled_since === "number") {
    stateChildren.push(
      el("div", { class: "muted small", text: `since ${formatTime(worker.stalled_since)}` })
    );
  }
  cells.state.replaceChildren(...stateChildren);
  setText(cells.step, worker.step === null || worker.step === undefined ? "–" : worker.step);
  setText(cells.rate, formatRate(worker.steps_per_second));
  updateAge(row);
  setText(cells.restarts, worker.restart_count);
  setText(cells.memory, formatBytes(worker.resident_memory_bytes));
  updateActions(row, worker);
  renderResult(row);
}

function updateAge(row) {
  const worker = row.worker;
  const age = worker && worker.state === "running" ? progressAge(worker) : null;
  setText(row.cells.age, formatAge(age));
  row.cells.age.classList.toggle("stale", typeof age === "number" && age > 60);
}

function updateActions(row, worker) {
  const running = worker.state === "running";
  const handlers = Array.isArray(worker.handlers) ? worker.handlers : [];
  const { buttons, level, more } = row.controls;
  for (const control of [...buttons, level]) {
    const handler = control.getAttribute("data-handler");
    control.disabled = !running || !handlers.includes(handler);
  }
  more.disabled = !running || handlers.length === 0;
  const signature = handlers.join("\n");
  if (row.handlers !== signature) {
    row.handlers = signature;
    more.replaceChildren(
      el("option", { value: "", text: "more…" }),
      ...handlers.map((name) => {
        const option = el("option", { text: name });
        option.value = name;
        return option;
      })
    );
  }
}

async function runAction(row, handler, params, label) {
  const worker = row.worker;
  const query = new URLSearchParams(params).toString();
  const base = state.job ? "/api/v1/job/workers/" : "/api/v1/workers/";
  const path =
    `${base}${encodeURIComponent(worker.key)}/handlers/${encodeURIComponent(handler)}` +
    (query ? `?${query}` : "");
  const title = `${label} · rank ${rankLabel(worker)}`;
  state.results.set(row.id, { title, pending: true, text: `calling ${handler}…` });
  renderResult(row);
  const started = performance.now();
  let result;
  try {
    const response = await api(path, { method: "POST" });
    const type = response.headers.get("content-type") || "";
    let text = await response.text();
    if (type.includes("json")) {
      try {
        text = JSON.stringify(JSON.parse(text), null, 2);
      } catch {
        // shown as it came
      }
    }
    result = { title, status: response.status, ok: response.ok, text };
  } catch (error) {
    const text = error instanceof AuthNeeded ? "a token is needed" : error.message;
    result = { title, status: null, ok: false, text };
  }
  result.seconds = (performance.now() - started) / 1000;
  state.results.set(row.id, result);
  renderResult(row);
}

function renderResult(row) {
  const result = state.results.get(row.id);
  row.resultRow.hidden = !result;
  if (!result || row.shown === result) return;
  row.shown = result;
  const status = result.pending
    ? "running…"
    : `${result.status === null ? "no answer" : `HTTP ${result.status}`} in ${result.seconds.toFixed(2)} s`;
  const close = el("button", {
    type: "button",
    class: "close",
    "aria-label": "close",
    text: "×",
    onclick: () => {
      state.results.delete(row.id);
      row.shown = null;
      renderResult(row);
    },
  });
  row.resultCell.replaceChildren(
    el(
      "div",
      { class: `result ${result.pending ? "pending" : result.ok ? "good" : "bad"}` },
      el(
        "div",
        { class: "result-head" },
        el("strong", { text: result.title }),
        el("span", { class: "muted", text: status }),
        close
      ),
      el("pre", { class: "output", text: result.text })
    )
  );
}

function renderNodes() {
  const list = $("nodes");
  list.replaceChildren(
    ...state.nodes
      .filter((node) => !node.ok)
      .map((node) =>
        el(
          "li",
          { class: "bad" },
          el("strong", { text: `node ${node.url} unreachable` }),
          el("span", { text: `: ${node.error || "no answer"}` })
        )
      )
  );
}

function renderBanner() {
  const banner = $("banner");
  const problems = [];
  for (const { worker, cond } of sortedWorkers()) {
    if (cond.cls !== "bad") continue;
    const where = state.job ? ` on ${nodeHost(worker.node)}` : "";
    const detail = cond.detail ? `: ${cond.detail}` : "";
    problems.push(`rank ${rankLabel(worker)} ${cond.label}${where}${detail}`);
  }
  const unreachable = state.nodes.filter((node) => !node.ok);
  for (const node of unreachable) problems.push(`node ${node.url} unreachable`);
  const conditions = state.workers.map(condition);
  const running = conditions.filter((c) => c.label === "running").length;
  const stalled = conditions.filter((c) => c.label === "stalled").length;
  const down = conditions.filter((c) => c.order === 1).length;
  setText(
    $("summary"),
    `${state.workers.length} known · ${running} running · ${stalled} stalled · ${down} down` +
      (state.job ? ` · ${state.nodes.length - unreachable.length}/${state.nodes.length} nodes` : "")
  );
  if (problems.length === 0) {
    banner.className = "banner good";
    banner.replaceChildren(
      el(
        "span",
        {
          text:
            state.workers.length === 0
              ? "No workers yet."
              : `All ${running} running workers are making progress.`,
        }
      )
    );
    return;
  }
  banner.className = "banner bad";
  banner.replaceChildren(
    el("strong", { text: `${problems.length} problem${problems.length > 1 ? "s" : ""}` }),
    el("ul", {}, ...problems.slice(0, 8).map((text) => el("li", { text })))
  );
}

function tick() {
  for (const row of state.rows.values()) updateAge(row);
  setText($("clock"), new Date().toLocaleTimeString([], { hour12: false }));
}

// -- events -------------------------------------------------------------------------------

// Ids restart at 1 when a sidecar restarts: the time tells those events apart.
const eventKey = (event) => `${event.node || ""}|${event.id}|${event.time}`;

function addEvents(events) {
  const known = new Set(state.events.map(eventKey));
  for (const event of events) {
    if (!known.has(eventKey(event))) state.events.push(event);
    if (!state.job && (state.lastEventId === null || event.id > state.lastEventId)) {
      state.lastEventId = event.id;
    }
  }
  state.events.sort((a, b) => b.time - a.time || b.id - a.id);
  state.events.length = Math.min(state.events.length, MAX_EVENTS);
  renderEvents();
}

function renderEvents() {
  $("events").replaceChildren(
    ...state.events.map((event) =>
      el(
        "li",
        { class: EVENT_CLASSES[event.kind] || "" },
        el("time", { text: formatTime(event.time) }),
        el("span", { class: "kind", text: event.kind.replace(/^worker_/, "") }),
        el("span", {
          class: "who",
          text:
            (event.worker === null ? "sidecar" : `rank ${event.worker}`) +
            (state.job && event.node ? ` · ${nodeHost(event.node)}` : ""),
        }),
        el("span", { class: "message", text: event.message })
      )
    )
  );
}

async function refreshEvents() {
  try {
    const path = state.job ? "/api/v1/job/events" : "/api/v1/events";
    const data = await apiJson(`${path}?limit=${MAX_EVENTS}`);
    if (state.job) state.events = [];
    addEvents(data.events || []);
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError(`Cannot load the events: ${error.message}`);
  }
}

// Server-Sent Events read with fetch(), not EventSource: EventSource cannot send
// an Authorization header, and a token in the URL would end up in logs.
async function streamEvents() {
  if (state.streaming) return;
  state.streaming = true;
  while (!state.needToken) {
    try {
      const headers = {};
      if (state.lastEventId !== null) headers["Last-Event-ID"] = String(state.lastEventId);
      const response = await api("/api/v1/events/stream", { headers });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      setLive("live", "good");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onStreamBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      if (error instanceof AuthNeeded) break;
    }
    if (state.needToken) break;
    setLive("reconnecting", "warn");
    await new Promise((resolve) => setTimeout(resolve, STREAM_RETRY_MS));
  }
  state.streaming = false;
}

let refreshSoon = null;

function onStreamBlock(block) {
  const data = block
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).trimStart())
    .join("\n");
  if (!data) return; // a keep-alive comment
  const event = JSON.parse(data);
  addEvents([event]);
  // The stream is in order: resume after this one even if a restarted sidecar's ids went down.
  state.lastEventId = event.id;
  // Something happened to a worker: show its new state now, not at the next poll.
  clearTimeout(refreshSoon);
  refreshSoon = setTimeout(() => {
    refreshWorkers();
    if (event.kind === "worker_stalled" || event.kind === "dump_failed") refreshDumps();
  }, 150);
}

// -- dumps ---------------------------------------------------------------------------------

async function refreshDumps() {
  try {
    const data = await apiJson("/api/v1/dumps");
    const dumps = data.dumps || [];
    $("dumps").tBodies[0].replaceChildren(
      ...dumps.slice(0, 50).map((dump) =>
        el(
          "tr",
          {},
          el("td", { text: formatTime(dump.time) }),
          el("td", { text: dump.worker }),
          el("td", { text: dump.incident }),
          el("td", { text: dump.what }),
          el("td", { class: "num", text: formatBytes(dump.size) }),
          el(
            "td",
            {},
            el("button", { type: "button", text: "view", onclick: () => viewDump(dump) })
          )
        )
      )
    );
    $("no-dumps").hidden = dumps.length > 0;
    $("dumps").hidden = dumps.length === 0;
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError(`Cannot load the dumps: ${error.message}`);
  }
}

async function viewDump(dump) {
  setText($("dump-title"), `${dump.what} · worker ${dump.worker} · ${dump.incident}`);
  $("dump-view").hidden = false;
  setText($("dump-text"), "loading…");
  try {
    const response = await api(`/api/v1/dumps/${encodeURIComponent(dump.id)}`);
    if (!response.ok) throw new Error(await errorText(response));
    const type = response.headers.get("content-type") || "";
    const text =
      type.startsWith("text/") || type.includes("json")
        ? await response.text()
        : `${formatBytes(dump.size)} of ${type}: fetch /api/v1/dumps/${dump.id} to save it`;
    setText($("dump-text"), text);
  } catch (error) {
    if (!(error instanceof AuthNeeded)) setText($("dump-text"), error.message);
  }
}

// -- start ---------------------------------------------------------------------------------

async function poll() {
  if (state.needToken) return;
  await refreshWorkers();
  if (state.job) await refreshEvents();
}

async function boot() {
  try {
    // The job view when this sidecar was given --target or --dns; a 404 otherwise.
    const probe = await api("/api/v1/job/workers");
    state.job = probe.ok;
  } catch (error) {
    if (error instanceof AuthNeeded) return;
    showError(`Cannot reach the sidecar: ${error.message}`);
  }
  $("forget-token").hidden = !state.token;
  setText($("scope"), state.job ? "job" : "node");
  setText($("dumps-title"), state.job ? "Dumps on this node" : "Dumps");
  document.body.classList.toggle("job", state.job);
  await Promise.all([refreshWorkers(), refreshEvents(), refreshDumps()]);
  if (state.needToken) return;
  if (!state.booted) {
    state.booted = true;
    setInterval(tick, 1000);
    setInterval(poll, REFRESH_MS);
    setInterval(() => state.needToken || refreshDumps(), DUMPS_REFRESH_MS);
  }
  if (state.job) setLive(`polling every ${REFRESH_MS / 1000} s`, "good");
  else streamEvents();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", useToken);
  $("forget-token").addEventListener("click", forgetToken);
  $("dump-close").addEventListener("click", () => {
    $("dump-view").hidden = true;
  });
  tick();
  boot();
});
