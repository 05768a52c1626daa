// Feature view: search (by text, token, explanation, or the densest features of a stage) and one feature's
// dashboard: explanation, density, histogram, top and quantile examples with the firing tokens highlighted,
// the logit lens, neighbours and co-occurring features, with "monitor" and "steer" buttons.

import { call } from "./api.js";
import { histogram, lineChart } from "./charts.js";
import { el, errorBox, field, fill, fmt, heat, percent, select, showToken } from "./dom.js";

const MODES = [["text", "Text activates"], ["token", "Token promoted"], ["explanation", "Explanation words"],
  ["list", "Browse by density"], ["steering", "Browse by measured steering"]];
const STEER_OPS = { add: "INTERVENTION_OP_ADD", set: "INTERVENTION_OP_SET" };
const SIDE_NAMES = { SIGN_POSITIVE: "positive", SIGN_NEGATIVE: "negative" };

export class FeatureView {
  constructor(app) {
    this.app = app;
    this.mode = select(MODES, "text", { id: "search-mode" });
    this.query = el("input", { id: "search-query", type: "search", placeholder: "a text, a token like \" cat\", or words",
      onkeydown: (e) => { if (e.key === "Enter") this.search(); } });
    this.searchStage = el("select", { id: "search-stage" });
    this.results = el("div", { id: "search-results" });
    this.openStage = el("select", { id: "feature-stage" });
    this.openId = el("input", { id: "feature-id", type: "number", min: 0, value: 0 });
    this.detail = el("div", { id: "feature-detail" });
    this.root = el("section", { id: "view-feature", class: "view" },
      el("div", { class: "controls row" },
        field("Search", this.mode), this.query, field("Stage", this.searchStage),
        el("button", { id: "search-run", class: "primary", onclick: () => this.search() }, "Search"),
        el("span", { class: "spacer" }),
        field("Open", this.openStage), this.openId,
        el("button", { id: "feature-open", onclick: () => this.app.openFeature(this.openStage.value,
          Number(this.openId.value)) }, "Open")),
      this.results, this.detail);
  }

  reset() {
    const stages = this.app.stages();
    fill(this.searchStage, el("option", { value: "" }, "all stages"),
      stages.map((s) => el("option", { value: s.name }, `${s.index}: ${s.name}`)));
    fill(this.openStage, stages.map((s) => el("option", { value: s.name }, `${s.index}: ${s.name}`)));
    fill(this.results);
    fill(this.detail, el("p", { class: "muted" }, "Search for features, or open one by stage and id."));
  }

  async show(params) {
    if (params.length >= 2) await this.load(params[0], Number(params[1]));
  }

  async search(pageToken = "") {
    const mode = this.mode.value;
    const stage = this.searchStage.value;
    const text = this.query.value;
    const body = { stack: this.app.stackName(), pageSize: 20, pageToken };
    let method = "SearchFeatures";
    if (mode === "list" || mode === "steering") {
      method = "ListFeatures";
      Object.assign(body, { stage: stage || this.app.stages()[0]?.name, descending: true,
        sort: mode === "list" ? "FEATURE_SORT_DENSITY" : "FEATURE_SORT_STEERING" });
    } else {
      if (stage) body.stages = [stage];
      if (mode === "text") body.text = { text };
      else if (mode === "token") body.token = /^\d+$/.test(text.trim()) ? { id: Number(text) } : { text };
      else body.explanation = text;
    }
    try {
      const response = await call(method, body);
      const rows = (response.features || []).map((f) => ({ stage: f.stage ?? response.stage, ...f }));
      const list = pageToken ? this.results.querySelector("tbody") : null;
      const rendered = rows.map((f) => el("tr", { class: "result", "data-feature": f.feature ?? 0 },
        el("td", {}, f.stage), el("td", {}, el("button", { class: "link",
          onclick: () => this.app.openFeature(f.stage, f.feature ?? 0) }, `#${f.feature ?? 0}`)),
        el("td", { class: "num" }, fmt(f.score ?? f.max ?? 0)), el("td", { class: "num" }, percent(f.density)),
        el("td", { class: "num" }, f.labelF1 === undefined ? "—" : fmt(f.labelF1)),
        el("td", {}, f.explanation || f.label || (f.steers === undefined ? "" : f.bestStrength
          ? `steers at ${f.bestStrength}` : "measured: does not steer"))));
      const more = response.nextPageToken
        ? el("button", { id: "search-more", onclick: (e) => { e.target.remove(); this.search(response.nextPageToken); } },
          "More")
        : null;
      if (list) {
        list.append(...rendered);
        if (more) this.results.append(more);
        return;
      }
      fill(this.results, el("p", { class: "muted" }, `${response.total ?? 0} matches`),
        el("table", { class: "results" }, el("thead", {}, el("tr", {}, ["stage", "feature",
          mode === "list" || mode === "steering" ? "max" : "score", "density", "label F1", "explanation or label"].map((h) =>
            el("th", {}, h)))),
        el("tbody", {}, rendered)), more);
    } catch (error) {
      fill(this.results, errorBox(error));
    }
  }

  async load(stage, feature) {
    fill(this.detail, el("p", { class: "muted" }, `Loading ${stage} #${feature}…`));
    this.openStage.value = stage;
    this.openId.value = feature;
    try {
      const response = await call("GetFeature", { stack: this.app.stackName(), stage, feature, topN: 12 });
      fill(this.detail, this.dashboard(response));
    } catch (error) {
      fill(this.detail, errorBox(error));
    }
  }

  dashboard(f) {
    const dash = f.dashboard;
    const sides = dash?.sides || [];
    const max = Math.max(0, ...sides.map((s) => s.max ?? 0));
    const stage = f.stage;
    const feature = f.feature ?? 0;
    return el("article", { class: "dashboard", "data-stage": stage, "data-feature": feature },
      el("header", {},
        el("h2", {}, `${stage} · feature ${feature}`),
        el("p", { class: "explanation", id: "feature-explanation" }, f.explanation || "(no explanation stored)"),
        f.explanationSource ? el("p", { class: "stats", id: "explanation-source" },
          `by ${f.explanationSource.explainer || "?"} (${f.explanationSource.promptVersion || "?"}, ` +
          `${(f.explanationSource.date || "").slice(0, 10)}): ` + ((f.explanationSource.scores || []).map((s) =>
            `${s.name} ${fmt(s.balancedAccuracy ?? 0)} (${s.examples ?? 0} examples)`).join(", ") || "not scored"))
          : null,
        el("p", { class: "stats" }, `density ${percent(f.density)} · decoder norm ${fmt(f.decoderNorm)}` +
          (dash ? ` · ${dash.tokens} tokens of ${dash.corpus || "text"} read` : "")),
        el("div", { class: "row" },
          el("button", { id: "feature-monitor", onclick: () => this.app.monitor(stage, feature) }, "Monitor in text"),
          el("button", { id: "feature-steer", class: "primary",
            onclick: () => this.app.steer(stage, feature, max, this.measuredStart(f.steerability)) }, "Steer with it"))),
      f.steerability ? this.steerability(f.steerability) : null,
      el("div", { class: "columns" },
        el("div", { class: "main-col" },
          dash ? sides.map((side) => this.side(side)) : el("p", { class: "muted" }, "This stage has no dashboard."),
          !dash && (f.topExamples || []).length ? el("ol", {}, f.topExamples.map((x) => el("li", {}, x.text))) : null),
        el("aside", { class: "panel" },
          this.tokens("Promotes (logit lens)", f.topTokens, "top-tokens"),
          this.tokens("Suppresses", f.bottomTokens, "bottom-tokens"),
          dash ? this.links("Neighbours", dash.neighbours, (n) => `cos ${fmt(n.cosine)}`) : null,
          dash ? this.links("Across stages", dash.crossStageNeighbours, (n) => `cos ${fmt(n.cosine)}`) : null,
          dash ? this.links("Fires with", (dash.cooccurring || []).map((c) => ({ ...c, stage })),
            (c) => `jaccard ${fmt(c.jaccard)}`) : null,
          f.metaLatents ? el("div", {}, el("h4", {}, "Meta-latents"), el("p", { class: "mono" },
            (f.metaLatents.ids || []).map((id, k) => `${id}: ${fmt(f.metaLatents.values?.[k])}`).join(", ") ||
            "none active")) : null)));
  }

  /** The measured best strength as an intervention, or null (the steer view then starts from 2x max). */
  measuredStart(s) {
    const best = s?.steers ? s.best : null;
    return best ? { op: STEER_OPS[best.op] ?? "INTERVENTION_OP_ADD", value: best.amount ?? 0 } : null;
  }

  /** Expression and fluency cost against strength, one chart per op and unit, from `featurewire-train steerability`. */
  steerability(s) {
    const families = new Map();
    for (const p of s.curve || []) {
      const key = `${p.op}:${p.unit}`;
      if (!families.has(key)) families.set(key, []);
      families.get(key).push(p);
    }
    const best = s.steers && s.best ? `steers at ${s.best.op}:${s.best.unit}:${fmt(s.best.value ?? 0)} ` +
      `(expression ${percent(s.best.expression)}, fluency cost ${fmt(s.best.fluencyCost ?? 0)} nats/token)`
      : "does not steer at any measured strength";
    return el("section", { class: "steerability", id: "feature-steerability", "data-steers": s.steers ? 1 : 0 },
      el("h3", {}, "Measured steerability"),
      el("p", { class: "stats" }, `${best} · output score ${fmt(s.outputScore ?? 0)} · default expression ` +
        `${percent(s.defaultExpression)} · steers = lift ≥ ${percent(s.expressionThreshold)} at fluency cost ≤ ` +
        `${fmt(s.fluencyThreshold ?? 0)} nats/token, repetition ≤ ${percent(s.repetitionThreshold)}`),
      [...families.entries()].map(([key, points]) => {
        points.sort((a, b) => (a.value ?? 0) - (b.value ?? 0));
        const labels = points.map((p) => `${key}:${fmt(p.value ?? 0)}`);
        return lineChart(`${key}: expression (share of tokens) and fluency cost (nats/token, ≥ 0 shown)`, [
          { name: "expression", cls: "actual", values: points.map((p) => p.expression ?? 0) },
          { name: "fluency cost", cls: "predicted", values: points.map((p) => Math.max(0, p.fluencyCost ?? 0)) },
        ], labels);
      }),
      s.best?.examples?.length ? el("p", { class: "mono" }, `steered: ${s.best.examples[0]}`) : null);
  }

  side(side) {
    const name = SIDE_NAMES[side.sign] || "positive";
    return el("section", { class: `side side-${name}` },
      el("h3", {}, `${name} side: fired on ${side.count ?? 0} tokens (${percent(side.density)}), ` +
        `mean ${fmt(side.mean)}, max ${fmt(side.max)}`),
      side.label ? this.label(side.label, name) : null,
      side.histogram?.counts?.length
        ? histogram("Histogram of |value| when firing", side.histogram.edges, side.histogram.counts) : null,
      el("h4", {}, "Top examples"),
      el("ol", { class: "examples top-examples" }, (side.topExamples || []).map((x) => this.example(x, side.max))),
      (side.quantiles || []).length ? el("h4", {}, "By activation range") : null,
      (side.quantiles || []).map((q) => el("details", { class: "quantile" },
        el("summary", {}, `|value| ${fmt(q.low)} – ${fmt(q.high)} (${percent(q.share)} of firings)`),
        el("ol", { class: "examples" }, (q.examples || []).map((x) => this.example(x, side.max))))));
  }

  label(label, name) {
    // The LLM-free token label: the rule's tokens with their share of the firing mass, and its exact scores.
    const rule = (label.tokens || []).slice(0, label.ruleSize ?? 0);
    return el("div", { class: "token-label", id: `label-${name}`, "data-f1": label.f1 ?? 0 },
      el("h4", {}, "Token label"),
      el("ul", { class: "chips" }, rule.map((t) => el("li", { title: `id ${t.id ?? 0}: ${t.firings ?? 0} firings ` +
        `of ${t.occurrences ?? 0} occurrences` }, showToken(t.text ?? ""), el("span", { class: "num" },
        percent(t.share))))),
      el("p", { class: "stats label-scores" }, `token F1 ${fmt(label.f1 ?? 0)} (precision ` +
        `${fmt(label.precision ?? 0)}, recall ${fmt(label.recall ?? 0)}): fires exactly on these tokens`));
  }

  example(x, max) {
    const index = x.index ?? 0;
    return el("li", { class: "example", title: `document ${x.document ?? 0}, position ${x.position ?? 0}` },
      el("span", { class: "num" }, fmt(x.value)),
      (x.tokens || []).map((t, i) => el("span", {
        class: `tok${i === index ? " firing" : ""}`, style: `background:${heat(t.value ?? 0, max)}`,
        title: fmt(t.value ?? 0) }, showToken(t.text ?? ""))));
  }

  tokens(title, list, id) {
    if (!list || !list.length) return null;
    return el("div", {}, el("h4", {}, title), el("ul", { class: "chips", id }, list.map((t) =>
      el("li", { title: `id ${t.id ?? 0}: ${fmt(t.score)}` }, showToken(t.text ?? ""),
        el("span", { class: "num" }, fmt(t.score))))));
  }

  links(title, list, describe) {
    if (!list || !list.length) return null;
    return el("div", {}, el("h4", {}, title), el("ul", { class: "chips" }, list.map((n) => el("li", {},
      el("button", { class: "link", onclick: () => this.app.openFeature(n.stage, n.feature ?? 0) },
        `${n.stage} #${n.feature ?? 0}`), el("span", { class: "num" }, describe(n))))));
  }
}
