// The public JSON API, as curl uses it, with the operator's token.
//
// The token lives in sessionStorage only (this tab, until it closes): it is
// sent as "Authorization: Bearer ..." on every call, the follow stream
// included, and never put in a URL, the page or the console's log.

const TOKEN_KEY = "jobs-console-token";

export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

// Integers beyond 2^53 (descriptors keep them exactly, job IDs reach 2^63-1)
// are kept as BigInt from their source text instead of being rounded.
function keepBigIntegers(key, value, context) {
  if (
    typeof value === "number" &&
    !Number.isSafeInteger(value) &&
    context &&
    /^-?\d+$/.test(context.source)
  ) {
    return BigInt(context.source);
  }
  return value;
}

export function parseJson(text) {
  return JSON.parse(text, keepBigIntegers);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// 401 and 403 are also told to whoever listens (app.js: the token prompt, the
// read-only mode), wherever they come from.
const authListeners = [];

export function onAuthProblem(listener) {
  authListeners.push(listener);
}

export function reportAuthProblem(error) {
  for (const listener of authListeners) listener(error);
}

// api("GET", "/jobs?status=all") -> {status, body, date}; a non-2xx answer
// throws an ApiError with the service's error_code and error_message.
export async function api(method, path, { body, signal } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  const init = { method, headers, signal, cache: "no-store", redirect: "error" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "NETWORK", "the service could not be reached");
  }
  const date = response.headers.get("Date");
  const text = response.status === 204 ? "" : await response.text();
  let parsed = null;
  if (text) {
    try {
      parsed = parseJson(text);
    } catch {
      parsed = null;
    }
  }
  if (!response.ok) {
    const code = parsed?.error_code ?? `HTTP_${response.status}`;
    const message = parsed?.error_message ?? (response.statusText || "request failed");
    const error = new ApiError(response.status, String(code), String(message));
    if (response.status === 401 || response.status === 403) reportAuthProblem(error);
    throw error;
  }
  return { status: response.status, body: parsed, date };
}

// What this token may do, decided by one harmless admin request: DELETE /jobs
// with an empty job_ids list deletes nothing by definition, and answers 204
// (admin token, or an open service), 403 (the worker token: read-only) or 401
// (no token, or a wrong one).
export async function probeRole() {
  try {
    await api("DELETE", "/jobs", { body: { job_ids: [] } });
    return token() ? "admin" : "open";
  } catch (error) {
    if (error.status === 403) return "reader";
    if (error.status === 401) return "none";
    throw error;
  }
}

// The service's clock, from a response's Date header, as an offset to add to
// Date.now() (0 when unknown): heartbeat ages are measured on the database's clock.
export function clockOffset(dateHeader) {
  const server = Date.parse(dateHeader ?? "");
  return Number.isNaN(server) ? 0 : server - Date.now();
}
