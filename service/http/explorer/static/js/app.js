// The explorer's shell: server info and the stack picker, the bearer token when the server wants one,
// and the three views behind hash routes (#decompose, #feature/<stage>/<id>, #steer).

import { ApiError, call, setBearerToken } from "./api.js";
import { DecomposeView } from "./decompose.js";
import { el, errorBox, fill } from "./dom.js";
import { FeatureView } from "./feature.js";
import { SteerView } from "./steer.js";

class Explorer {
  constructor() {
    this.info = null;
    this.stackPicker = document.getElementById("stack");
    this.serverLine = document.getElementById("server");
    this.notice = document.getElementById("notice");
    this.main = document.getElementById("main");
    this.views = { decompose: new DecomposeView(this), feature: new FeatureView(this), steer: new SteerView(this) };
    this.stackPicker.addEventListener("change", () => this.useStack());
    window.addEventListener("hashchange", () => this.route());
  }

  async start() {
    try {
      this.info = await call("GetServerInfo");
    } catch (error) {
      if (error instanceof ApiError && error.code === "UNAUTHENTICATED") return this.askToken(error);
      return fill(this.notice, errorBox(error));
    }
    fill(this.notice);
    const model = this.info.model || {};
    fill(this.serverLine, `${model.name || "no model"} · ${model.numLayers ?? 0} layers · d_model ${model.dModel ?? 0}` +
      ` · ${model.device || ""} ${model.dtype || ""} · featurewire ${this.info.versions?.server || ""}`);
    const stacks = this.info.stacks || [];
    fill(this.stackPicker, stacks.map((s) => el("option", { value: s.name }, `${s.name} (${(s.stages || []).length} stages)`)));
    if (!stacks.length) return fill(this.notice, errorBox(new ApiError("FAILED_PRECONDITION", "the server has no stack loaded")));
    for (const [name, view] of Object.entries(this.views)) {
      view.root.hidden = true;
      view.root.dataset.view = name;
      this.main.append(view.root);
    }
    this.useStack();
  }

  askToken(error) {
    const input = el("input", { id: "token", type: "password", placeholder: "bearer token", autocomplete: "off" });
    fill(this.notice, errorBox(error), el("form", { class: "row", onsubmit: (e) => {
      e.preventDefault();
      setBearerToken(input.value.trim());
      this.start();
    } }, input, el("button", { class: "primary" }, "Use token")));
  }

  stack() {
    return (this.info?.stacks || []).find((s) => s.name === this.stackPicker.value) || null;
  }

  stackName() {
    return this.stackPicker.value;
  }

  stages() {
    return (this.stack()?.stages || []).map((s) => ({ ...s, index: s.index ?? 0 }));
  }

  useStack() {
    for (const view of Object.values(this.views)) view.reset();
    document.body.dataset.ready = "true";
    this.route();
  }

  route() {
    if (!this.info) return;
    const [name, ...params] = (location.hash.replace(/^#\/?/, "") || "decompose").split("/").map(decodeURIComponent);
    const view = this.views[name] || this.views.decompose;
    for (const [key, other] of Object.entries(this.views)) {
      other.root.hidden = other !== view;
      document.getElementById(`nav-${key}`).classList.toggle("active", other === view);
    }
    view.show(params);
  }

  openFeature(stage, feature) {
    location.hash = `#feature/${encodeURIComponent(stage)}/${feature}`;
  }

  monitor(stage, feature) {
    location.hash = "#decompose";
    return this.views.decompose.monitor(stage, feature);
  }

  steer(stage, feature, max, measured = null) {
    // from the measured best strength when the feature has a steerability record, else the view's 2x max
    this.views.steer.addIntervention({ stage, feature, max, ...(measured || {}) });
    location.hash = "#steer";
  }
}

new Explorer().start();
