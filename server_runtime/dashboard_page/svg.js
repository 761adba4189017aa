/* sflam fleet page: SVG chart primitives (axes, ticks, legends, line series), drawn by hand: no
 * chart library, nothing loaded from elsewhere. They know nothing of the run. */
"use strict";
(function (ns) {
  const SVG_NS = "http://www.w3.org/2000/svg";

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


  /** Line series over plan rounds (x within domain); returns the number of markers drawn. */
  function lineChart(g, box, spec, domain) {
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

  Object.assign(ns, { svg, svgText, addTitle, textWidth, yAxis, tickFormat, legend, axes, noData, lineChart });
})(window.sflamPage = window.sflamPage || {});
