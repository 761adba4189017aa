/* sflam fleet page: polling, the run's state, the header, tiles and charts (format.js, svg.js and
 * table.js, loaded first, hold the formatting, the SVG primitives and the device table).
 *
 * Polls api/fleet every second (docs/dashboard.md), keeps the round records by plan_round, and
 * draws the header, the summary tiles, six per-round SVG charts and the paged device table.
 * Plain ES2020, no libraries, nothing loaded from outside the origin. Strings from the server
 * (device ids, profiles, failure reasons) only ever reach the page through textContent,
 * attributes or <title> text: never through innerHTML.
 */
"use strict";
(function () {
  const ns = window.sflamPage;
  const { DASH, $, isNum, num, fmtBytes, fmtEnergy, fmtJ, fmtSeconds, fmtPct, fmtLoss, text, clock, setText, setNote } = ns;
  const { svg, svgText, addTitle, textWidth, yAxis, tickFormat, legend, axes, noData, lineChart } = ns;
  const { ROUND_STATES } = ns;
  const API = "api/fleet";
  const POLL_MS = 1000;
  const RETRY_FIRST_MS = 2000;
  const RETRY_MS = 5000;
  const HEADERS_TIMEOUT_MS = 15000; // a server that does not answer counts as lost
  const BODY_TIMEOUT_MS = 120000; // the first answer of a long run with many devices is large
  const SCHEMES = { v1: "SFL-V1", v2: "SFL-V2", fl: "FL" };
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


  function xDomain() {
    const first = state.records[0].plan;
    const last = state.records[state.records.length - 1].plan;
    return [first - 0.5, last + 0.5];
  }


  /** A line chart over the rounds held. */
  const chart = (g, box, spec) => lineChart(g, box, spec, xDomain());

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
      return chart(g, box, {
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
      return chart(g, box, {
        series: [
          { label: "test", cls: "c1", points: seriesOf((s) => s.rec.test_loss, "test loss", fmtLoss) },
          { label: "train", cls: "c2", points: seriesOf((s) => s.rec.train_loss, "train loss", fmtLoss) },
        ],
        y: { zero: false },
      });
    },
    bytes(g, box) {
      return chart(g, box, {
        series: [
          { label: "up (devices \u2192 server)", cls: "c3", points: seriesOf((s) => s.up, "bytes up", fmtBytes) },
          { label: "down", cls: "c4", points: seriesOf((s) => s.down, "bytes down", fmtBytes) },
        ],
        y: { zero: true },
        yFmt: fmtBytes,
      });
    },
    energy(g, box) {
      return chart(g, box, {
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
    let count = chart(svg("g", {}, g), left, {
      series: [
        { label: "allocator", cls: "c1", points: seriesOf(pick("predicted_round_latency_s"), "predicted latency", fmtSeconds) },
        { label: "fixed", cls: "c2", dashed: true,
          points: seriesOf(pick("fixed_round_latency_s"), "fixed-allocation latency", fmtSeconds) },
      ],
      y: { zero: true },
      title: "round latency, s",
      noHollowLegend: true,
    });
    count += chart(svg("g", {}, g), right, {
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


  /* ---------------------------------------------------------------- wiring */

  const table = ns.deviceTable(state);
  const renderTable = table.render;

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
    thead.addEventListener("click", table.onSort);
    thead.addEventListener("keydown", table.onSort);
    $("device-filter").addEventListener("input", table.onFilter);
    $("page-prev").addEventListener("click", table.onPage(-1));
    $("page-next").addEventListener("click", table.onPage(1));
    window.addEventListener("resize", onResize);
    setConnection("connecting");
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
