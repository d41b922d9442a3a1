// A job's follow stream, GET /jobs/{id}/events?follow=true (text/event-stream),
// read with fetch() and a ReadableStream: EventSource cannot send the
// Authorization header. The parser follows the HTML standard's rules for
// event streams: LF, CR or CRLF line ends (also split across chunks), comment
// lines (":", the keep-alives), multi-line data joined with "\n", "id" and
// "retry" fields, an event dispatched at a blank line.

import { ApiError, authHeaders, parseJson, reportAuthProblem } from "./api.js";

export class EventStreamParser {
  // onEvent({type, data, id}) for each complete event; onRetry(ms) for "retry:".
  constructor(onEvent, onRetry = () => {}) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.buffer = "";
    this.first = true;
    this.lastEventId = "";
    this.reset();
  }

  reset() {
    this.type = "";
    this.data = [];
    this.hasData = false;
  }

  push(text) {
    if (this.first && text.length > 0) {
      this.first = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    this.buffer += text;
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf("\r", start);
      const lf = this.buffer.indexOf("\n", start);
      if (cr === -1 && lf === -1) break;
      let end;
      let next;
      if (cr !== -1 && (lf === -1 || cr < lf)) {
        // A CR at the very end may be the first half of a CRLF: wait for more.
        if (cr === this.buffer.length - 1) break;
        end = cr;
        next = this.buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
      } else {
        end = lf;
        next = lf + 1;
      }
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  // The stream ended: a last line without its line end counts (a CR included),
  // an event without its blank line does not (the standard discards it).
  end() {
    if (this.buffer.endsWith("\r")) this.push("\n");
    this.buffer = "";
    this.reset();
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment: keep-alive
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
    }
    switch (field) {
      case "event":
        this.type = value;
        break;
      case "data":
        this.data.push(value);
        this.hasData = true;
        break;
      case "id":
        if (!value.includes("\0")) this.lastEventId = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.onRetry(Number(value));
        break;
      default:
        break; // unknown fields are ignored
    }
  }

  dispatch() {
    if (this.hasData) {
      this.onEvent({
        type: this.type || "message",
        data: this.data.join("\n"),
        id: this.lastEventId,
      });
    }
    this.reset();
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

export const FIRST_DELAY_MS = 1000;
export const MAX_DELAY_MS = 30000;

// Follows ``url`` until ``signal`` aborts or the stream is over:
//   onEvent(event)       each event's JSON (its "data"), in order;
//   onState(state, info) "connecting", "live", "reconnecting" (info: delay in ms),
//                        "ended" (a clean end after isFinished() became true),
//                        "unsupported" (the service has no follow stream),
//                        "gone" (the job was deleted), "refused" (401/403),
//                        "failed" (info: an ApiError; no retry);
//   lastEventId          where to resume: the last event already shown;
//   isFinished()         true once the job's terminal event has arrived.
// A dropped stream (network error, 5xx, an end before the terminal event) is
// reopened with Last-Event-ID after a back-off that doubles up to 30 s (with
// jitter) and returns to 1 s once an event arrives.
export async function follow({ url, lastEventId, onEvent, onState, isFinished, signal }) {
  let resumeFrom = lastEventId ? String(lastEventId) : "";
  let baseDelay = FIRST_DELAY_MS;
  let delay = baseDelay;
  while (!signal.aborted) {
    onState("connecting");
    try {
      const headers = { Accept: "text/event-stream", ...authHeaders() };
      if (resumeFrom) headers["Last-Event-ID"] = resumeFrom;
      const response = await fetch(url, { headers, signal, cache: "no-store", redirect: "error" });
      const type = response.headers.get("Content-Type") ?? "";
      if (!response.ok || !type.startsWith("text/event-stream")) {
        const outcome = await refusal(response);
        if (outcome) {
          onState(outcome.state, outcome.error);
          return;
        }
        throw new Error(`follow stream answered ${response.status}`);
      }
      onState("live");
      const parser = new EventStreamParser(
        (event) => {
          resumeFrom = event.id || resumeFrom;
          delay = baseDelay;
          let data;
          try {
            data = parseJson(event.data);
          } catch {
            return; // not an event of ours
          }
          onEvent(data, event.type);
        },
        (ms) => {
          baseDelay = Math.min(Math.max(ms, 100), MAX_DELAY_MS);
        },
      );
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(value);
      }
      parser.end();
      if (isFinished()) {
        onState("ended");
        return;
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    if (signal.aborted) return;
    const wait = Math.round(delay * (0.8 + Math.random() * 0.4));
    onState("reconnecting", wait);
    await sleep(wait, signal);
    delay = Math.min(delay * 2, MAX_DELAY_MS);
  }
}

// A final answer (no point asking again), or null for one worth retrying.
async function refusal(response) {
  if (response.status >= 500 || response.status === 0) return null;
  if (response.ok) {
    // Answered, but not with a stream: a service that ignores ?follow=true.
    await response.body?.cancel();
    return { state: "unsupported", error: null };
  }
  let body = null;
  try {
    body = parseJson(await response.text());
  } catch {
    body = null;
  }
  const error = new ApiError(
    response.status,
    String(body?.error_code ?? `HTTP_${response.status}`),
    String(body?.error_message ?? "the follow stream was refused"),
  );
  if (response.status === 401 || response.status === 403) {
    reportAuthProblem(error);
    return { state: "refused", error };
  }
  if (error.code === "JOB_NOT_FOUND") return { state: "gone", error };
  // A service without the follow stream refuses the unknown parameter.
  if (error.code === "INVALID_QUERY_PARAMETERS" || response.status === 404) {
    return { state: "unsupported", error };
  }
  return { state: "failed", error };
}
