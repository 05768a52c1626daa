// Steer view: a prompt, feature interventions (stage, feature, op, value with a slider, positions) and
// conditions; Generate streams the steered and the default continuation side by side, token by token, with
// condition events marked where they fired. Stop aborts the fetch, which cancels the call on the server.

import { stream } from "./api.js";
import { el, errorBox, field, fill, fmt, select, showToken } from "./dom.js";

const OPS = [["INTERVENTION_OP_SET", "set"], ["INTERVENTION_OP_ADD", "add"], ["INTERVENTION_OP_SCALE", "scale"],
  ["INTERVENTION_OP_CLAMP", "clamp"], ["INTERVENTION_OP_ABLATE", "ablate"]];
const SCOPES = [["POSITION_SCOPE_ALL", "all positions"], ["POSITION_SCOPE_PROMPT", "prompt"],
  ["POSITION_SCOPE_GENERATED", "generated"]];
const COMPARISONS = [["COMPARISON_ABOVE", "above"], ["COMPARISON_BELOW", "below"]];
const ACTIONS = [["CONDITION_ACTION_ENABLE_INTERVENTIONS", "enable edits"], ["CONDITION_ACTION_STOP", "stop"]];
const DEFAULT_PROMPT = "My favourite number is";

export class SteerView {
  constructor(app) {
    this.app = app;
    this.controller = null;
    this.prompt = el("textarea", { id: "steer-prompt", rows: 3, spellcheck: "false", title: "Ctrl+Enter generates",
      onkeydown: (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) this.run(); } }, DEFAULT_PROMPT);
    this.maxTokens = el("input", { id: "steer-max-tokens", type: "number", min: 1, value: 24 });
    this.temperature = el("input", { id: "steer-temperature", type: "number", min: 0, max: 10, step: 0.1, value: 0 });
    this.seed = el("input", { id: "steer-seed", type: "number", min: 0, value: 0 });
    this.interventions = el("div", { id: "interventions", class: "rows" });
    this.conditions = el("div", { id: "conditions", class: "rows" });
    this.runButton = el("button", { id: "steer-run", class: "primary", onclick: () => this.run() }, "Generate");
    this.stopButton = el("button", { id: "steer-stop", disabled: true, onclick: () => this.stop() }, "Stop");
    this.status = el("div", { id: "steer-status", class: "status" });
    this.steered = el("div", { id: "steered-output", class: "continuation" });
    this.unsteered = el("div", { id: "default-output", class: "continuation" });
    this.root = el("section", { id: "view-steer", class: "view" },
      el("div", { class: "controls" }, this.prompt,
        el("div", { class: "row" }, field("Max new tokens", this.maxTokens), field("Temperature", this.temperature),
          field("Seed", this.seed)),
        el("h3", {}, "Interventions ", el("button", { id: "add-intervention", onclick: () => this.addIntervention() },
          "+ add")),
        this.interventions,
        el("h3", {}, "Conditions ", el("button", { id: "add-condition", onclick: () => this.addCondition() }, "+ add")),
        this.conditions,
        el("div", { class: "row" }, this.runButton, this.stopButton)),
      this.status,
      el("div", { class: "columns two" },
        el("div", {}, el("h3", {}, "Steered"), this.steered),
        el("div", {}, el("h3", {}, "Default"), this.unsteered)));
  }

  reset() {
    fill(this.interventions);
    fill(this.conditions);
    fill(this.steered);
    fill(this.unsteered);
    fill(this.status);
  }

  show() {}

  stageOptions(value) {
    return select(this.app.stages().map((s) => [s.name, `${s.index}: ${s.name}`]), value, { class: "stage" });
  }

  /** One intervention row; `max` (the feature's largest value seen) sets the slider's range. */
  addIntervention({ stage, feature = 0, op = "INTERVENTION_OP_SET", value, max } = {}) {
    const span = max > 0 ? 4 * max : 20;
    const start = value ?? (max > 0 ? 2 * max : 5);
    const number = el("input", { type: "number", class: "value", step: "any", value: fmt(start, 4) });
    const slider = el("input", { type: "range", class: "slider", min: -span, max: span, step: span / 200, value: start });
    number.addEventListener("input", () => { slider.value = number.value; });
    slider.addEventListener("input", () => { number.value = fmt(Number(slider.value), 4); });
    const lo = el("input", { type: "number", class: "lo", step: "any", value: 0 });
    const hi = el("input", { type: "number", class: "hi", step: "any", value: fmt(start, 4) });
    const opSelect = select(OPS, op, { class: "op" });
    const clamp = el("span", { class: "clamp" }, field("lo", lo), field("hi", hi));
    const showClamp = () => { clamp.hidden = opSelect.value !== "INTERVENTION_OP_CLAMP"; };
    opSelect.addEventListener("change", showClamp);
    showClamp();
    const row = el("div", { class: "intervention row" },
      field("Stage", this.stageOptions(stage ?? this.app.stages()[0]?.name)),
      field("Feature", el("input", { type: "number", class: "feature", min: 0, value: feature })),
      field("Op", opSelect), field("Value", number), slider, clamp,
      field("Positions", select(SCOPES, "POSITION_SCOPE_ALL", { class: "scope" })),
      field("When", el("input", { type: "text", class: "condition-id", placeholder: "condition id (optional)" })),
      el("button", { class: "remove", title: "remove", onclick: () => row.remove() }, "×"));
    this.interventions.append(row);
    return row;
  }

  addCondition() {
    const id = `c${this.conditions.children.length + 1}`;
    const row = el("div", { class: "condition row" },
      field("Id", el("input", { type: "text", class: "id", value: id })),
      field("Stage", this.stageOptions(this.app.stages()[0]?.name)),
      field("Feature", el("input", { type: "number", class: "feature", min: 0, value: 0 })),
      field("When value is", select(COMPARISONS, "COMPARISON_ABOVE", { class: "comparison" })),
      field("Threshold", el("input", { type: "number", class: "threshold", step: "any", value: 1 })),
      field("Then", select(ACTIONS, "CONDITION_ACTION_STOP", { class: "action" })),
      el("button", { class: "remove", title: "remove", onclick: () => row.remove() }, "×"));
    this.conditions.append(row);
  }

  request() {
    const q = (row, selector) => row.querySelector(selector).value;
    const interventions = [...this.interventions.children].map((row) => {
      const op = q(row, ".op");
      const edit = { stage: q(row, ".stage"), feature: Number(q(row, ".feature")), op,
        positions: { scope: q(row, ".scope") } };
      if (op === "INTERVENTION_OP_CLAMP") Object.assign(edit, { lo: Number(q(row, ".lo")), hi: Number(q(row, ".hi")) });
      else if (op !== "INTERVENTION_OP_ABLATE") edit.value = Number(q(row, ".value"));
      const condition = q(row, ".condition-id").trim();
      if (condition) edit.conditionId = condition;
      return edit;
    });
    const conditions = [...this.conditions.children].map((row) => ({
      id: q(row, ".id"), stage: q(row, ".stage"), feature: Number(q(row, ".feature")),
      comparison: q(row, ".comparison"), threshold: Number(q(row, ".threshold")), action: q(row, ".action"),
    }));
    return {
      stack: this.app.stackName(), prompt: { text: this.prompt.value }, interventions, conditions, withDefault: true,
      sampling: { maxNewTokens: Number(this.maxTokens.value) || 0, temperature: Number(this.temperature.value) || 0,
        seed: String(Number(this.seed.value) || 0) },
    };
  }

  async run() {
    this.stop();
    const controller = new AbortController();
    this.controller = controller;
    fill(this.steered);
    fill(this.unsteered);
    this.runButton.disabled = true;
    this.stopButton.disabled = false;
    this.root.dataset.firstTokenMs = "";
    const clicked = performance.now();
    fill(this.status, "Generating…");
    const columns = { BRANCH_STEERED: this.steered, BRANCH_DEFAULT: this.unsteered };
    try {
      await stream("Generate", this.request(), (message) => {
        if (message.header) {
          for (const column of Object.values(columns)) {
            column.append(el("span", { class: "prompt" }, (message.header.prompt || []).map((t) => t.text ?? "").join("")));
          }
        } else if (message.token) {
          const t = message.token;
          const column = columns[t.branch] || this.steered;
          column.append(el("span", { class: "gen tok", title: `logprob ${fmt(t.logprob)}`,
            "data-position": t.position ?? 0 }, t.text ?? ""));
          if (t.branch === "BRANCH_STEERED" && !this.root.dataset.firstTokenMs) {
            this.root.dataset.firstTokenMs = String(Math.round(performance.now() - clicked));
          }
        } else if (message.condition) {
          const c = message.condition;
          this.steered.append(el("span", { class: "condition-event", title: `value ${fmt(c.value)}` },
            `⚑ ${c.conditionId} (${c.stage} #${c.feature ?? 0} = ${fmt(c.value)} at ${c.position ?? 0})`));
        } else if (message.finish) {
          const f = message.finish;
          (columns[f.branch] || this.steered).append(el("div", { class: "finish" },
            `${(f.reason || "").replace("FINISH_REASON_", "").toLowerCase()} after ${f.generatedTokens ?? 0} tokens`));
        }
      }, { signal: controller.signal });
      fill(this.status, `Done. First steered token after ${this.root.dataset.firstTokenMs || "–"} ms.`);
    } catch (error) {
      if (error.name === "AbortError") fill(this.status, "Stopped.");
      else fill(this.status, errorBox(error));
    } finally {
      if (this.controller === controller) this.controller = null;
      this.runButton.disabled = false;
      this.stopButton.disabled = this.controller === null;
    }
  }

  stop() {
    if (this.controller) this.controller.abort();
  }
}
