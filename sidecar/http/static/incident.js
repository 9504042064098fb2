// rankside's page: the incident panel, the verdict first.
//
// Every string that comes from the API is put into the page with textContent,
// as a Text node or as an attribute's value, never parsed as HTML (app.js).
"use strict";

const MAX_LISTED_INCIDENTS = 50;

// -- incidents ---------------------------------------------------------------------------

async function refreshIncidents() {
  try {
    const data = await apiJson("/api/v1/incidents");
    state.incidents = Array.isArray(data.incidents) ? data.incidents : [];
    applyIncident();
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError(`Cannot load the incidents: ${error.message}`);
  }
}

function shownIncident() {
  const pinned = state.pinned && state.incidents.find((i) => i.id === state.pinned);
  return pinned || state.incidents[0] || null;
}

function applyIncident() {
  const incident = shownIncident();
  // An old verdict's culprits are not marked in red unless asked for: once an
  // incident closed, its ranks went on.
  const marks = incident && (incident.closed_at === null || state.pinned === incident.id);
  state.culprits = new Map(
    marks ? (incident.culprits || []).map((culprit) => [culprit.rank, culprit]) : []
  );
  renderIncident(incident);
  renderIncidentList(incident);
  renderWorkers();
}

function pinIncident(id) {
  // The newest is followed, not pinned: a newer incident then replaces it.
  state.pinned = state.incidents.length && state.incidents[0].id === id ? null : id;
  applyIncident();
}

function renderIncident(incident) {
  $("no-incident").hidden = Boolean(incident);
  $("incident").hidden = !incident;
  const signature = incident ? JSON.stringify(incident) : "";
  if (state.incidentShown === signature) return;
  state.incidentShown = signature;
  if (!incident) {
    setText($("incident-meta"), "");
    return;
  }
  setText($("incident-meta"), incidentMeta(incident));
  setText($("verdict"), incident.summary);
  $("verdict").className = `verdict ${incident.closed_at === null ? "open" : "closed"}`;
  renderCulprits(incident.culprits || []);
  renderFollowers(incident.followers || []);
  renderWaits(incident.waits || []);
  renderGroups(incident);
  renderIncidentDumps(incident);
  renderIncidentNodes(incident.nodes || []);
}

function incidentMeta(incident) {
  const closed =
    incident.closed_at === null ? "open" : `closed at ${formatTime(incident.closed_at)}`;
  return `${incident.id} · ${incident.kind} · ${incident.scope} · opened at ${formatTime(
    incident.opened_at
  )} · ${closed}`;
}

function renderCulprits(culprits) {
  const list = $("culprits");
  if (culprits.length === 0) {
    list.replaceChildren(el("li", { class: "muted", text: "none singled out" }));
    return;
  }
  list.replaceChildren(
    ...culprits.map((culprit) =>
      el(
        "li",
        {},
        el("button", {
          type: "button",
          class: "rank-link",
          text: `rank ${culprit.rank}`,
          title: "pick it in the grid",
          onclick: () => selectRank(culprit.rank),
        }),
        el("span", { class: "muted", text: ` on ${culprit.node || "?"} · ${culprit.evidence}: ` }),
        el("span", { class: "reason", text: culprit.reason })
      )
    )
  );
}

// In a failure, the ranks that ended after the culprit: on gloo one rank's
// exit makes every peer fail, and those are not the ones to look at.
function renderFollowers(followers) {
  $("followers").hidden = followers.length === 0;
  setText(
    $("followers"),
    `Ended after it (followers, not culprits): ranks ${rankList(followers)}`
  );
}

// A job incident's nodes: which ranks each covered, and those that did not answer.
function renderIncidentNodes(nodes) {
  $("incident-nodes-block").hidden = nodes.length < 2 && nodes.every((node) => node.ok);
  $("incident-nodes").replaceChildren(
    ...nodes.map((node) => {
      const name = node.url === null ? `${node.node || "this node"} (this one)` : nodeName(node);
      const ranks = (node.ranks || []).length ? `ranks ${rankList(node.ranks)}` : "no ranks";
      const what = node.ok ? `${ranks}, ${(node.dumps || []).length} dumps` : node.error;
      return el(
        "li",
        { class: node.ok ? "" : "bad" },
        nodePageLink(node) || el("span", { text: name }),
        el("span", { class: node.ok ? "muted" : "", text: `: ${what || "did not answer"}` })
      );
    })
  );
}

function nodeName(node) {
  return node.node ? `${node.node} (${nodeHost(node.url)})` : nodeHost(node.url);
}

// Another node's dumps are on its own sidecar: its page (which asks for its own
// token) opens them. Only an http(s) address becomes a link.
function nodePageLink(node) {
  if (node.url === null || !/^https?:\/\//.test(node.url || "")) return null;
  return el("a", { href: new URL("/", node.url).href, text: nodeName(node), rel: "noreferrer" });
}

function selectRank(rank) {
  const entry = state.gridEntries.find((e) => e.worker.rank === rank);
  if (entry && state.selected !== entry.id) select(entry.id);
}

function renderWaits(waits) {
  $("waits-block").hidden = waits.length === 0;
  $("waits").replaceChildren(
    ...waits.map((wait) => {
      const group = `group ${wait.group}${wait.desc ? ` (${wait.desc})` : ""}`;
      const op = [wait.op, wait.site ? `at ${wait.site}` : null].filter(Boolean).join(" ");
      return el("li", {
        text:
          `${group}, collective #${wait.seq}${op ? ` (${op})` : ""}: ranks ` +
          `${rankList(wait.waiting || [])} wait for ${rankList(wait.missing || [])}`,
      });
    })
  );
}

function renderGroups(incident) {
  const culprits = new Set((incident.culprits || []).map((c) => c.rank));
  $("groups").replaceChildren(
    ...(incident.groups || []).map((group, index) => {
      const key = `${incident.id}|${index}`;
      const ranks = group.ranks || [];
      const details = el(
        "details",
        { class: ranks.some((r) => culprits.has(r)) ? "group culprit" : "group" },
        el(
          "summary",
          {},
          el("strong", { class: "ranks", text: group.ranks_text || rankList(ranks) }),
          el("span", { class: "muted", text: ` (${ranks.length}) ` }),
          el("span", { class: "label", text: group.label })
        ),
        el(
          "ol",
          { class: "frames" },
          ...(group.frames || []).map((frame) =>
            el("li", { text: `${frame.func} at ${frame.file}:${frame.line}` })
          )
        )
      );
      details.open = state.openGroups.has(key);
      details.addEventListener("toggle", () => {
        if (details.open) state.openGroups.add(key);
        else state.openGroups.delete(key);
      });
      return details;
    })
  );
}

// One line per kind of dump, one link per worker: 512 ranks' dumps fit in a few lines.
// The dumps' own listing says whose and what each is once it has loaded.
function renderIncidentDumps(incident) {
  const kinds = new Map();
  for (const id of (incident && incident.dumps) || []) {
    const dump = state.dumps.get(id);
    const what = dump ? dump.what : "files";
    if (!kinds.has(what)) kinds.set(what, []);
    kinds.get(what).push({ id, dump });
  }
  if (kinds.size === 0) {
    const none = "none on this node (another node's are on its own page, under Nodes)";
    $("incident-dumps").replaceChildren(el("li", { class: "muted", text: none }));
    return;
  }
  $("incident-dumps").replaceChildren(
    ...[...kinds].map(([what, dumps]) =>
      el(
        "li",
        {},
        el("span", { class: "what", text: `${what} (${dumps.length}): ` }),
        ...dumps.map(({ id, dump }) => dumpLink(id, dump, incident))
      )
    )
  );
}

function dumpLink(id, dump, incident) {
  return el("a", {
    href: `/api/v1/dumps/${encodeURIComponent(id)}`,
    class: "dump-link",
    text: dump ? `worker ${dump.worker}` : id,
    title: dump ? `${id} · ${formatBytes(dump.size)}` : id,
    // The file needs the token, which only a fetch can send.
    onclick: (event) => {
      event.preventDefault();
      viewDump(dump || { id, what: id, worker: "?", incident: incident.id, size: null });
    },
  });
}

function renderIncidentList(shown) {
  $("incident-history").hidden = state.incidents.length < 2;
  $("incident-list").replaceChildren(
    ...state.incidents.slice(0, MAX_LISTED_INCIDENTS).map((incident) =>
      el(
        "li",
        { class: shown && incident.id === shown.id ? "current" : "" },
        el("button", {
          type: "button",
          class: "incident-pick",
          onclick: () => pinIncident(incident.id),
          text: `${formatTime(incident.opened_at)} · ${incident.id} · ${incident.kind}`,
        }),
        el("span", { class: "summary-line", text: incident.summary })
      )
    )
  );
}
