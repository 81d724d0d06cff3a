// Live dashboard of an edgefed coordinator.
//
// The coordinator pushes a full JSON snapshot over a WebSocket (/live) whenever
// something changes; the page re-renders everything from each one. Every string
// in a snapshot may be hostile (client ids, plans, device names, ...), so the DOM
// is only ever built with createElement/createElementNS + textContent, and SVG
// attributes only ever receive numbers computed here. Never innerHTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// -- DOM helpers -------------------------------------------------------------------

// el("td", {class: "num", title: s}, "text", childNode, ...): string children become
// text nodes, so data can never be parsed as markup. Attribute names come from this
// file only; values set with setAttribute are not parsed either.
function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

// The same for SVG; callers pass only numbers (via n()) or fixed strings as values.
function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "data") Object.assign(node.dataset, v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// A finite number for an SVG attribute (never NaN/Infinity), rounded to keep the DOM small.
const n = (v) => (Number.isFinite(v) ? Math.round(v * 100) / 100 : 0);
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const str = (v) => (v === null || v === undefined || v === "" ? "-" : String(v));

// -- formatting --------------------------------------------------------------------

function fmtBytes(b) {
  if (!isNum(b)) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return (i === 0 ? String(Math.round(b)) : b.toFixed(b < 10 ? 2 : 1)) + " " + units[i];
}

// Memory budgets are large; show them in GiB, or MiB below one GiB.
function fmtMemory(b) {
  if (!isNum(b)) return "-";
  return b >= 2 ** 30 ? (b / 2 ** 30).toFixed(1) + " GiB" : (b / 2 ** 20).toFixed(0) + " MiB";
}

const fmtLoss = (v) => (isNum(v) ? v.toFixed(4) : "-");
const pad2 = (v) => String(v).padStart(2, "0");
const fmtClock = (d) => `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;

function fmtDuration(s) {
  if (!isNum(s)) return "-";
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}

// -- rendering ---------------------------------------------------------------------

let snapshots = 0;
let last = null; // the latest snapshot, for the once-a-second deadline countdown

function render(snap) {
  last = snap;
  // Each part is drawn on its own so that one malformed field cannot blank the page.
  for (const part of [renderHeader, renderCards, renderState, renderClients, renderCharts, renderConfig]) {
    try { part(snap); } catch (e) { console.error(part.name, e); }
  }
  snapshots++;
  // For bench/dashboard.py: when the page first showed data (Performance API, no cost).
  if (snapshots === 1 && performance.mark) performance.mark("edgefed-first-snapshot");
  document.body.dataset.snapshots = String(snapshots);
  document.body.dataset.round = String(snap.round);
}

function renderHeader(s) {
  $("federation").textContent = str(s.federation_id);
  $("model").textContent = str(s.model);
  $("uptime").textContent = fmtDuration(s.uptime_s);
  $("updated").textContent = fmtClock(new Date());
  document.title = `edgefed · ${str(s.federation_id)} · round ${str(s.round)}`; // a text property
}

function renderCards(s) {
  $("round").textContent = str(s.round);
  const total = s.rounds_total;
  $("rounds-total").textContent = total === 0 ? "∞" : str(total);
  const progress = $("progress");
  progress.hidden = !(isNum(total) && total > 0);
  progress.max = total > 0 ? total : 1;
  progress.value = isNum(s.round) && total > 0 ? Math.min(s.round, total) : 0;

  const ledger = isObj(s.ledger) ? s.ledger : null;
  const digest = ledger && typeof ledger.table_digest === "string" ? ledger.table_digest.slice(0, 16) + "…" : "-";
  $("ledger-head").textContent = ledger ? `round ${str(ledger.head_round)}, digest ${digest}` : "-";

  const agg = isObj(s.aggregation) ? s.aggregation : {};
  $("aggregation").textContent = `${str(agg.method)}, quorum ${str(agg.quorum)}`
    + (isNum(agg.robust_min_values) ? ` (robust from ${agg.robust_min_values} values)` : "");
}

// Also called every second, so the deadline counts down between snapshots. The
// deadline is the server's unix time against the browser clock; skew shows here.
function renderState(s) {
  if (!s) return;
  const o = isObj(s.open_round) ? s.open_round : null;
  let text;
  if (o) {
    const count = (a) => (Array.isArray(a) ? a.length : 0);
    const quorum = o.quorum ?? (isObj(s.aggregation) ? s.aggregation.quorum : null);
    const left = isNum(o.deadline_at) ? Math.max(0, Math.round(o.deadline_at - Date.now() / 1000)) : null;
    text = `round ${str(o.round)} attempt ${str(o.attempt)}: ${count(o.received)}/${count(o.assigned)} updates`
      + ` (quorum ${str(quorum)})` + (left === null ? "" : `, deadline in ${left} s`);
  } else text = s.finished ? "finished" : "waiting for clients";
  $("state").textContent = text;
}

// Rows are kept per client id and updated in place, so that a row (and a test's
// reference to it) survives the next snapshot; only departed clients' rows go.
const rowsById = new Map();

function renderClients(s) {
  const clients = Array.isArray(s.clients) ? s.clients.filter(isObj) : [];
  $("client-count").textContent = `(${clients.length})`;
  const seen = new Map();
  for (const c of clients) {
    const id = str(c.client_id);
    if (seen.has(id)) continue; // a duplicate id would otherwise share one row
    const d = isObj(c.device) ? c.device : {};
    // DeviceProfile names it device_name; accept "name" too.
    const device = [d.device_type, d.device_name ?? d.name].filter((x) => x !== null && x !== undefined && x !== "").join(" ") || "-";
    const agree = c.agrees === true ? "✓ agrees" : c.agrees === false ? "✗ differs" : "-";
    const refusals = isObj(c.refusals) && Object.keys(c.refusals).length
      ? Object.entries(c.refusals).map(([code, k]) => `${code}×${k}`).join(", ") : "-";
    const flagged = c.flag_reason ? String(c.flag_reason) : c.flagged ? "yes" : "no";
    const loss = c.loss_before == null && c.loss_after == null ? "-" : `${fmtLoss(c.loss_before)} → ${fmtLoss(c.loss_after)}`;
    const busy = isNum(c.busy_round) ? `training round ${c.busy_round}` : "";
    // [text, class, title] per column, in the order of the table's header.
    const cells = [
      [id, "id cut", id],
      [device, "cut", device],
      [fmtMemory(d.memory_budget_bytes), "num", ""],
      [str(c.mode), "", ""],
      [str(c.plan), "cut", str(c.plan)],
      [str(c.round), "num" + (busy ? " busy" : ""), busy],
      [agree, c.agrees === false ? "bad" : c.agrees ? "good" : "", c.fingerprint == null ? "" : String(c.fingerprint)],
      [flagged, "cut" + (c.flagged ? " bad" : ""), flagged],
      [refusals, "cut", refusals],
      [loss, "num", ""],
      [`${fmtBytes(c.wire_bytes_up)} / ${fmtBytes(c.wire_bytes_down)}`, "num", ""],
      [fmtBytes(c.wire_bytes_per_round), "num", ""],
    ];
    let tr = rowsById.get(id);
    if (!tr) {
      tr = el("tr", {}, cells.map(() => el("td")));
      tr.dataset.clientId = id; // dataset is a plain attribute value, never markup
    }
    tr.className = "client" + (c.flagged ? " flagged" : "") + (c.agrees === false ? " differs" : "");
    cells.forEach(([text, cls, title], i) => {
      const td = tr.cells[i];
      if (td.textContent !== text) td.textContent = text;
      td.className = cls;
      td.title = title;
    });
    seen.set(id, tr);
  }
  rowsById.clear();
  for (const [id, tr] of seen) rowsById.set(id, tr);
  const rows = [...seen.values()];
  if (!rows.length) rows.push(el("tr", {class: "empty"}, el("td", {colspan: 12}, "no clients connected")));
  $("clients").tBodies[0].replaceChildren(...rows);
}

function renderCharts(s) {
  const h = Array.isArray(s.history) ? s.history.filter((r) => isObj(r) && isNum(r.round)) : [];
  const pick = (key) => h.filter((r) => isNum(r[key])).map((r) => [r.round, r[key]]);
  lineChart($("loss-chart"), [
    {name: "probe loss (before)", series: "before", points: pick("loss_before"), dots: false},
    {name: "probe loss", series: "probe", points: pick("loss_after"), dots: true},
    {name: "eval loss", series: "eval", points: pick("eval_loss"), dots: true},
  ], {fmt: fmtLoss, tick: (v) => String(+v.toFixed(4))});
  lineChart($("bytes-chart"), [
    {name: "up", series: "up", points: pick("wire_bytes_up"), dots: true},
    {name: "down", series: "down", points: pick("wire_bytes_down"), dots: true},
  ], {fmt: fmtBytes, tick: (v) => fmtBytes(v).replace(/\.0+ /, " "), fromZero: true, binary: true});
}

// Round-ish tick values covering [lo, hi], about `count` of them (1/2/5 x 10^k steps).
function ticks(lo, hi, count, integer) {
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((f) => f * mag).find((st) => st >= raw) || 10 * mag;
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9 && out.length < 50; t += step) out.push(t);
  return out;
}

// Draws the series (each {name, series, points: [[round, value]], dots}) into the
// svg's viewBox. Lines join the points that exist, skipping nulls. opts: fmt (a value,
// in tooltips), tick (an axis label), fromZero (y axis starts at 0), binary (y ticks
// on round numbers of KiB/MiB/GiB rather than of 10s).
const dotsByChart = new Map(); // svg element -> Map("series:round" -> circle)

function lineChart(root, series, {fmt, tick, fromZero = false, binary = false}) {
  const [, , W, H] = root.getAttribute("viewBox").split(" ").map(Number);
  const L = 62, R = 20, T = 24, B = 26; // margins: y labels left, x labels below, legend on top
  const all = series.flatMap((s) => s.points);
  const nodes = [];
  // The dots are reused across snapshots (keyed by series and round), like the
  // table's rows, so references to them survive a redraw; the rest is redrawn.
  const oldDots = dotsByChart.get(root) || new Map(), kept = new Map();
  dotsByChart.set(root, kept);
  if (!all.length) {
    nodes.push(svg("text", {x: n(W / 2), y: n(H / 2), class: "empty", "text-anchor": "middle"}, "no rounds yet"));
    root.replaceChildren(...nodes);
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (fromZero) y0 = Math.min(0, y0);
  if (x0 === x1) { x0 -= 1; x1 += 1; } // a single round: centre it
  if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  else if (!fromZero) { const d = (y1 - y0) * 0.05; y0 -= d; y1 += d; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);

  const unit = binary ? 1024 ** Math.max(0, Math.floor(Math.log(Math.max(Math.abs(y0), Math.abs(y1))) / Math.log(1024))) : 1;
  for (const t of ticks(y0 / unit, y1 / unit, 4, false).map((v) => v * unit)) {
    nodes.push(svg("line", {class: "grid", x1: L, x2: n(W - R), y1: n(sy(t)), y2: n(sy(t))}));
    nodes.push(svg("text", {class: "tick", x: L - 6, y: n(sy(t) + 4), "text-anchor": "end"}, tick(t)));
  }
  for (const t of ticks(x0, x1, 6, true)) {
    if (t < x0 || t > x1) continue;
    nodes.push(svg("line", {class: "axis", x1: n(sx(t)), x2: n(sx(t)), y1: n(H - B), y2: n(H - B + 4)}));
    nodes.push(svg("text", {class: "tick", x: n(sx(t)), y: n(H - B + 16), "text-anchor": "middle"}, String(t)));
  }
  nodes.push(svg("line", {class: "axis", x1: L, x2: n(W - R), y1: n(H - B), y2: n(H - B)}));
  nodes.push(svg("line", {class: "axis", x1: L, x2: L, y1: T, y2: n(H - B)}));

  // Dots shrink as rounds pile up (up to 1000 of them in history).
  const r = all.length > 300 ? 1.2 : all.length > 60 ? 2 : 3;
  let lx = L; // legend, left to right along the top
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${n(sx(p[0]))} ${n(sy(p[1]))}`).join(" ");
    nodes.push(svg("path", {class: `line s-${s.series}`, d}));
    for (const [x, y] of s.dots ? s.points : []) {
      const key = `${s.series}:${x}`;
      if (kept.has(key)) continue;
      const dot = oldDots.get(key) || svg("circle", {class: `point s-${s.series}`, data: {series: s.series, round: String(x)}}, svg("title"));
      dot.setAttribute("cx", n(sx(x)));
      dot.setAttribute("cy", n(sy(y)));
      dot.setAttribute("r", r);
      dot.firstChild.textContent = `${s.name}, round ${x}: ${fmt(y)}`;
      kept.set(key, dot);
      nodes.push(dot);
    }
    nodes.push(svg("rect", {class: `swatch s-${s.series}`, x: n(lx), y: 8, width: 12, height: 4}));
    nodes.push(svg("text", {class: "legend", x: n(lx + 16), y: 14}, s.name));
    lx += 28 + s.name.length * 6.5;
  }
  root.replaceChildren(...nodes);
}

function renderConfig(s) {
  const cfg = isObj(s.config) ? s.config : {};
  // A <div> per dt/dd pair (valid in a <dl>) so the pairs can flow in a grid.
  const items = Object.entries(cfg).map(([k, v]) => el("div", {},
    el("dt", {}, k),
    el("dd", {}, typeof v === "string" ? v : JSON.stringify(v) ?? "-")));
  $("config").replaceChildren(...(items.length ? items : [el("div", {}, el("dd", {class: "muted"}, "-"))]));
}

// -- live connection ---------------------------------------------------------------

function setConnection(state, text) {
  const node = $("connection");
  node.textContent = text;
  node.className = `conn-${state}`;
  // Dim the page while what it shows may be stale.
  document.body.classList.toggle("stale", state !== "live");
}

const token = new URLSearchParams(location.search).get("token");
const liveUrl = (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + "/live"
  + (token ? "?token=" + encodeURIComponent(token) : "");
let backoff = 1000;

function connect() {
  const ws = new WebSocket(liveUrl);
  ws.onopen = () => setConnection("live", "live");
  ws.onmessage = (ev) => {
    backoff = 1000; // reset only once data flows, so accept-then-close loops still back off
    let snap;
    try { snap = JSON.parse(ev.data); } catch (e) { console.error("bad snapshot", e); return; }
    if (isObj(snap)) render(snap);
  };
  ws.onerror = () => setConnection("down", "disconnected, reconnecting…"); // close follows
  ws.onclose = (ev) => {
    if (ev.code === 4401) {
      setConnection("denied", "not authorised: open the page with ?token=...");
      return; // a wrong token will not get better by retrying
    }
    setConnection("down", "disconnected, reconnecting…");
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

setInterval(() => { try { renderState(last); } catch (e) { console.error(e); } }, 1000);
connect();
