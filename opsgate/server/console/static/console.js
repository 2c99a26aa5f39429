// The live measurements chart of the console's action page: polls the page's own
// live.json and draws each signal and stop condition as SVG (values against their
// range, the moment a stop condition fired, the rollback). No library, same origin only.
"use strict";
(function () {
  const box = document.getElementById("live");
  if (!box) return;
  const NS = "http://www.w3.org/2000/svg";
  const W = 720, H = 160, L = 56, R = 12, T = 14, B = 22;

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const key in attrs) node.setAttribute(key, String(attrs[key]));
    if (parent) parent.appendChild(node);
    return node;
  }
  function text(parent, x, y, content, anchor) {
    const t = el("text", { x: x, y: y, "text-anchor": anchor || "start" }, parent);
    t.textContent = content; // text, never markup
    return t;
  }

  function draw(series, marks, t0, t1) {
    const svg = el("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H,
                            class: "chart", "data-series": series.name });
    const values = series.points.map(function (p) { return p[1]; });
    for (const bound of [series.min, series.max]) if (bound !== null) values.push(bound);
    let lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    if (!isFinite(lo) || !isFinite(hi)) { lo = 0; hi = 1; }
    if (hi === lo) { hi += 1; lo -= 1; }
    const pad = (hi - lo) * 0.1; lo -= pad; hi += pad;
    const x = function (t) { return L + (W - L - R) * (t - t0) / Math.max(1, t1 - t0); };
    const y = function (v) { return T + (H - T - B) * (1 - (v - lo) / (hi - lo)); };
    // The range: green where a signal passes, red where a stop condition halts.
    const top = series.max !== null ? y(series.max) : T;
    const bottom = series.min !== null ? y(series.min) : H - B;
    el("rect", { x: L, y: top, width: W - L - R, height: Math.max(0, bottom - top),
                 fill: series.kind === "signal" ? "#dff3e4" : "#fde2e0", class: "range" }, svg);
    el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }, svg);
    el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }, svg);
    text(svg, L - 4, T + 8, hi.toPrecision(3), "end");
    text(svg, L - 4, H - B, lo.toPrecision(3), "end");
    text(svg, L + 4, T + 8, series.name + (series.kind === "stop_condition" ? " (stop)" : ""));
    if (series.points.length) {
      const path = series.points.map(function (p, i) {
        return (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1);
      }).join(" ");
      el("path", { d: path, fill: "none", stroke: "#1a5fb4", "stroke-width": 1.5, class: "values" }, svg);
      for (const p of series.points) {
        el("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, class: "point",
                       fill: p[2] === "pass" ? "#11763a" : (p[2] === "fail" ? "#b42318" : "#888") }, svg);
      }
    }
    function vline(t, color, label) {
      if (t === null || t === undefined) return;
      el("line", { x1: x(t), y1: T, x2: x(t), y2: H - B, stroke: color, "stroke-dasharray": "4 3",
                   class: "mark" }, svg);
      const right = x(t) > W - R - 90; // keep the label inside the chart
      text(svg, right ? x(t) - 3 : x(t) + 3, H - 6, label, right ? "end" : "start");
    }
    vline(marks.run_started, "#555", "run");
    vline(marks.stopped, "#b42318", "stop: " + (marks.trigger || ""));
    if (marks.rollback_decided !== marks.stopped) vline(marks.rollback_decided, "#9a5b00", "rollback");
    vline(marks.rollback_verified, "#11763a", "rolled back");
    return svg;
  }

  function render(doc) {
    const points = [];
    for (const s of doc.series) for (const p of s.points) points.push(p[0]);
    const m = doc.marks || {};
    for (const k of ["run_started", "rollback_decided", "rollback_verified"]) if (m[k]) points.push(m[k]);
    const t0 = points.length ? Math.min.apply(null, points) : Date.now();
    const t1 = points.length ? Math.max.apply(null, points) : t0 + 1;
    box.replaceChildren.apply(box, doc.series.map(function (s) { return draw(s, m, t0, t1); }));
    const state = document.getElementById("state");
    if (state) state.textContent = doc.state;
    const status = document.getElementById("live-status");
    if (status) {
      let line = doc.state + (doc.running ? " (live)" : "");
      if (m.rollback_time !== null && m.rollback_time !== undefined) {
        line += ", rollback took " + m.rollback_time.toFixed(1) + "s";
      }
      status.textContent = line;
    }
    box.setAttribute("data-drawn", String(points.length));
    return doc.running;
  }

  function poll() {
    fetch(box.getAttribute("data-src"), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (doc) { if (render(doc)) setTimeout(poll, 2000); })
      .catch(function () { setTimeout(poll, 5000); });
  }
  poll();
})();
