/* sflam fleet page.
 *
 * Polls api/fleet every second (docs/dashboard.md), keeps the round records by plan_round, and
 * draws the header, the summary tiles, six per-round SVG charts and the paged device table.
 * Plain ES2020, no libraries, nothing loaded from outside the origin. Strings from the server
 * (device ids, profiles, failure reasons) only ever reach the page through textContent,
 * attributes or <title> text: never through innerHTML.
 */
"use strict";
(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const API = "api/fleet";
  const POLL_MS = 1000;
  const RETRY_FIRST_MS = 2000;
  const RETRY_MS = 5000;
  const HEADERS_TIMEOUT_MS = 15000; // a server that does not answer counts as lost
  const BODY_TIMEOUT_MS = 120000; // the first answer of a long run with many devices is large
  const PAGE_SIZE = 50;
  const DASH = "\u2014";
  const SCHEMES = { v1: "SFL-V1", v2: "SFL-V2", fl: "FL" };
  const ROUND_STATES = ["idle", "selected", "training", "done", "late", "failed"];
  const PHASES = ["waiting", "training", "finished"];
  const LATENCY_PHASES = [
    ["wait_devices", "wait", "ph-wait"],
    ["train", "train", "ph-train"],
    ["aggregate", "aggregate", "ph-aggregate"],
    ["evaluate", "evaluate", "ph-evaluate"],
    ["checkpoint", "checkpoint", "ph-checkpoint"],
  ];
  const STATUS_TEXT = {
    connecting: "connecting",
    live: "live",
    lost: "connection lost, retrying",
    finished: "run finished",
    ended: "run finished; the server has stopped",
    unauthorized: "this dashboard needs its token: open /?token=YOUR_TOKEN once",
  };
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  const state = {
    run: null,
    devices: [],
    snapshot: null,
    generated: null,
    rounds: new Map(), // plan_round -> summary (see summarize)
    records: [], // the summaries, by plan_round
    roundsVersion: 0,
    drawn: { version: -1, width: -1, allocation: null },
    sort: { key: null, dir: 1 },
    filter: "",
    page: 1,
    tableKey: "",
    failures: 0,
    rendered: false,
  };

  const $ = (id) => document.getElementById(id);

  /* ---------------------------------------------------------------- formatting */

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const num = (v) => (isNum(v) ? v : 0);

  function sig(v, digits) {
    if (!isNum(v)) return DASH;
    if (Math.abs(v) >= 10 ** digits) return String(Math.round(v));
    return v.toPrecision(digits);
  }

  function fmtBytes(n) {
    if (!isNum(n)) return DASH;
    const units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let i = 0;
    let v = n;
    while (Math.abs(v) >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    if (i === 0) return `${Math.round(v)} B`;
    const shown = v >= 100 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, "");
    return `${shown} ${units[i]}`;
  }

  function fmtEnergy(j) {
    if (!isNum(j)) return DASH;
    if (Math.abs(j) >= 1e6) return `${(j / 1e6).toFixed(2)} MJ`;
    if (Math.abs(j) >= 1e4) return `${(j / 1e3).toFixed(1)} kJ`;
    return `${fmtJ(j)} J`;
  }

  function fmtJ(j) {
    if (!isNum(j)) return DASH;
    if (Math.abs(j) >= 1000) return j.toFixed(0);
    if (Math.abs(j) >= 10) return j.toFixed(1);
    return j.toFixed(2);
  }

  const fmtWatts = (w) => (isNum(w) ? `${sig(w, 3)} W` : DASH);
  const fmtDbm = (w) => (isNum(w) && w > 0 ? `${(10 * Math.log10(w * 1000)).toFixed(1)} dBm` : "");

  function fmtHz(hz) {
    if (!isNum(hz)) return DASH;
    if (hz >= 1e9) return `${sig(hz / 1e9, 3)} GHz`;
    if (hz >= 1e6) return `${sig(hz / 1e6, 3)} MHz`;
    if (hz >= 1e3) return `${sig(hz / 1e3, 3)} kHz`;
    return `${sig(hz, 3)} Hz`;
  }

  function fmtSeconds(s) {
    if (!isNum(s)) return DASH;
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 600) return `${Math.round(s)} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function fmtAgo(then, now) {
    if (!isNum(then) || !isNum(now)) return DASH;
    const age = Math.max(0, now - then);
    if (age < 120) return `${Math.round(age)} s ago`;
    if (age < 7200) return `${Math.round(age / 60)} min ago`;
    if (age < 172800) return `${Math.round(age / 3600)} h ago`;
    return `${Math.round(age / 86400)} d ago`;
  }

  const fmtPct = (v) => (isNum(v) ? `${(v * 100).toFixed(1)}%` : DASH);
  const fmtLoss = (v) => (isNum(v) ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3)) : DASH);
  const text = (v) => (v === null || v === undefined || v === "" ? DASH : String(v));
  const pad2 = (n) => String(n).padStart(2, "0");

  function clock(date) {
    return `${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`;
  }

  function setText(id, value) {
    const node = $(id);
    if (node && node.textContent !== value) node.textContent = value;
  }

  function setNote(id, value) {
    setText(id, value);
    const node = $(id);
    if (node) node.title = value;
  }

  /* ---------------------------------------------------------------- data */

  /** One round record with what the charts and tiles need, summed once when it arrives. */
  function summarize(rec) {
    let up = 0;
    let down = 0;
    let energy = 0;
    let energyCount = 0;
    const devices = rec.devices && typeof rec.devices === "object" ? Object.values(rec.devices) : [];
    for (const d of devices) {
      if (!d || typeof d !== "object") continue;
      up += num(d.bytes_up);
      down += num(d.bytes_down);
      if (isNum(d.energy_j)) {
        energy += d.energy_j;
        energyCount += 1;
      }
    }
    const failed = rec.failed && typeof rec.failed === "object" ? Object.values(rec.failed) : [];
    return { plan: rec.plan_round, rec, up, down, energy, energyCount, failed };
  }

  const maxPlan = () => (state.records.length ? state.records[state.records.length - 1].plan : null);

  /** True when data comes from another run or a restarted server than the records held. */
  function restarted(data, run) {
    if (state.run === null) return false;
    if (run.run_id !== state.run.run_id) return true;
    return isNum(data.snapshot) && isNum(state.snapshot) && data.snapshot < state.snapshot;
  }

  /** Merge one /api/fleet answer; false when it belongs to a new run and a partial answer (since)
   * must be fetched again in full (the records held are dropped). */
  function merge(data, partial) {
    const run = data.run && typeof data.run === "object" ? data.run : {};
    if (restarted(data, run)) {
      state.rounds.clear();
      state.records = [];
      state.roundsVersion += 1;
      if (partial) {
        state.run = null;
        return false;
      }
    }
    let changed = false;
    for (const rec of Array.isArray(data.rounds) ? data.rounds : []) {
      if (!rec || typeof rec !== "object" || !isNum(rec.plan_round)) continue;
      state.rounds.set(rec.plan_round, summarize(rec));
      changed = true;
    }
    if (changed) {
      state.records = Array.from(state.rounds.values()).sort((a, b) => a.plan - b.plan);
      state.roundsVersion += 1;
    }
    state.run = run;
    state.devices = Array.isArray(data.devices) ? data.devices.filter((d) => d && typeof d === "object") : [];
    state.snapshot = data.snapshot;
    state.generated = data.generated;
    return true;
  }

  /* ---------------------------------------------------------------- polling */

  async function fetchFleet(url) {
    const abort = new AbortController();
    let timer = setTimeout(() => abort.abort(), HEADERS_TIMEOUT_MS);
    try {
      const reply = await fetch(url, { cache: "no-store", credentials: "same-origin", signal: abort.signal });
      if (reply.status === 401) return { unauthorized: true };
      if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
      clearTimeout(timer);
      timer = setTimeout(() => abort.abort(), BODY_TIMEOUT_MS);
      return { data: await reply.json() };
    } finally {
      clearTimeout(timer);
    }
  }

  async function poll() {
    const since = maxPlan();
    const url = since === null ? API : `${API}?since=${encodeURIComponent(since)}`;
    let answer;
    try {
      answer = await fetchFleet(url);
    } catch (err) {
      state.failures += 1;
      setConnection(runFinished() ? "ended" : "lost");
      setTimeout(poll, state.failures > 1 ? RETRY_MS : RETRY_FIRST_MS);
      return;
    }
    state.failures = 0;
    if (answer.unauthorized) {
      setConnection("unauthorized");
      setTimeout(poll, RETRY_MS);
      return;
    }
    let again = false;
    try {
      again = !merge(answer.data || {}, since !== null);
      if (!again) render();
    } finally {
      setConnection(runFinished() ? "finished" : "live");
      setText("updated", `updated ${clock(new Date())}`);
      setTimeout(poll, again ? 0 : POLL_MS);
    }
  }

  // the server says "waiting" or "training"; a run is over once its counted rounds reach the target
  function runFinished() {
    const run = state.run;
    if (!run) return false;
    return run.phase === "finished" || (isNum(run.round) && isNum(run.rounds) && run.round >= run.rounds);
  }

  function phaseText(run) {
    return runFinished() ? "finished" : text(run.phase);
  }

  function setConnection(kind) {
    const live = $("live");
    if (live.dataset.state !== kind) live.dataset.state = kind;
    setText("status-line", STATUS_TEXT[kind]);
    $("status-line").title = STATUS_TEXT[kind];
    const banner = $("banner");
    banner.hidden = kind !== "unauthorized";
    if (kind === "unauthorized") setText("banner", STATUS_TEXT.unauthorized);
  }

  /* ---------------------------------------------------------------- render */

  function render() {
    renderHeader();
    renderTiles();
    renderCharts(false);
    renderTable(false);
    document.body.dataset.snapshot = String(state.snapshot);
    if (!state.rendered) {
      state.rendered = true;
      document.body.dataset.rendered = "1";
      window.sflamFirstRenderMs = performance.now();
    }
  }

  function renderHeader() {
    const run = state.run || {};
    setText("run-id", text(run.run_id));
    setText("scheme", SCHEMES[run.mode] || text(run.mode));
    setText("preset", text(run.preset));
    const phase = phaseText(run);
    setText("phase", phase);
    $("phase").dataset.phase = PHASES.includes(phase) ? phase : "other";
    setText("round", `${text(run.round)}/${text(run.rounds)}`);
    const share = isNum(run.round) && isNum(run.rounds) && run.rounds > 0
      ? Math.min(1, Math.max(0, run.round / run.rounds)) : 0;
    $("round-bar").style.width = `${(share * 100).toFixed(1)}%`;
    setText("plan-round", text(run.plan_round));
    setText("online", `${text(run.online)} online \u00b7 ${text(run.needed)} needed`);
    let allocation = DASH;
    if (run.bits === "auto") allocation = "SFLAM allocator";
    else if (run.bits !== null && run.bits !== undefined) allocation = `fixed ${run.bits}-bit`;
    setText("allocation", allocation);
  }

  function lastWith(field) {
    for (let i = state.records.length - 1; i >= 0; i -= 1) {
      if (isNum(state.records[i].rec[field])) return state.records[i];
    }
    return null;
  }

  function roundLabel(s) {
    const r = s.rec;
    return isNum(r.round) ? `plan ${s.plan} (round ${r.round})` : `plan round ${s.plan}`;
  }

  function renderTiles() {
    const acc = lastWith("accuracy");
    setText("tile-accuracy", acc ? fmtPct(acc.rec.accuracy) : DASH);
    let accNote = acc ? `plan ${acc.plan}` : "no evaluation yet";
    if (acc && isNum(acc.rec.validation_accuracy)) accNote = `val ${fmtPct(acc.rec.validation_accuracy)} \u00b7 ${accNote}`;
    setNote("tile-accuracy-note", accNote);

    const loss = lastWith("train_loss");
    setText("tile-loss", loss ? fmtLoss(loss.rec.train_loss) : DASH);
    let lossNote = loss ? `plan ${loss.plan}` : "no training yet";
    if (loss && isNum(loss.rec.test_loss)) lossNote = `test ${fmtLoss(loss.rec.test_loss)} \u00b7 ${lossNote}`;
    setNote("tile-loss-note", lossNote);

    let up = 0;
    let down = 0;
    let energy = 0;
    let reported = 0;
    for (const s of state.records) {
      up += s.up;
      down += s.down;
      energy += s.energy;
      reported += s.energyCount;
    }
    setText("tile-bytes-up", state.records.length ? fmtBytes(up) : DASH);
    setText("tile-bytes-down", state.records.length ? fmtBytes(down) : DASH);
    setText("tile-energy", reported ? fmtEnergy(energy) : DASH);
    setNote("tile-energy-note", reported ? `${reported} device-round reports` : "no device reported energy");

    const last = state.records[state.records.length - 1];
    const failures = last ? last.failed.length : null;
    setText("tile-failures", last ? String(failures) : DASH);
    $("tile-failures").classList.toggle("bad", Boolean(failures));
    setNote("tile-failures-note", last ? failureNote(last) : "no round yet");
    renderInFlight();
  }

  function failureNote(s) {
    const counts = new Map();
    for (const reason of s.failed) {
      const key = text(reason);
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    const parts = Array.from(counts, ([reason, n]) => (n > 1 ? `${reason} \u00d7${n}` : reason));
    const selected = Array.isArray(s.rec.selected) ? ` of ${s.rec.selected.length}` : "";
    return parts.length ? `plan ${s.plan}: ${parts.join(", ")}` : `plan ${s.plan}: none${selected}`;
  }

  function renderInFlight() {
    const run = state.run || {};
    const counts = new Map();
    for (const d of state.devices) {
      if (d.round_state && d.round_state !== "idle") counts.set(d.round_state, (counts.get(d.round_state) || 0) + 1);
    }
    const parts = ROUND_STATES.filter((k) => counts.has(k)).map((k) => `${counts.get(k)} ${k}`);
    if (isNum(run.round_started) && isNum(state.generated)) {
      setText("tile-inflight", fmtSeconds(Math.max(0, state.generated - run.round_started)));
      const deadline = isNum(run.deadline_s) ? `of ${fmtSeconds(run.deadline_s)} deadline` : "";
      setNote("tile-inflight-note", [parts.join(", "), deadline].filter(Boolean).join(" \u00b7 ") || DASH);
    } else {
      setText("tile-inflight", "none");
      setNote("tile-inflight-note", runFinished() ? "run finished" : text(run.phase));
    }
  }

  /* ---------------------------------------------------------------- svg helpers */

  function svg(tag, attrs, parent) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function svgText(parent, x, y, value, cls, anchor) {
    const node = svg("text", { x, y, class: cls || "tick" }, parent);
    if (anchor) node.setAttribute("text-anchor", anchor);
    node.textContent = value;
    return node;
  }

  function addTitle(node, value) {
    svg("title", {}, node).textContent = value;
  }

  const measure = { ctx: undefined, family: "sans-serif" };

  /** The width of value in the chart font at size px, from a canvas: no layout is forced. */
  function textWidth(value, size) {
    if (measure.ctx === undefined) {
      measure.ctx = document.createElement("canvas").getContext("2d");
      measure.family = getComputedStyle(document.body).fontFamily || measure.family;
    }
    if (!measure.ctx) return value.length * size * 0.58;
    measure.ctx.font = `${size}px ${measure.family}`;
    return measure.ctx.measureText(value).width;
  }

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    if (!(raw > 0)) return 1;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const n = raw / mag;
    return (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  }

  /** A y axis over values: nice bounds and ticks; zero forces 0 in, clamp bounds it. */
  function yAxis(values, { zero = false, clamp = null, ticks = 4 } = {}) {
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (zero) lo = Math.min(0, lo);
    if (lo === hi) {
      const d = Math.abs(hi) > 0 ? Math.abs(hi) * 0.1 : 1;
      lo = zero && lo === 0 ? 0 : lo - d;
      hi += d;
    }
    const step = niceStep(hi - lo, ticks);
    lo = Math.floor(lo / step) * step;
    hi = Math.ceil(hi / step) * step;
    if (clamp) {
      lo = Math.max(clamp[0], lo);
      hi = Math.min(clamp[1], hi);
    }
    const list = [];
    for (let v = lo; v <= hi + step * 1e-9; v += step) list.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return { lo, hi, ticks: list, step };
  }

  /** The smallest whole 1-2-5 step that puts at most maxTicks ticks between lo and hi. */
  function roundStep(lo, hi, maxTicks) {
    for (let mag = 1; ; mag *= 10) {
      for (const m of [1, 2, 5]) {
        const step = m * mag;
        if (Math.floor(hi / step) - Math.ceil(lo / step) + 1 <= maxTicks) return step;
      }
    }
  }

  function tickFormat(step) {
    const decimals = step >= 1 ? 0 : Math.min(6, Math.ceil(-Math.log10(step)));
    return (v) => v.toFixed(decimals);
  }

  /** The legend along the top of box; returns the y where the plot may start. */
  function legend(g, items, box) {
    const left = box.x + 4;
    const right = box.x + box.w - 4;
    let x = left;
    let y = box.y + 10;
    for (const item of items) {
      const node = svg("g", { class: "legend-item" }, g);
      const label = svgText(node, 0, 0, item.label, "legend");
      const width = 18 + textWidth(item.label, 11) + 12;
      if (x + width > right && x > left) {
        x = left;
        y += 15;
      }
      label.setAttribute("x", x + 18);
      label.setAttribute("y", y + 4);
      swatch(node, item, x, y);
      x += width;
    }
    return y + 12;
  }

  function swatch(g, item, x, y) {
    if (item.shape === "box") {
      svg("rect", { x, y: y - 5, width: 12, height: 10, rx: 2, class: `bar ${item.cls}` }, g);
    } else if (item.shape === "hollow") {
      svg("circle", { cx: x + 6, cy: y, r: 3.5, class: "pt hollow neutral" }, g);
    } else {
      svg("line", { x1: x, y1: y, x2: x + 14, y2: y, class: `line ${item.cls}${item.dashed ? " dashed" : ""}` }, g);
      svg("circle", { cx: x + 7, cy: y, r: 3, class: `pt ${item.cls}` }, g);
    }
  }

  /** The plot frame inside box under top: y grid with labels, x ticks on plan rounds. */
  function axes(g, box, top, yax, yFmt, xDomain) {
    const labels = yax.ticks.map(yFmt);
    const labelWidth = Math.max(...labels.map((label) => textWidth(label, 10.5)));
    const plot = {
      x0: box.x + labelWidth + 10,
      x1: box.x + box.w - 8,
      y0: box.y + box.h - 20,
      y1: top + 4,
    };
    const sx = (v) => plot.x0 + ((v - xDomain[0]) / (xDomain[1] - xDomain[0])) * (plot.x1 - plot.x0);
    const sy = (v) => plot.y0 - ((v - yax.lo) / (yax.hi - yax.lo || 1)) * (plot.y0 - plot.y1);
    yax.ticks.forEach((v, i) => {
      const y = sy(v);
      svg("line", { x1: plot.x0, x2: plot.x1, y1: y, y2: y, class: i === 0 ? "axis" : "grid" }, g);
      svgText(g, plot.x0 - 5, y + 3.5, labels[i], "tick", "end");
    });
    const step = roundStep(xDomain[0], xDomain[1], Math.max(4, Math.floor((plot.x1 - plot.x0) / 40)));
    for (let v = Math.ceil(xDomain[0] / step) * step; v <= xDomain[1]; v += step) {
      const x = sx(v);
      svg("line", { x1: x, x2: x, y1: plot.y0, y2: plot.y0 + 3, class: "axis" }, g);
      svgText(g, x, plot.y0 + 14, String(Math.round(v)), "tick", "middle");
    }
    svgText(g, box.x + 2, plot.y0 + 14, "plan", "tick axis-name");
    return { plot, sx, sy };
  }

  function noData(g, box, top, message) {
    svgText(g, box.x + box.w / 2, (top + box.y + box.h) / 2, message || "no data yet", "nodata", "middle");
  }

  function xDomain() {
    const first = state.records[0].plan;
    const last = state.records[state.records.length - 1].plan;
    return [first - 0.5, last + 0.5];
  }

  /** Line series over plan rounds; returns the number of markers drawn. */
  function lineChart(g, box, spec) {
    const series = spec.series;
    const items = series.map((s) => ({ label: s.label, cls: s.cls, dashed: s.dashed }));
    const all = series.flatMap((s) => s.points);
    if (!spec.noHollowLegend && all.some((p) => p.hollow)) items.push({ label: "not counted", shape: "hollow" });
    let legendBox = box;
    if (spec.title) {
      svgText(g, box.x + 4, box.y + 10, spec.title, "panel-title");
      legendBox = { x: box.x, y: box.y + 16, w: box.w, h: box.h - 16 };
    }
    const top = legend(g, items, legendBox);
    if (!all.length) {
      noData(g, box, top, spec.empty);
      return 0;
    }
    const yax = yAxis(all.map((p) => p.y), spec.y || {});
    const domain = xDomain();
    const { plot, sx, sy } = axes(g, box, top, yax, spec.yFmt || tickFormat(yax.step), domain);
    for (const s of series) {
      if (s.points.length > 1) {
        const pts = s.points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
        svg("polyline", { points: pts, class: `line ${s.cls}${s.dashed ? " dashed" : ""}` }, g);
      }
    }
    const slot = (plot.x1 - plot.x0) / (domain[1] - domain[0]);
    const radius = Math.max(1.5, Math.min(3.2, slot * 0.3));
    for (const s of series) {
      for (const p of s.points) {
        const dot = svg("circle", { cx: sx(p.x).toFixed(1), cy: sy(p.y).toFixed(1), r: radius,
          class: `pt ${s.cls}${p.hollow ? " hollow" : ""}` }, g);
        addTitle(dot, p.title);
      }
    }
    return all.length;
  }

  function point(s, value, label, shown) {
    let title = `${roundLabel(s)}\n${label}: ${shown}`;
    if (s.rec.counted === false) title += "\nnot counted";
    return { x: s.plan, y: value, hollow: s.rec.counted === false, title };
  }

  function seriesOf(pick, label, show) {
    const out = [];
    for (const s of state.records) {
      const v = pick(s);
      if (isNum(v)) out.push(point(s, v, label, show(v)));
    }
    return out;
  }

  /* ---------------------------------------------------------------- charts */

  function chartBox(node) {
    const rect = node.getBoundingClientRect();
    const w = Math.max(240, Math.round(rect.width) || 420);
    const h = Math.max(150, Math.round(rect.height) || 210);
    return { x: 0, y: 0, w, h };
  }

  /** The allocation chart shows unless the run has rounds and none of them has an allocator
   * summary (or it has none yet and its bits are fixed): then a note says there is nothing to compare. */
  function showAllocation() {
    if (state.records.some((s) => s.rec.allocator && typeof s.rec.allocator === "object")) return true;
    return !state.records.length && Boolean(state.run) && state.run.bits === "auto";
  }

  function renderCharts(force) {
    const allocation = showAllocation();
    const allocationNode = document.querySelector('svg.chart[data-chart="allocation"]');
    if (allocationNode.classList.contains("hidden") === allocation) allocationNode.classList.toggle("hidden", !allocation);
    if ($("allocation-note").hidden !== allocation) $("allocation-note").hidden = allocation;
    const nodes = Array.from(document.querySelectorAll("svg.chart[data-chart]")).filter((n) => CHARTS[n.dataset.chart]);
    const boxes = nodes.map(chartBox); // all sizes read before anything is drawn: one layout
    const drawn = state.drawn;
    const width = boxes.length ? boxes[0].w : 0;
    if (!force && drawn.version === state.roundsVersion && drawn.width === width && drawn.allocation === allocation) return;
    state.drawn = { version: state.roundsVersion, width, allocation };
    nodes.forEach((node, i) => {
      const box = boxes[i];
      const g = svg("g", {});
      let count = 0;
      if (state.records.length) count = CHARTS[node.dataset.chart](g, box);
      else noData(g, box, box.y);
      node.setAttribute("viewBox", `0 0 ${box.w} ${box.h}`);
      node.replaceChildren(g);
      node.dataset.points = String(count);
    });
  }

  const pct = (v) => `${v.toFixed(1)}%`;
  const percent = (v) => (isNum(v) ? v * 100 : null);

  const CHARTS = {
    accuracy(g, box) {
      return lineChart(g, box, {
        series: [
          { label: "test", cls: "c1", points: seriesOf((s) => percent(s.rec.accuracy), "test accuracy", pct) },
          { label: "validation", cls: "c2", dashed: true,
            points: seriesOf((s) => percent(s.rec.validation_accuracy), "validation accuracy", pct) },
        ],
        y: { clamp: [0, 100] },
        empty: "no evaluation yet",
      });
    },
    loss(g, box) {
      return lineChart(g, box, {
        series: [
          { label: "test", cls: "c1", points: seriesOf((s) => s.rec.test_loss, "test loss", fmtLoss) },
          { label: "train", cls: "c2", points: seriesOf((s) => s.rec.train_loss, "train loss", fmtLoss) },
        ],
        y: { zero: false },
      });
    },
    bytes(g, box) {
      return lineChart(g, box, {
        series: [
          { label: "up (devices \u2192 server)", cls: "c3", points: seriesOf((s) => s.up, "bytes up", fmtBytes) },
          { label: "down", cls: "c4", points: seriesOf((s) => s.down, "bytes down", fmtBytes) },
        ],
        y: { zero: true },
        yFmt: fmtBytes,
      });
    },
    energy(g, box) {
      return lineChart(g, box, {
        series: [{
          label: "sum over devices", cls: "c5",
          points: seriesOf((s) => (s.energyCount ? s.energy : null), "energy", fmtEnergy),
        }],
        y: { zero: true },
        empty: "no device reported energy",
      });
    },
    latency: latencyChart,
    allocation: allocationChart,
  };

  function latencyChart(g, box) {
    const cols = [];
    for (const s of state.records) {
      const phases = s.rec.phases_s && typeof s.rec.phases_s === "object" ? s.rec.phases_s : {};
      const parts = LATENCY_PHASES.map(([key]) => Math.max(0, num(phases[key])));
      cols.push({ s, parts, total: parts.reduce((a, b) => a + b, 0) });
    }
    const items = LATENCY_PHASES.map(([, label, cls]) => ({ label, cls, shape: "box" }));
    const top = legend(g, items, box);
    const yax = yAxis(cols.map((c) => c.total), { zero: true });
    const { plot, sx, sy } = axes(g, box, top, yax, tickFormat(yax.step), xDomain());
    const slot = (plot.x1 - plot.x0) / Math.max(1, cols.length);
    const width = Math.max(1, Math.min(22, slot * 0.7));
    for (const c of cols) {
      const col = svg("g", { class: c.s.rec.counted === false ? "col uncounted" : "col" }, g);
      let base = 0;
      c.parts.forEach((v, i) => {
        if (v <= 0) return;
        const y = sy(base + v);
        const h = Math.max(0.5, sy(base) - y);
        svg("rect", { x: (sx(c.s.plan) - width / 2).toFixed(1), y: y.toFixed(1), width: width.toFixed(1),
          height: h.toFixed(1), class: `bar ${LATENCY_PHASES[i][2]}` }, col);
        base += v;
      });
      addTitle(col, latencyTitle(c));
    }
    return cols.length;
  }

  function latencyTitle(c) {
    const lines = [roundLabel(c.s)];
    LATENCY_PHASES.forEach(([, label], i) => lines.push(`${label}: ${fmtSeconds(c.parts[i])}`));
    const duration = isNum(c.s.rec.duration_s) ? c.s.rec.duration_s : c.total;
    lines.push(`round: ${fmtSeconds(duration)}`);
    if (c.s.rec.counted === false) lines.push("not counted");
    return lines.join("\n");
  }

  function allocationChart(g, box) {
    if (!state.records.some((s) => s.rec.allocator && typeof s.rec.allocator === "object")) return 0;
    const pick = (field) => (s) => (s.rec.allocator ? s.rec.allocator[field] : null);
    const half = box.w / 2;
    const left = { x: box.x, y: box.y, w: half - 6, h: box.h };
    const right = { x: box.x + half + 6, y: box.y, w: half - 6, h: box.h };
    let count = lineChart(svg("g", {}, g), left, {
      series: [
        { label: "allocator", cls: "c1", points: seriesOf(pick("predicted_round_latency_s"), "predicted latency", fmtSeconds) },
        { label: "fixed", cls: "c2", dashed: true,
          points: seriesOf(pick("fixed_round_latency_s"), "fixed-allocation latency", fmtSeconds) },
      ],
      y: { zero: true },
      title: "round latency, s",
      noHollowLegend: true,
    });
    count += lineChart(svg("g", {}, g), right, {
      series: [
        { label: "allocator", cls: "c5", points: seriesOf(pick("predicted_energy_j"), "predicted energy", fmtEnergy) },
        { label: "fixed", cls: "c4", dashed: true, points: seriesOf(pick("fixed_energy_j"), "fixed-allocation energy", fmtEnergy) },
      ],
      y: { zero: true },
      title: "energy, J",
      noHollowLegend: true,
      empty: "no energy prediction",
    });
    return count;
  }

  /* ---------------------------------------------------------------- device table */

  const STRING_KEYS = new Set(["id", "profile", "status", "failure"]);

  function sortValue(d, key) {
    switch (key) {
      case "bits":
        return isNum(d.bits) ? d.bits * 1000 + num(d.bits_down) : isNum(d.bits_down) ? d.bits_down : null;
      case "round_state": {
        const rank = ROUND_STATES.indexOf(d.round_state); // the round's course: idle first, failed last
        return rank >= 0 ? rank : d.round_state ? ROUND_STATES.length : null;
      }
      case "rounds_done":
        return isNum(d.rounds_done) ? d.rounds_done * 1e6 - num(d.rounds_failed) : null;
      default: {
        const v = d[key];
        if (STRING_KEYS.has(key)) return v === null || v === undefined || v === "" ? null : String(v);
        return isNum(v) ? v : null;
      }
    }
  }

  function compareDevices(key, dir) {
    return (a, b) => {
      const va = sortValue(a, key);
      const vb = sortValue(b, key);
      if (va === null || vb === null) {
        if (va !== vb) return va === null ? 1 : -1; // missing values last, either direction
      } else {
        const c = typeof va === "string" ? collator.compare(va, vb) : va - vb;
        if (c) return c * dir;
      }
      return collator.compare(String(a.id), String(b.id)) * dir;
    };
  }

  function matches(d, terms) {
    const hay = [d.id, d.profile, d.status, d.round_state, d.failure]
      .map((v) => (v === null || v === undefined ? "" : String(v).toLowerCase())).join("\u0000");
    return terms.every((t) => hay.includes(t));
  }

  function visibleDevices() {
    const terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const list = terms.length ? state.devices.filter((d) => matches(d, terms)) : state.devices.slice();
    if (state.sort.key) list.sort(compareDevices(state.sort.key, state.sort.dir));
    return list;
  }

  function renderTable(force) {
    const key = [state.snapshot, state.sort.key, state.sort.dir, state.filter, state.page].join("|");
    if (!force && key === state.tableKey) return;
    const list = visibleDevices();
    const pages = Math.max(1, Math.ceil(list.length / PAGE_SIZE));
    state.page = Math.min(Math.max(1, state.page), pages);
    const start = (state.page - 1) * PAGE_SIZE;
    const rows = document.createDocumentFragment();
    for (const d of list.slice(start, start + PAGE_SIZE)) rows.appendChild(deviceRow(d));
    document.querySelector("#devices tbody").replaceChildren(rows);
    const total = state.devices.length;
    const noun = (n) => (n === 1 ? "device" : "devices");
    setText("device-count", list.length === total ? `${total} ${noun(total)}` : `${list.length} of ${total} ${noun(total)}`);
    setText("page-info", `page ${state.page} of ${pages}`);
    $("page-prev").disabled = state.page <= 1;
    $("page-next").disabled = state.page >= pages;
    $("devices-empty").hidden = list.length > 0;
    setText("devices-empty", total ? "no device matches the filter" : "no devices yet");
    renderSortArrows();
    state.tableKey = [state.snapshot, state.sort.key, state.sort.dir, state.filter, state.page].join("|");
  }

  function renderSortArrows() {
    for (const th of document.querySelectorAll("#devices thead th[data-key]")) {
      const active = th.dataset.key === state.sort.key;
      const arrow = th.querySelector(".arrow");
      if (arrow) arrow.textContent = active ? (state.sort.dir > 0 ? " \u25b2" : " \u25bc") : "";
      if (active) th.setAttribute("aria-sort", state.sort.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
      th.classList.toggle("sorted", active);
    }
  }

  function cell(tr, value, cls, title) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (value instanceof Node) td.appendChild(value);
    else td.textContent = value;
    if (title) td.title = title;
    tr.appendChild(td);
    return td;
  }

  function withSub(main, sub) {
    const frag = document.createDocumentFragment();
    frag.append(main);
    if (sub) {
      const span = document.createElement("span");
      span.className = "sub";
      span.textContent = sub;
      frag.append(span);
    }
    return frag;
  }

  function badge(value, cls) {
    const span = document.createElement("span");
    span.className = `badge ${cls}`;
    span.textContent = text(value);
    return span;
  }

  function deviceRow(d) {
    const tr = document.createElement("tr");
    tr.dataset.deviceId = String(d.id);
    if (d.status === "offline") tr.className = "offline";
    const id = String(d.id);
    cell(tr, id, "id mono", id);
    cell(tr, text(d.profile), "profile", d.backend ? `${text(d.profile)} (${d.backend})` : text(d.profile));
    cell(tr, badge(d.status, d.status === "online" ? "on" : "off"), "status");
    const rs = ROUND_STATES.includes(d.round_state) ? d.round_state : "unknown";
    cell(tr, badge(d.round_state, `st-${rs}`), "state");
    cell(tr, isNum(d.bits) || isNum(d.bits_down) ? `${text(d.bits)} / ${text(d.bits_down)}` : DASH, "num");
    cell(tr, withSub(fmtWatts(d.tx_power_w), fmtDbm(d.tx_power_w)), "num");
    cell(tr, fmtHz(d.bandwidth_hz), "num");
    const roundEnergy = isNum(d.round_energy_j) ? `last round ${fmtJ(d.round_energy_j)} J` : "";
    cell(tr, fmtJ(d.energy_j), "num", roundEnergy);
    cell(tr, text(d.steps), "num");
    cell(tr, `${text(d.rounds_done)} / ${text(d.rounds_failed)}`, isNum(d.rounds_failed) && d.rounds_failed > 0 ? "num has-failed" : "num");
    cell(tr, fmtAgo(d.last_seen, state.generated), "num");
    const failure = d.failure === null || d.failure === undefined ? "" : String(d.failure);
    cell(tr, failure || DASH, failure ? "failure bad" : "failure muted", failure);
    return tr;
  }

  /* ---------------------------------------------------------------- wiring */

  function onSort(event) {
    const th = event.target.closest("th[data-key]");
    if (!th) return;
    if (event.type === "keydown" && event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    const key = th.dataset.key;
    if (state.sort.key === key) state.sort.dir = -state.sort.dir;
    else state.sort = { key, dir: 1 };
    renderTable(true);
  }

  function onFilter(event) {
    state.filter = event.target.value.trim();
    state.page = 1;
    renderTable(true);
  }

  function onPage(delta) {
    return () => {
      state.page += delta;
      renderTable(true);
    };
  }

  let resizeTimer = 0;
  function onResize() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => renderCharts(false), 150);
  }

  function dropTokenFromAddress() {
    // The server sets its cookie when /?token=... is opened; keep the token out of the history.
    const url = new URL(window.location.href);
    if (!url.searchParams.has("token")) return;
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  function start() {
    dropTokenFromAddress();
    const thead = document.querySelector("#devices thead");
    thead.addEventListener("click", onSort);
    thead.addEventListener("keydown", onSort);
    $("device-filter").addEventListener("input", onFilter);
    $("page-prev").addEventListener("click", onPage(-1));
    $("page-next").addEventListener("click", onPage(1));
    window.addEventListener("resize", onResize);
    setConnection("connecting");
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
