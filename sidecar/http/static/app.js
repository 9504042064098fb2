// rankside's page: the ranks of a node (or of the job) at a glance, the newest
// incident's verdict, step time and collective lag over the last minutes, the
// workers worth looking at with their actions, events and dumps.
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
// Beyond this many workers the table shows only the ranks worth looking at
// first: 512 rows of buttons cannot be read, the grid shows the rest.
const SHORT_TABLE = 16;
const SLOWEST_ROWS = 3;
// Step time against the median rank's: the grid's slow1..slow3 start here.
const SLOW_LEVELS = [1.25, 1.6, 2.5];

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
  worker_duplicate: "bad",
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
  rows: new Map(), // row id -> {tr, cells, resultRow, handlers}, for the rows shown
  results: new Map(), // row id -> the last action's result, shown under the row
  speeds: new Map(), // row id -> {seconds, ratio}: step time against the median rank's
  cells: new Map(), // row id -> the grid's cell
  gridEntries: [], // the grid's entries, in rank order: the plots' rows too
  selected: null, // row id of the rank picked in the grid or a plot
  showAll: false,
  incidents: [], // newest first, as the API lists them
  pinned: null, // id of the incident the user picked; null follows the newest
  incidentShown: null, // what the incident panel shows now, to redraw only on change
  openGroups: new Set(), // stack groups unfolded, by incident id and index
  culprits: new Map(), // global rank -> culprit, of the incident shown
  lags: null, // global rank -> collective lag in seconds; null without the straggler API
  lagError: null,
  stragglers: new Map(), // global rank -> straggler
  history: [], // samples of step time and lag, oldest first, for the plots
  dumps: new Map(), // dump id -> its listing, to name an incident's dumps
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

function formatSeconds(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms`;
  if (seconds < 100) return `${seconds.toFixed(2)} s`;
  return formatAge(seconds);
}

function median(values) {
  const sorted = values.filter((v) => typeof v === "number").sort((a, b) => a - b);
  if (sorted.length === 0) return null;
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

// [0, 1, 2, 5] -> "0-2,5", as the sidecar writes rank lists (sidecar/node/diagnosis.py).
function rankList(ranks) {
  const sorted = [...new Set(ranks)].sort((a, b) => a - b);
  const runs = [];
  for (const rank of sorted) {
    const last = runs[runs.length - 1];
    if (last && rank === last[1] + 1) last[1] = rank;
    else runs.push([rank, rank]);
  }
  return runs.map(([a, b]) => (a === b ? String(a) : `${a}-${b}`)).join(",");
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

// A rank's step time as the eye should weigh it: a rank that stopped stepping
// reports no new step times, so how long it has been stuck is its step so far.
function stepSeconds(worker) {
  if (worker.state !== "running") return null;
  const typical =
    typeof worker.median_step_seconds === "number" ? worker.median_step_seconds : null;
  if (!worker.stalled) return typical;
  // One that hung before its first step has been stuck since it connected.
  let age = progressAge(worker);
  if (age === null && typeof worker.connected_at === "number" && state.serverTime !== null) {
    const elapsed = Date.now() / 1000 - state.fetchedAt;
    age = Math.max(0, state.serverTime - worker.connected_at) + elapsed;
  }
  return typeof age === "number" ? Math.max(typical || 0, age) : typical;
}

// In synchronous training every rank steps at about the same pace, so a rank's
// speed is read against the median rank's: 2 means it takes twice as long.
function speedsOf(workers) {
  const seconds = new Map();
  for (const worker of workers) {
    const value = stepSeconds(worker);
    if (typeof value === "number") seconds.set(rowId(worker), value);
  }
  const typical = median([...seconds.values()]);
  const speeds = new Map();
  for (const [id, value] of seconds) {
    speeds.set(id, { seconds: value, ratio: typical ? value / typical : 1 });
  }
  return speeds;
}

function slowClass(speed) {
  if (!speed) return "";
  let level = 0;
  for (const limit of SLOW_LEVELS) if (speed.ratio >= limit) level += 1;
  return level ? `slow${level}` : "";
}

// Culprits, stragglers and lags are by global rank: the one name a rank has job-wide.
function byRank(map, worker) {
  return worker.rank === null || worker.rank === undefined ? null : map.get(worker.rank) || null;
}

function lagOf(worker) {
  const lag = state.lags ? byRank(state.lags, worker) : null;
  return typeof lag === "number" ? lag : null;
}

// What the page knows of one worker, computed once per render.
function entryOf(worker, index) {
  const id = rowId(worker);
  return {
    worker,
    index,
    id,
    cond: condition(worker),
    speed: state.speeds.get(id) || null,
    culprit: byRank(state.culprits, worker),
    straggler: byRank(state.stragglers, worker),
  };
}

// The order a person reads in: culprits, stalled, failed or gone, stragglers, the rest.
function priority(entry) {
  if (entry.culprit) return 0;
  if (entry.cond.order <= 1) return 1 + entry.cond.order;
  if (entry.straggler) return 3;
  return 2 + entry.cond.order;
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
    state.speeds = speedsOf(state.workers);
    recordSample();
    renderWorkers();
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError(`Cannot load the workers: ${error.message}`);
  }
}

function sortedWorkers() {
  return state.workers
    .map(entryOf)
    .sort((a, b) => priority(a) - priority(b) || a.index - b.index);
}

function renderWorkers() {
  state.speeds = speedsOf(state.workers);
  const sorted = sortedWorkers();
  renderTable(sorted);
  renderGrid(sorted);
  renderDetail();
  renderNodes();
  renderBanner(sorted);
  drawPlots();
}

// The rows worth looking at first: culprits, stalled, failed, stragglers,
// exited, the few slowest, and the rank picked in the grid; all on demand.
function rowsToShow(sorted) {
  if (state.showAll || sorted.length <= SHORT_TABLE) return sorted;
  const slowest = new Set(
    sorted
      .filter((e) => e.speed && e.cond.label === "running")
      .sort((a, b) => b.speed.seconds - a.speed.seconds)
      .slice(0, SLOWEST_ROWS)
      .map((e) => e.id)
  );
  const picked = sorted.filter(
    (e) => priority(e) <= 3 || e.cond.label === "exited" || slowest.has(e.id)
  );
  const shown = picked.slice(0, SHORT_TABLE);
  const selected = sorted.find((e) => e.id === state.selected);
  if (selected && !shown.includes(selected)) shown.push(selected);
  return shown;
}

function renderTable(sorted) {
  const body = $("workers").tBodies[0];
  const shown = rowsToShow(sorted);
  const seen = new Set();
  const ordered = [];
  for (const entry of shown) {
    seen.add(entry.id);
    let row = state.rows.get(entry.id);
    if (!row) {
      row = buildRow(entry.id);
      state.rows.set(entry.id, row);
    }
    updateRow(row, entry);
    ordered.push(row.tr, row.resultRow);
  }
  // Rows not shown are dropped, not hidden: 512 rows of controls are what the
  // short table avoids. An action's result is kept in state.results meanwhile.
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
  renderTableNote(shown.length, sorted.length);
}

function renderTableNote(shown, total) {
  const note = $("table-note");
  note.hidden = total <= SHORT_TABLE;
  if (note.hidden) return;
  setText(
    $("table-note-text"),
    state.showAll
      ? `All ${total} ranks.`
      : `${shown} of ${total} ranks: culprits, stalled, failed, stragglers, exited and the ` +
          `${SLOWEST_ROWS} slowest. The grid above shows every rank.`
  );
  setText($("show-all"), state.showAll ? "show the first to look at" : `show all ${total}`);
}

function toggleShowAll() {
  state.showAll = !state.showAll;
  renderWorkers();
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
    speed: el("td", { class: "num speed" }),
    actions: el("td", { class: "actions" }),
  };
  const tr = el("tr", { class: "worker" }, ...Object.values(cells));
  const resultCell = el("td", { colspan: "10" });
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

function updateRow(row, entry) {
  const { worker, cond } = entry;
  row.worker = worker;
  const { cells } = row;
  row.tr.className = [
    "worker",
    cond.cls,
    entry.culprit ? "culprit" : "",
    entry.straggler ? "straggler" : "",
    entry.id === state.selected ? "selected" : "",
  ]
    .filter(Boolean)
    .join(" ");
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
  cells.state.replaceChildren(...stateChildren(entry));
  setText(cells.step, worker.step === null || worker.step === undefined ? "–" : worker.step);
  setText(cells.rate, formatRate(worker.steps_per_second));
  updateAge(row);
  setText(cells.restarts, worker.restart_count);
  setText(cells.memory, formatBytes(worker.resident_memory_bytes));
  cells.speed.replaceChildren(...speedChildren(entry));
  updateActions(row, worker);
  renderResult(row);
}

function stateChildren(entry) {
  const { worker, cond } = entry;
  const children = [el("span", { class: `badge ${cond.cls}`, text: cond.label })];
  if (entry.culprit) children.push(el("span", { class: "tag culprit", text: "culprit" }));
  if (entry.straggler) children.push(el("span", { class: "tag straggler", text: "straggler" }));
  if (cond.detail) children.push(el("div", { class: "detail", text: cond.detail }));
  if (worker.stalled && typeof worker.stalled_since === "number") {
    children.push(
      el("div", { class: "muted small", text: `since ${formatTime(worker.stalled_since)}` })
    );
  }
  if (entry.culprit) {
    children.push(el("div", { class: "culprit-reason", text: entry.culprit.reason }));
  }
  if (entry.straggler && entry.straggler.reason) {
    children.push(el("div", { class: "straggler-reason", text: entry.straggler.reason }));
  }
  return children;
}

function speedChildren(entry) {
  const children = [];
  if (entry.speed) {
    children.push(el("div", { text: formatSeconds(entry.speed.seconds) }));
    const ratio = `${entry.speed.ratio.toFixed(2)}×`;
    children.push(el("div", { class: `muted small ${slowClass(entry.speed)}`, text: ratio }));
  } else {
    children.push(el("div", { text: "–" }));
  }
  const lag = lagOf(entry.worker);
  if (lag !== null) children.push(el("div", { class: "small", text: `lag ${formatSeconds(lag)}` }));
  return children;
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

function renderBanner(sorted) {
  const banner = $("banner");
  const problems = [];
  for (const { worker, cond } of sorted) {
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
    if (event.kind === "incident_verdict") {
      refreshIncidents();
      refreshDumps();
    }
  }, 150);
}

// -- dumps ---------------------------------------------------------------------------------

async function refreshDumps() {
  try {
    const data = await apiJson("/api/v1/dumps");
    const dumps = data.dumps || [];
    state.dumps = new Map(dumps.map((dump) => [dump.id, dump]));
    renderIncidentDumps(shownIncident());
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
  $("dump-view").scrollIntoView({ block: "nearest" });
  setText($("dump-text"), "loading…");
  try {
    const response = await api(`/api/v1/dumps/${encodeURIComponent(dump.id)}`);
    if (!response.ok) throw new Error(await errorText(response));
    const type = response.headers.get("content-type") || "";
    if (type.startsWith("text/") || type.includes("json")) {
      setText($("dump-text"), await response.text());
      return;
    }
    // A binary dump (a flight-recorder trace) is for tools: saved, not shown.
    const blob = await response.blob();
    saveBlob(blob, dump.id);
    setText($("dump-text"), `${formatBytes(blob.size)} of ${type}, saved as ${dump.id}`);
  } catch (error) {
    if (!(error instanceof AuthNeeded)) setText($("dump-text"), error.message);
  }
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: name });
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// -- start ---------------------------------------------------------------------------------

// What changes slowly, or costs the sidecar more to answer, is asked for less often.
async function refreshSlow() {
  await Promise.all([refreshDumps(), refreshIncidents(), refreshStragglers()]);
}

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
  updateAllActions();
  await refreshStragglers();
  await Promise.all([refreshWorkers(), refreshEvents(), refreshDumps(), refreshIncidents()]);
  if (state.needToken) return;
  if (!state.booted) {
    state.booted = true;
    setInterval(tick, 1000);
    setInterval(poll, REFRESH_MS);
    setInterval(() => state.needToken || refreshSlow(), DUMPS_REFRESH_MS);
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
  $("show-all").addEventListener("click", toggleShowAll);
  buildAllActions();
  watchPlot($("plot-step"), describeStepPoint, stepValue);
  watchPlot($("plot-lag"), describeLagPoint, lagValue);
  window.addEventListener("resize", drawPlots);
  tick();
  boot();
});
