// rankside's page: collective lag from the straggler API, and the rank-by-time
// heatmaps of step time and lag, drawn on a canvas from samples the page keeps.
//
// Every string that comes from the API is put into the page with textContent,
// as a Text node or as an attribute's value, never parsed as HTML (app.js).
"use strict";

// The plots keep what the page sampled over this window, at most this many samples.
const HISTORY_SECONDS = 300;
const MAX_SAMPLES = 200;
const PLOT_MAX_HEIGHT = 512;
const PLOT_MARK_WIDTH = 4;
// A page just opened has only seconds of samples: the plot spans them (at
// least this long) rather than leave most of its width empty.
const MIN_PLOT_SECONDS = 60;
// A burst of events refreshes the workers many times a second: samples closer
// than this replace the newest, so that a burst cannot push the minutes out.
const MIN_SAMPLE_GAP_SECONDS = 1;
// Colours of the heat scale, computed once: 512 ranks by 150 samples per draw.
const HEAT_LEVELS = 64;

// -- stragglers ----------------------------------------------------------------------------

// The straggler API answers {ranks: {rank: lag_seconds} or [{rank, lag_seconds}],
// stragglers: [{rank, node, lag_seconds, reason}]}. A sidecar without it
// answers 404, and the page then shows no lag. Only these two functions read it.
async function refreshStragglers() {
  try {
    const response = await api(state.job ? "/api/v1/job/stragglers" : "/api/v1/stragglers");
    if (response.status === 404) {
      state.lags = null;
      state.stragglers = new Map();
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    readStragglers(await response.json());
  } catch (error) {
    if (!(error instanceof AuthNeeded)) state.lagError = `Cannot load the lags: ${error.message}`;
  }
}

function readStragglers(data) {
  const lagOfItem = (value) => (value && typeof value === "object" ? value.lag_seconds : value);
  const pairs = Array.isArray(data.ranks)
    ? data.ranks.map((item) => [item.rank, lagOfItem(item)])
    : Object.entries(data.ranks || {}).map(([rank, value]) => [rank, lagOfItem(value)]);
  state.lags = new Map(
    pairs.filter(([, lag]) => typeof lag === "number").map(([rank, lag]) => [Number(rank), lag])
  );
  const stragglers = Array.isArray(data.stragglers) ? data.stragglers : [];
  state.stragglers = new Map(stragglers.map((straggler) => [Number(straggler.rank), straggler]));
  state.lagError = null;
}

// -- plots -----------------------------------------------------------------------------------

// One sample per refresh, kept for HISTORY_SECONDS and at most MAX_SAMPLES:
// memory stays bounded however long the page stays open.
function recordSample() {
  const now = Date.now() / 1000;
  const step = new Map();
  for (const [id, speed] of state.speeds) step.set(id, speed.seconds);
  const lag = new Map();
  for (const worker of state.workers) {
    const value = lagOf(worker);
    if (value !== null) lag.set(rowId(worker), value);
  }
  const sample = { t: now, step, lag, stepMedian: median([...step.values()]) };
  const newest = state.history[state.history.length - 1];
  if (newest && now - newest.t < MIN_SAMPLE_GAP_SECONDS) state.history.pop();
  state.history.push(sample);
  while (
    state.history.length > MAX_SAMPLES ||
    (state.history.length && state.history[0].t < now - HISTORY_SECONDS)
  ) {
    state.history.shift();
  }
}

function hslToRgb(hue, saturation, lightness) {
  const a = saturation * Math.min(lightness, 1 - lightness);
  const channel = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (lightness - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [channel(0), channel(8), channel(4)];
}

// Dark teal as fast as the median rank, through amber, to red: the slow rank is the bright row.
const HEAT = Array.from({ length: HEAT_LEVELS + 1 }, (_, level) => {
  const f = level / HEAT_LEVELS;
  return hslToRgb(170 - 170 * f, 0.7, 0.18 + 0.4 * f);
});

function heat(fraction) {
  return HEAT[Math.round(Math.min(1, Math.max(0, fraction)) * HEAT_LEVELS)];
}

// Step time: 1× the median is dark, 3× and more is red.
function stepValue(sample, id) {
  const seconds = sample.step.get(id);
  if (typeof seconds !== "number" || !sample.stepMedian) return null;
  return (seconds / sample.stepMedian - 1) / 2;
}

// Lag: red when a rank arrives a whole median step late; when no rank reports
// steps, red at LAG_WITHOUT_STEPS seconds.
const LAG_WITHOUT_STEPS = 0.1;

function lagValue(sample, id) {
  const lag = sample.lag.get(id);
  if (typeof lag !== "number") return null;
  return lag / (sample.stepMedian || LAG_WITHOUT_STEPS);
}

function plotRowHeight(rows) {
  return Math.max(1, Math.min(10, Math.floor(PLOT_MAX_HEIGHT / Math.max(1, rows))));
}

// Seconds the plots span: the samples kept, within MIN_PLOT_SECONDS..HISTORY_SECONDS.
function plotSpan(now) {
  const oldest = state.history.length ? state.history[0].t : now;
  return Math.min(HISTORY_SECONDS, Math.max(MIN_PLOT_SECONDS, now - oldest));
}

function drawPlots() {
  const ids = state.gridEntries.map((e) => e.id);
  const span = plotSpan(Date.now() / 1000);
  const start = span >= 120 ? `${Math.round(span / 60)} min ago` : `${Math.round(span)} s ago`;
  setText($("step-axis-start"), start);
  setText($("lag-axis-start"), state.lagError || start);
  drawHeatmap($("plot-step"), ids, stepValue);
  const lagKnown = state.lags !== null || state.history.some((sample) => sample.lag.size > 0);
  $("lag-figure").hidden = !lagKnown && !state.lagError;
  if (!$("lag-figure").hidden) drawHeatmap($("plot-lag"), ids, lagValue);
}

// Rows are ranks in grid order, columns the samples over time, newest right.
// The strip at the left marks culprits, stragglers and the picked rank.
function drawHeatmap(canvas, ids, valueAt) {
  const rowHeight = plotRowHeight(ids.length);
  const width = Math.max(200, Math.floor(canvas.parentElement.clientWidth));
  const height = Math.max(rowHeight, ids.length * rowHeight);
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#0c0f15";
  ctx.fillRect(0, 0, width, height);
  const now = Date.now() / 1000;
  const span = plotSpan(now);
  const plotWidth = width - PLOT_MARK_WIDTH;
  const xOf = (t) => PLOT_MARK_WIDTH + ((t - (now - span)) / span) * plotWidth;
  // Each sample's column of pixels, stretched to its time on the axis.
  const strip = heatStrip(ids, valueAt);
  ctx.imageSmoothingEnabled = false;
  (ids.length ? state.history : []).forEach((sample, column) => {
    const next = state.history[column + 1];
    const left = Math.max(PLOT_MARK_WIDTH, Math.floor(xOf(sample.t)));
    const right = Math.ceil(xOf(next ? next.t : now));
    ctx.drawImage(strip, column, 0, 1, ids.length, left, 0, Math.max(1, right - left), height);
  });
  state.gridEntries.forEach((entry, row) => {
    const mark = entry.culprit ? "#ef5b5b" : entry.straggler ? "#e8a33d" : null;
    const picked = entry.id === state.selected;
    if (!mark && !picked) return;
    ctx.fillStyle = picked ? "#6aa5ff" : mark;
    ctx.fillRect(0, row * rowHeight, PLOT_MARK_WIDTH - 1, rowHeight);
  });
  canvas.dataset.rows = String(ids.length);
  canvas.dataset.rowHeight = String(rowHeight);
  canvas.dataset.samples = String(state.history.length);
}

// One pixel per sample (column) and rank (row), transparent where there is no
// value: 512 ranks by 150 samples are written as bytes, not drawn one by one.
let stripCanvas = null;

function heatStrip(ids, valueAt) {
  const columns = Math.max(1, state.history.length);
  const rows = Math.max(1, ids.length);
  const pixels = new ImageData(columns, rows);
  state.history.forEach((sample, column) => {
    ids.forEach((id, row) => {
      const value = valueAt(sample, id);
      if (value === null) return;
      const offset = (row * columns + column) * 4;
      pixels.data.set(heat(value), offset);
      pixels.data[offset + 3] = 255;
    });
  });
  stripCanvas = stripCanvas || document.createElement("canvas");
  stripCanvas.width = columns;
  stripCanvas.height = rows;
  stripCanvas.getContext("2d").putImageData(pixels, 0, 0);
  return stripCanvas;
}

// The plot's point under the pointer, as a tooltip and a click that picks the rank.
function plotPoint(canvas, event, valueAt) {
  const rowHeight = Number(canvas.dataset.rowHeight || 1);
  const y = (event.offsetY * canvas.height) / Math.max(1, canvas.clientHeight);
  const x = (event.offsetX * canvas.width) / Math.max(1, canvas.clientWidth);
  const entry = state.gridEntries[Math.floor(y / rowHeight)];
  if (!entry) return null;
  const now = Date.now() / 1000;
  const span = plotSpan(now);
  const t = now - span + ((x - PLOT_MARK_WIDTH) / (canvas.width - PLOT_MARK_WIDTH)) * span;
  const sample = [...state.history].reverse().find((s) => s.t <= t);
  const value = sample ? valueAt(sample, entry.id) : null;
  return { entry, sample, value, ago: sample ? Math.round(now - sample.t) : null };
}

function watchPlot(canvas, describe, valueAt) {
  canvas.addEventListener("mousemove", (event) => {
    const point = plotPoint(canvas, event, valueAt);
    canvas.title = point ? describe(point) : "";
  });
  canvas.addEventListener("click", (event) => {
    const point = plotPoint(canvas, event, valueAt);
    if (point) select(point.entry.id);
  });
}

function describeStepPoint({ entry, sample, ago }) {
  const seconds = sample ? sample.step.get(entry.id) : undefined;
  const known = sample && sample.stepMedian && typeof seconds === "number";
  const ratio = known ? seconds / sample.stepMedian : null;
  return (
    `rank ${rankLabel(entry.worker)}` +
    (sample ? `, ${ago} s ago: ${formatSeconds(seconds)} per step` : ": no sample here") +
    (ratio !== null ? ` (${ratio.toFixed(2)}× the median)` : "")
  );
}

function describeLagPoint({ entry, sample, ago }) {
  const lag = sample ? sample.lag.get(entry.id) : undefined;
  return (
    `rank ${rankLabel(entry.worker)}` +
    (sample ? `, ${ago} s ago: collective lag ${formatSeconds(lag)}` : ": no sample here")
  );
}
