// Building the page without ever parsing markup: every value from the API
// reaches the document as a text node (textContent / createTextNode) or as an
// attribute value set through setAttribute, never through innerHTML.

// h("a", {href: "#/jobs/1", class: "x", onclick: fn}, "text", child, ...)
// Strings and numbers (BigInt included) among the children become text nodes.
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "text") {
      el.textContent = String(value);
    } else if (name === "hidden" || name === "disabled" || name === "required") {
      el[name] = Boolean(value);
    } else if (name === "value" && "value" in el) {
      el.value = String(value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  return append(el, ...children);
}

export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, ...children);
}

// ---- Numbers, sizes and times ------------------------------------------------------

const INT = new Intl.NumberFormat("en-US");

export function fmtInt(n) {
  if (n === null || n === undefined) return "–";
  return typeof n === "bigint" ? INT.format(n) : INT.format(Number(n));
}

export function fmtBytes(n) {
  let value = Number(n);
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${fmtInt(n)} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

export function fmtPercent(fraction) {
  return `${(fraction * 100).toFixed(fraction < 0.1 ? 2 : 1)}%`;
}

// "2026-11-28T11:42:56.123456Z" -> <time> showing "2026-11-28 11:42:56Z", the full
// stamp in its datetime attribute and tooltip.
export function timeEl(stamp) {
  if (!stamp) return h("span", {}, "–");
  const shown = String(stamp).replace("T", " ").replace(/\.\d+Z$/, "Z");
  return h("time", { datetime: stamp, title: stamp }, shown);
}

// Seconds as "5 s", "3 min", "2 h 5 min", "4 d".
export function fmtAge(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 90) return `${s} s`;
  const m = Math.round(s / 60);
  if (m < 90) return `${m} min`;
  const hrs = Math.floor(s / 3600);
  if (hrs < 48) return `${hrs} h ${Math.round((s - hrs * 3600) / 60)} min`;
  return `${Math.round(s / 86400)} d`;
}

// ---- Statuses ----------------------------------------------------------------------

export const ACTIVE = ["SCHEDULED", "RUNNING", "STOP_REQUESTED", "STOPPING"];
export const TERMINAL = ["COMPLETED", "STOPPED", "FAILED"];

// A status as a badge: its name as text (never colour alone), a colour and a
// symbol (drawn by the stylesheet) per status.
export function badge(status) {
  const known = /^[A-Z_]{1,32}$/.test(String(status)) ? String(status).toLowerCase() : "unknown";
  return h("span", { class: `badge status-${known}` }, String(status));
}

// ---- JSON as text ----------------------------------------------------------------------

// Indented JSON of a value parsed by api.parseJson (BigInt for integers that a
// double would round): the text of a <pre>, so markup in it stays text.
export function prettyJson(value, indent = "") {
  if (value === null || value === undefined) return "null";
  if (typeof value === "bigint") return value.toString();
  if (typeof value !== "object") return JSON.stringify(value);
  const inner = `${indent}  `;
  if (Array.isArray(value)) {
    if (value.length === 0) return "[]";
    const items = value.map((v) => inner + prettyJson(v, inner));
    return `[\n${items.join(",\n")}\n${indent}]`;
  }
  const keys = Object.keys(value);
  if (keys.length === 0) return "{}";
  const items = keys.map((k) => `${inner}${JSON.stringify(k)}: ${prettyJson(value[k], inner)}`);
  return `{\n${items.join(",\n")}\n${indent}}`;
}
