// Decompose view: the text's tokens in order; a token's top features at the chosen stage; a heatmap of one
// feature's value over every token (asked for exactly with a feature filter, so tokens where the feature
// is outside the top-k still get their value); per-token actual vs predicted error norm and L0 charts.

import { stream } from "./api.js";
import { barChart, lineChart } from "./charts.js";
import { el, errorBox, field, fill, fmt, heat, showToken } from "./dom.js";

const DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog. One, two, three: counting is easy.";

export class DecomposeView {
  constructor(app) {
    this.app = app;
    this.result = null; // {header, tokens: [{token, features}]}
    this.selected = null; // position of the selected token
    this.heatmap = null; // {stage, feature, values}
    this.text = el("textarea", { id: "decompose-text", rows: 4, spellcheck: "false", title: "Ctrl+Enter decomposes",
      onkeydown: (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) this.run(); } }, DEFAULT_TEXT);
    this.topK = el("input", { id: "decompose-topk", type: "number", min: 1, max: 64, value: 8 });
    this.stageSelect = el("select", { id: "decompose-stage", onchange: () => this.render() });
    this.button = el("button", { id: "decompose-run", class: "primary", onclick: () => this.run() }, "Decompose");
    this.status = el("div", { class: "status", id: "decompose-status" });
    this.output = el("div", { id: "decompose-output" });
    this.root = el("section", { id: "view-decompose", class: "view" },
      el("div", { class: "controls" }, this.text,
        el("div", { class: "row" }, field("Stage", this.stageSelect), field("Top features per token", this.topK),
          this.button)),
      this.status, this.output);
  }

  reset() {
    const stages = this.app.stages();
    fill(this.stageSelect, stages.map((s) => el("option", { value: s.name }, `${s.index}: ${s.name}`)));
    this.result = null;
    this.heatmap = null;
    fill(this.output);
    fill(this.status);
  }

  show() {}

  stageIndex() {
    return this.app.stages().findIndex((s) => s.name === this.stageSelect.value);
  }

  /** Colour the text by one feature (the "monitor" button of the feature view lands here). */
  async monitor(stage, feature) {
    this.stageSelect.value = stage;
    if (!this.result) await this.run();
    if (this.result) await this.colourBy(stage, feature);
  }

  async run() {
    const tokens = [];
    let header = null;
    this.button.disabled = true;
    fill(this.status, "Decomposing…");
    const started = performance.now();
    try {
      await stream("Decompose", {
        stack: this.app.stackName(), input: { text: this.text.value },
        options: { topK: Number(this.topK.value) || 0, includeError: true },
      }, (message) => {
        if (message.header) header = message.header;
        else if (message.chunk) tokens.push(...(message.chunk.tokens || []));
      });
      this.result = { header, tokens };
      this.selected = null;
      this.heatmap = null;
      fill(this.status, `${tokens.length} tokens, ${header.stages.length} stages, ` +
        `${Math.round(performance.now() - started)} ms`);
      this.render();
    } catch (error) {
      this.result = null;
      fill(this.status);
      fill(this.output, errorBox(error));
    } finally {
      this.button.disabled = false;
    }
  }

  /** The codes of stage `stageIndex` at every token: [{ids, values, l0, errorNorm, predictedErrorNorm}]. */
  codesAt(stageIndex) {
    return this.result.tokens.map((t) => (t.features || []).find((c) => (c.stage ?? 0) === stageIndex) || {});
  }

  render() {
    if (!this.result) return;
    const stageIndex = this.stageIndex();
    const codes = this.codesAt(stageIndex);
    const tokens = this.result.tokens.map((t) => t.token || {});
    const labels = tokens.map((t) => showToken(t.text ?? ""));
    const heatmap = this.heatmap && this.heatmap.stageIndex === stageIndex ? this.heatmap : null;
    const maxAbs = heatmap ? Math.max(...heatmap.values.map(Math.abs)) : 0;
    const cells = tokens.map((t, i) => el("span", {
      class: `tok${this.selected === i ? " selected" : ""}`, "data-position": t.position ?? 0,
      "data-value": heatmap ? heatmap.values[i] : undefined,
      style: heatmap ? `background:${heat(heatmap.values[i], maxAbs)}` : undefined,
      title: heatmap ? `${labels[i]}: ${fmt(heatmap.values[i])}` : `${labels[i]} (position ${t.position ?? 0})`,
      onclick: () => { this.selected = i; this.render(); },
    }, showToken(t.text ?? "")));
    fill(this.output,
      heatmap ? el("div", { class: "legend-line", id: "heatmap-legend" },
        `Colouring by ${heatmap.stage} feature ${heatmap.feature}: max |value| ${fmt(maxAbs)} `,
        el("button", { class: "link", onclick: () => this.app.openFeature(heatmap.stage, heatmap.feature) }, "open"),
        " ", el("button", { class: "link", onclick: () => { this.heatmap = null; this.render(); } }, "clear")) : null,
      el("div", { class: "columns" },
        el("div", { class: "tokens", id: "decompose-tokens" }, cells),
        el("aside", { class: "panel", id: "token-panel" }, this.tokenPanel(codes, labels))),
      this.charts(tokens, codes, labels),
      el("h3", {}, "Strongest features in this text"), this.strongest(codes));
  }

  /** Error norms and L0 per token. A leading special token (BOS) is left out: its activation norm is tens of
   * times the others' and would flatten every other point to zero. */
  charts(tokens, codes, labels) {
    const skip = tokens.length > 1 && /^<[^<>]+>$/.test(tokens[0].text ?? "") ? 1 : 0;
    const note = skip ? ` (${labels[0]} left out)` : "";
    const kept = codes.slice(skip);
    const names = labels.slice(skip);
    return el("div", { class: "charts" },
      lineChart(`Error norm per token${note}`, [
        { name: "actual", values: kept.map((c) => c.errorNorm ?? null), cls: "actual" },
        { name: "predicted", values: kept.map((c) => c.predictedErrorNorm ?? null), cls: "predicted" },
      ], names),
      barChart(`L0 per token (non-zero features)${note}`, kept.map((c) => c.l0 ?? 0), names));
  }

  tokenPanel(codes, labels) {
    if (this.selected === null) {
      return el("p", { class: "muted" }, "Click a token to see its features; click a feature to colour the text by it.");
    }
    const code = codes[this.selected];
    const ids = code.ids || [];
    const values = code.values || [];
    return [
      el("h3", {}, `Token ${this.selected}: “${labels[this.selected]}”`),
      el("p", { class: "muted" }, `L0 ${code.l0 ?? 0}; error ${fmt(code.errorNorm)}` +
        (code.predictedErrorNorm !== undefined ? ` (predicted ${fmt(code.predictedErrorNorm)})` : "")),
      this.featureList(ids.map((id, k) => [id, values[k] ?? 0]), "token-features"),
    ];
  }

  /** Each feature's largest |value| over the text (among the reported top-k), strongest first. Special tokens
   * (BOS, ...) are left out: the same features fire there whatever the text, and at a far larger norm. */
  strongest(codes) {
    const best = new Map();
    const special = this.result.tokens.map((t) => Boolean(t.token?.special));
    for (const [position, c] of codes.entries()) {
      if (special[position]) continue;
      (c.ids || []).forEach((id, k) => {
        const v = c.values?.[k] ?? 0;
        if (!best.has(id) || Math.abs(v) > Math.abs(best.get(id))) best.set(id, v);
      });
    }
    const ranked = [...best.entries()].sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 24);
    return this.featureList(ranked, "text-features");
  }

  featureList(pairs, id) {
    const stage = this.stageSelect.value;
    const top = Math.max(1e-9, ...pairs.map(([, v]) => Math.abs(v)));
    return el("ol", { class: "features", id }, pairs.map(([feature, value]) => el("li", {},
      el("button", { class: "feature", "data-feature": feature, onclick: () => this.colourBy(stage, feature) },
        `#${feature}`),
      el("span", { class: "bar", style: `width:${(60 * Math.abs(value) / top).toFixed(1)}px;` +
        `background:${heat(value, top)}` }),
      el("span", { class: "num" }, fmt(value)),
      el("button", { class: "link", onclick: () => this.app.openFeature(stage, feature) }, "dashboard"))));
  }

  async colourBy(stage, feature) {
    const stageIndex = this.app.stages().findIndex((s) => s.name === stage);
    const values = [];
    try {
      await stream("Decompose", {
        stack: this.app.stackName(), input: { text: this.text.value },
        options: { stages: [stage], topK: 1, featureFilter: [{ stage, ids: [feature] }] },
      }, (message) => {
        for (const t of message.chunk?.tokens || []) {
          const code = (t.features || [])[0] || {};
          const k = (code.ids || []).indexOf(feature);
          values.push(k >= 0 ? (code.values?.[k] ?? 0) : 0);
        }
      });
      this.heatmap = { stage, stageIndex, feature, values };
      this.stageSelect.value = stage;
      this.render();
    } catch (error) {
      fill(this.status, errorBox(error));
    }
  }
}
