/* sflam fleet page: number and text formatting, and the DOM text setters (textContent only). */
"use strict";
(function (ns) {
  const DASH = "\u2014";
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

  Object.assign(ns, { DASH, $, isNum, num, sig, fmtBytes, fmtEnergy, fmtJ, fmtWatts, fmtDbm, fmtHz, fmtSeconds, fmtAgo, fmtPct, fmtLoss, text, clock, setText, setNote });
})(window.sflamPage = window.sflamPage || {});
