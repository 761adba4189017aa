/* sflam fleet page: the device table, 50 rows a page, sorted by any column, filtered by any text;
 * re-rendered only when the snapshot, the sort, the filter or the page changed. */
"use strict";
(function (ns) {
  const { DASH, $, isNum, num, text, setText, fmtWatts, fmtDbm, fmtHz, fmtJ, fmtAgo } = ns;
  const PAGE_SIZE = 50;
  const ROUND_STATES = ["idle", "selected", "training", "done", "late", "failed"];
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  /** The table over ``state`` (devices, generated, snapshot, sort, filter, page, tableKey). */
  function deviceTable(state) {
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

    return { render: renderTable, onSort, onFilter, onPage };
  }

  Object.assign(ns, { ROUND_STATES, collator, deviceTable });
})(window.sflamPage = window.sflamPage || {});
