// Small SVG charts drawn with DOM calls (no chart library, so the page works offline with no build step):
// per-token lines (actual vs predicted error norm), per-token bars (L0) and a histogram.

import { el, fmt, svg } from "./dom.js";

const W = 640;
const H = 120;
const PAD = { left: 44, right: 8, top: 8, bottom: 18 };

function frame(title, maxValue, attrs) {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title, ...attrs });
  const bottom = H - PAD.bottom;
  root.append(
    svg("line", { x1: PAD.left, y1: bottom, x2: W - PAD.right, y2: bottom, class: "axis" }),
    svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: bottom, class: "axis" }),
    svg("text", { x: PAD.left - 4, y: PAD.top + 8, class: "tick", "text-anchor": "end" }, fmt(maxValue)),
    svg("text", { x: PAD.left - 4, y: bottom, class: "tick", "text-anchor": "end" }, "0"),
  );
  return root;
}

function scale(n, maxValue) {
  const width = W - PAD.left - PAD.right;
  const height = H - PAD.top - PAD.bottom;
  const step = n > 1 ? width / (n - 1) : 0;
  return {
    x: (i) => PAD.left + (n > 1 ? i * step : width / 2),
    y: (v) => H - PAD.bottom - (maxValue > 0 ? (v / maxValue) * height : 0),
    band: n > 0 ? width / n : width,
  };
}

/** Lines over token positions; `series` = [{name, values (null = missing), cls}]; `labels` are the tokens. */
export function lineChart(title, series, labels) {
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const maxValue = Math.max(0, ...all);
  const root = frame(title, maxValue, { "data-chart": "lines" });
  const { x, y } = scale(labels.length, maxValue);
  for (const s of series) {
    const points = s.values.map((v, i) => (v === null || v === undefined ? null : `${x(i).toFixed(1)},${y(v).toFixed(1)}`));
    const drawn = points.filter((p) => p !== null);
    if (drawn.length === 0) continue;
    root.append(svg("polyline", { points: drawn.join(" "), class: `series ${s.cls}` }));
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      root.append(svg("circle", { cx: x(i), cy: y(v), r: 2.2, class: `dot ${s.cls}` },
        svg("title", {}, `${labels[i]} · ${s.name}: ${fmt(v)}`)));
    });
  }
  return el("figure", { class: "chart-box" }, el("figcaption", {}, title,
    series.map((s) => el("span", { class: `legend ${s.cls}` }, s.name))), root);
}

/** Bars over token positions. */
export function barChart(title, values, labels, cls = "bars") {
  const maxValue = Math.max(0, ...values);
  const root = frame(title, maxValue, { "data-chart": "bars" });
  const { band, y } = scale(values.length, maxValue);
  values.forEach((v, i) => {
    const top = y(v);
    root.append(svg("rect", { x: PAD.left + i * band + band * 0.1, y: top, width: Math.max(1, band * 0.8),
      height: H - PAD.bottom - top, class: cls }, svg("title", {}, `${labels[i]}: ${fmt(v)}`)));
  });
  return el("figure", { class: "chart-box" }, el("figcaption", {}, title), root);
}

/** A histogram with log-spaced bins (DashboardSide.histogram): one bar per bin, bin edges in the tooltips. */
export function histogram(title, edges, counts, cls = "bars") {
  const numbers = counts.map(Number);
  const maxValue = Math.max(0, ...numbers);
  const root = frame(title, maxValue, { "data-chart": "histogram" });
  const { band, y } = scale(numbers.length, maxValue);
  numbers.forEach((count, i) => {
    const top = y(count);
    root.append(svg("rect", { x: PAD.left + i * band, y: top, width: Math.max(1, band - 1), height: H - PAD.bottom - top,
      class: cls }, svg("title", {}, `[${fmt(edges[i])}, ${fmt(edges[i + 1])}): ${count}`)));
  });
  if (edges.length) {
    root.append(
      svg("text", { x: PAD.left, y: H - 4, class: "tick" }, fmt(edges[0])),
      svg("text", { x: W - PAD.right, y: H - 4, class: "tick", "text-anchor": "end" }, fmt(edges[edges.length - 1])));
  }
  return el("figure", { class: "chart-box" }, el("figcaption", {}, title), root);
}
