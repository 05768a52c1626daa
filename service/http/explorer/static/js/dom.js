// Building the page without HTML strings: every text from a user or a model goes in as a text node
// (textContent), never through innerHTML, so a prompt such as "<img onerror=...>" shows as those characters.

const SVG = "http://www.w3.org/2000/svg";

/** An element with attributes (`class`, `data-*`, `on<event>` handlers, properties) and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attrs);
  append(node, children);
  return node;
}

/** An SVG element (charts). */
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  setAttributes(node, attrs);
  append(node, children);
  return node;
}

function setAttributes(node, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "style") node.style.cssText = value;
    else if (key === "value" || key === "checked" || key === "disabled") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace everything inside `node`. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A token's text made visible: spaces as middle dots at the edges, newlines and tabs as symbols. */
export function showToken(text) {
  if (text === "") return "∅";
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/^ /, "·").replace(/ $/, "·");
}

/** Background colour of a value given the largest |value| in view: orange for positive, blue for negative. */
export function heat(value, maxAbs) {
  if (!value || !maxAbs) return "";
  const alpha = Math.min(1, Math.abs(value) / maxAbs) * 0.85 + 0.08;
  return value > 0 ? `rgba(234, 120, 20, ${alpha.toFixed(3)})` : `rgba(40, 110, 230, ${alpha.toFixed(3)})`;
}

/** A number for people: 3 significant digits, exponent form for very small or large magnitudes. */
export function fmt(value, digits = 3) {
  if (value === undefined || value === null || Number.isNaN(value)) return "–";
  const number = Number(value);
  if (number === 0) return "0";
  const magnitude = Math.abs(number);
  if (magnitude < 1e-3 || magnitude >= 1e5) return number.toExponential(digits - 1);
  return Number(number.toPrecision(digits)).toString();
}

export function percent(value) {
  return value === undefined || value === null ? "–" : `${fmt(100 * Number(value))}%`;
}

/** The box that shows what went wrong: the server's code and message, as text. */
export function errorBox(error) {
  const code = error.code || error.name || "ERROR";
  return el("div", { class: "error", role: "alert" },
    el("strong", {}, code), " ", error.message || String(error),
    error.requestId ? el("span", { class: "muted" }, ` (request ${error.requestId})`) : null);
}

/** A labelled form control. */
export function field(label, control) {
  return el("label", { class: "field" }, el("span", {}, label), control);
}

export function select(options, value, attrs = {}) {
  return el("select", attrs, options.map(([optionValue, text]) =>
    el("option", { value: optionValue, selected: optionValue === value ? true : undefined }, text)));
}
