// rankside's page: the rank grid (one cell per rank) and the actions for every rank.
//
// Every string that comes from the API is put into the page with textContent,
// as a Text node or as an attribute's value, never parsed as HTML (app.js).
"use strict";

// Up to this many ranks the grid's cells are large enough to carry their number.
const ROOMY_GRID = 64;

// -- the rank grid ---------------------------------------------------------------------

// Rank order, so that a rank is always in the same place; ranks without one last.
function byRankOrder(a, b) {
  const ra = a.worker.rank;
  const rb = b.worker.rank;
  if (ra !== rb) {
    if (ra === null || ra === undefined) return 1;
    if (rb === null || rb === undefined) return -1;
    return ra - rb;
  }
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

function renderGrid(sorted) {
  const grid = $("grid");
  const ordered = [...sorted].sort(byRankOrder);
  state.gridEntries = ordered;
  const seen = new Set();
  const cells = [];
  for (const entry of ordered) {
    seen.add(entry.id);
    let cell = state.cells.get(entry.id);
    if (!cell) {
      cell = buildCell(entry.id);
      state.cells.set(entry.id, cell);
    }
    updateCell(cell, entry);
    cells.push(cell);
  }
  for (const [id, cell] of state.cells) {
    if (!seen.has(id)) {
      cell.remove();
      state.cells.delete(id);
    }
  }
  const current = Array.from(grid.children);
  if (current.length !== cells.length || current.some((node, i) => node !== cells[i])) {
    grid.append(...cells);
  }
  grid.classList.toggle("roomy", ordered.length <= ROOMY_GRID);
  $("grid-empty").hidden = ordered.length > 0;
  setText($("grid-summary"), gridSummary(ordered));
}

function buildCell(id) {
  return el("button", { type: "button", class: "cell", onclick: () => select(id) });
}

// Class and title are set only when they change: 512 cells redraw every refresh.
function updateCell(cell, entry) {
  const cls = [
    "cell",
    entry.cond.label,
    entry.cond.label === "running" ? slowClass(entry.speed) : "",
    entry.culprit ? "culprit" : "",
    entry.straggler ? "straggler" : "",
    entry.id === state.selected ? "selected" : "",
  ]
    .filter(Boolean)
    .join(" ");
  if (cell.className !== cls) cell.className = cls;
  const rank = rankLabel(entry.worker);
  if (cell.dataset.rank !== rank) {
    cell.dataset.rank = rank;
    cell.textContent = rank;
  }
  // A title is an attribute's text, never markup: worker strings are safe in it.
  const title = describeRank(entry).join("\n");
  if (cell.title !== title) {
    cell.title = title;
    cell.setAttribute("aria-label", title);
  }
}

// What a rank's tooltip and detail say, one line each.
function describeRank(entry) {
  const { worker, cond, speed } = entry;
  const lines = [`rank ${rankLabel(worker)} · ${cond.label}`];
  if (cond.detail) lines.push(cond.detail);
  if (entry.culprit) lines.push(`culprit: ${entry.culprit.reason}`);
  if (entry.straggler) {
    const { lag_seconds: lag, reason } = entry.straggler;
    lines.push(`straggler (lag ${formatSeconds(lag)})${reason ? `: ${reason}` : ""}`);
  }
  if (typeof worker.step === "number") lines.push(`step ${worker.step}`);
  if (speed) {
    const ratio = speed.ratio.toFixed(2);
    lines.push(`${formatSeconds(speed.seconds)} per step, ${ratio}× the median rank's`);
  }
  const lag = lagOf(worker);
  if (lag !== null) lines.push(`collective lag ${formatSeconds(lag)}`);
  lines.push(
    [worker.hostname, worker.role, `pid ${worker.pid}`, state.job ? nodeHost(worker.node) : null]
      .filter((part) => part !== null && part !== undefined && part !== "")
      .join(" · ")
  );
  return lines;
}

function gridSummary(entries) {
  const count = (test) => entries.filter(test).length;
  const parts = [`${entries.length} ranks`];
  const slow = count((e) => e.cond.label === "running" && slowClass(e.speed));
  const culprits = count((e) => e.culprit);
  const stragglers = count((e) => e.straggler);
  if (culprits) parts.push(`${culprits} culprit${culprits > 1 ? "s" : ""}`);
  if (stragglers) parts.push(`${stragglers} straggler${stragglers > 1 ? "s" : ""}`);
  if (slow) parts.push(`${slow} slower than ${SLOW_LEVELS[0]}× the median`);
  return parts.join(" · ");
}

function select(id) {
  state.selected = state.selected === id ? null : id;
  renderWorkers();
}

// The picked rank in words, with a way to its row (which the short table then includes).
function renderDetail() {
  const box = $("rank-detail");
  const entry = state.gridEntries.find((e) => e.id === state.selected);
  box.hidden = !entry;
  if (!entry) return;
  const [head, ...lines] = describeRank(entry);
  const row = state.rows.get(entry.id);
  box.replaceChildren(
    el(
      "div",
      { class: "result-head" },
      el("strong", { text: head }),
      row
        ? el("button", {
            type: "button",
            text: "its row",
            onclick: () => row.tr.scrollIntoView({ block: "center" }),
          })
        : null,
      el("button", {
        type: "button",
        class: "close",
        "aria-label": "close",
        text: "×",
        onclick: () => select(entry.id),
      })
    ),
    el("ul", {}, ...lines.map((text) => el("li", { text })))
  );
}

// -- actions for every rank -------------------------------------------------------------

function buildAllActions() {
  const box = $("all-actions");
  const fanOut = ACTIONS.map((action) =>
    el("button", {
      type: "button",
      text: action.label,
      title: `${action.title}, on every running rank of this node at once`,
      "data-all": action.handler,
      onclick: () => runAll(action),
    })
  );
  const diagnose = el("button", {
    type: "button",
    text: "Diagnose",
    title: "capture every rank's stacks now and name the culprits (a manual incident)",
    "data-all": "diagnose",
    onclick: diagnoseNow,
  });
  const label = el("span", { class: "muted small", text: "All ranks:" });
  box.replaceChildren(label, ...fanOut, diagnose);
}

// The fan-out route is a node's: in the job view each node's own page runs it.
function updateAllActions() {
  for (const button of $("all-actions").querySelectorAll("button[data-all]")) {
    const fanOut = button.getAttribute("data-all") !== "diagnose";
    button.disabled = fanOut && state.job;
    if (fanOut && state.job) button.title = "runs per node: open the node's own page for it";
  }
}

async function runAll(action) {
  const query = new URLSearchParams(action.params || {}).toString();
  const path = `/api/v1/handlers/${encodeURIComponent(action.handler)}${query ? `?${query}` : ""}`;
  const title = `${action.label} · all ranks`;
  await showAllResult(title, path, renderFanOut);
}

async function diagnoseNow() {
  const path = state.job ? "/api/v1/job/diagnose" : "/api/v1/diagnose";
  await showAllResult("Diagnose", path, (incident) => {
    // Show the verdict just reached, even though newer ones may follow.
    state.pinned = incident.id;
    refreshIncidents();
    return [el("p", { class: "verdict", text: incident.summary })];
  });
}

async function showAllResult(title, path, render) {
  const box = $("all-result");
  box.hidden = false;
  box.className = "all-result result pending";
  box.replaceChildren(resultHead(title, "running…", box));
  const started = performance.now();
  try {
    const response = await api(path, { method: "POST" });
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${await errorText(response)}`);
    const data = await response.json();
    box.className = "all-result result good";
    const head = resultHead(title, `HTTP ${response.status} in ${seconds} s`, box);
    box.replaceChildren(head, ...render(data));
  } catch (error) {
    box.className = "all-result result bad";
    const text = error instanceof AuthNeeded ? "a token is needed" : error.message;
    box.replaceChildren(resultHead(title, "failed", box), el("pre", { class: "output", text }));
  }
}

function resultHead(title, status, box) {
  return el(
    "div",
    { class: "result-head" },
    el("strong", { text: title }),
    el("span", { class: "muted", text: status }),
    el("button", {
      type: "button",
      class: "close",
      "aria-label": "close",
      text: "×",
      onclick: () => {
        box.hidden = true;
      },
    })
  );
}

// One line per rank; a rank's answer is put in the page only when unfolded,
// since 512 stack dumps at once would be megabytes of text nobody reads.
function renderFanOut(data) {
  const summary = data.summary || {};
  const children = [
    el("p", { text: `${summary.ok ?? "?"} of ${summary.workers ?? "?"} ranks answered 200` }),
  ];
  if (summary.text) children.push(el("pre", { class: "output", text: summary.text }));
  const ranks = Object.entries(data.ranks || {}).sort(
    ([a], [b]) => Number(a) - Number(b) || (a < b ? -1 : a > b ? 1 : 0)
  );
  children.push(
    el(
      "div",
      { class: "fanout" },
      ...ranks.map(([key, reply]) => {
        const details = el(
          "details",
          { class: reply.status === 200 ? "good" : "bad" },
          el("summary", { text: `rank ${key} · HTTP ${reply.status}` })
        );
        details.addEventListener("toggle", () => {
          if (details.open && details.children.length === 1) {
            const binary = reply.encoding === "base64";
            const body = binary ? `(${reply.content_type}, base64)` : reply.body;
            details.append(el("pre", { class: "output", text: body }));
          }
        });
        return details;
      })
    )
  );
  return children;
}
