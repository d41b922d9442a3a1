// The console's pages: the jobs list, one job, the workers, the clean-up.
// Each is render(main, route, ctx); ctx.signal aborts when the page is left
// (its requests and the follow stream with it), ctx.canAct() says whether the
// token may stop, delete, retry and clean up, ctx.confirm() asks first.

import { api, clockOffset } from "./api.js";
import {
  TERMINAL,
  append,
  badge,
  fmtAge,
  fmtBytes,
  fmtInt,
  fmtPercent,
  h,
  prettyJson,
  replace,
  timeEl,
} from "./dom.js";
import { follow } from "./follow.js";

const NODE_ID = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;
const JOB_ID = /^[1-9][0-9]{0,18}$/;
const PAGE_SIZE = 50;
const READ_ONLY_WHY =
  "The worker token is read-only here: stopping, deleting, retrying and cleaning up need the admin token.";

function errorText(error) {
  if (error.status === 403) return `403 FORBIDDEN: ${error.message}. ${READ_ONLY_WHY}`;
  if (error.status) return `${error.status} ${error.code}: ${error.message}`;
  return String(error.message);
}

function section(title, ...children) {
  const id = `h-${title.toLowerCase().replace(/[^a-z]+/g, "-")}`;
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), ...children);
}

// ---- Jobs list ----------------------------------------------------------------------

const STATUS_FILTERS = [
  ["active", "Active"],
  ["terminal", "Terminal"],
  ["all", "All"],
  ["scheduled", "Scheduled"],
  ["running", "Running"],
  ["stop_requested", "Stop requested"],
  ["stopping", "Stopping"],
  ["completed", "Completed"],
  ["stopped", "Stopped"],
  ["failed", "Failed"],
];

export function jobsHash({ status = "active", node = "", after = "" } = {}) {
  const q = new URLSearchParams();
  if (status !== "active") q.set("status", status);
  if (node) q.set("node", node);
  if (after) q.set("after", String(after));
  const query = q.toString();
  return `#/jobs${query ? `?${query}` : ""}`;
}

async function renderJobs(main, route, ctx) {
  const p = route.params;
  const status = STATUS_FILTERS.some(([v]) => v === p.get("status")) ? p.get("status") : "active";
  const node = NODE_ID.test(p.get("node") ?? "") ? p.get("node") : "";
  const after = JOB_ID.test(p.get("after") ?? "") ? p.get("after") : "";

  const select = h(
    "select",
    { id: "filter-status", name: "status" },
    STATUS_FILTERS.map(([value, label]) => h("option", { value }, label)),
  );
  select.value = status;
  const nodeInput = h("input", {
    id: "filter-node",
    name: "node",
    type: "text",
    value: node,
    placeholder: "any node",
    pattern: "[A-Za-z][A-Za-z0-9_.\\-]*",
    maxlength: 128,
    spellcheck: "false",
    autocomplete: "off",
    title: "A node ID: a letter, then letters, digits, '.', '_' or '-'",
  });
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter jobs" },
    h("p", {}, h("label", { for: "filter-status" }, "Status"), select),
    h("p", {}, h("label", { for: "filter-node" }, "Node"), nodeInput),
    h("p", {}, h("button", { type: "submit" }, "Show")),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const wanted = jobsHash({ status: select.value, node: nodeInput.value.trim() });
    if (location.hash === wanted) ctx.rerender();
    else location.hash = wanted;
  });
  const results = h("div", { id: "jobs-results", "aria-live": "polite", "aria-busy": "true" });
  append(main, h("h1", { tabindex: -1 }, "Jobs"), form, results);

  const query = new URLSearchParams({ status, limit: String(PAGE_SIZE) });
  if (node) query.set("node_id", node);
  if (after) query.set("last_job_id", after);
  const { body } = await api("GET", `/jobs?${query}`, { signal: ctx.signal });
  results.setAttribute("aria-busy", "false");

  const label = STATUS_FILTERS.find(([v]) => v === status)[1].toLowerCase();
  const what = `${status === "all" ? "" : `${label} `}jobs${node ? ` of ${node}` : ""}`;
  if (body.jobs.length === 0) {
    replace(results, h("p", { class: "empty" }, `No ${what}${after ? " past this point" : ""}.`));
  } else {
    const rows = body.jobs.map((job) =>
      h(
        "tr",
        { "data-job-id": String(job.id) },
        h("td", {}, h("a", { href: `#/jobs/${job.id}` }, String(job.id))),
        h("td", {}, badge(job.status)),
        h("td", {}, h("a", { href: jobsHash({ status, node: job.node_id }), class: "node" }, job.node_id)),
        h("td", { class: "line", "data-label": "Created" }, timeEl(job.created_at)),
        h("td", { class: "line", "data-label": "Updated" }, timeEl(job.updated_at)),
      ),
    );
    const first = body.jobs[0].id;
    const last = body.jobs[body.jobs.length - 1].id;
    replace(
      results,
      h(
        "p",
        { class: "summary", id: "jobs-summary" },
        `${fmtInt(body.jobs.length)} ${what}, newest first: IDs ${first} to ${last}.`,
      ),
      h(
        "div",
        { class: "scroll" },
        h(
          "table",
          { class: "list stack", id: "jobs-table" },
          h("caption", { class: "sr-only" }, `${what}, newest first`),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "ID"),
              h("th", { scope: "col" }, "Status"),
              h("th", { scope: "col" }, "Node"),
              h("th", { scope: "col" }, "Created"),
              h("th", { scope: "col" }, "Updated"),
            ),
          ),
          h("tbody", {}, rows),
        ),
      ),
    );
  }
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  if (after) {
    pager.append(
      h(
        "button",
        { type: "button", id: "first-page", onclick: () => (location.hash = jobsHash({ status, node })) },
        "First page",
      ),
    );
  }
  if (body.next_cursor !== null) {
    const next = jobsHash({ status, node, after: body.next_cursor });
    pager.append(
      h("button", { type: "button", id: "next-page", onclick: () => (location.hash = next) }, "Next page"),
    );
  }
  if (pager.childElementCount) results.append(pager);
}

// ---- One job --------------------------------------------------------------------------

function blockNumber(value) {
  if (typeof value === "bigint") return value >= 0n ? Number(value) : null;
  if (typeof value === "number") return Number.isInteger(value) && value >= 0 ? value : null;
  if (typeof value === "string" && /^[0-9]{1,19}$/.test(value)) return Number(value);
  return null;
}

// One table's entry: blocks covered against the descriptor's end_block when it
// has one (from its start_block, else 0), otherwise the chain's files and size.
function progressItem(name, table, descriptor) {
  const end = blockNumber(descriptor?.end_block);
  const start = blockNumber(descriptor?.start_block) ?? 0;
  const files = Number(table.files_count);
  const facts = [`${fmtInt(files)} file${files === 1 ? "" : "s"}`, fmtBytes(table.total_size_bytes)];
  let bar = null;
  if (end !== null && end >= start) {
    const total = end - start + 1;
    let covered = 0;
    if (table.current_block !== null && table.start_block !== null) {
      const from = Math.max(Number(table.start_block), start);
      const to = Math.min(Number(table.current_block), end);
      covered = Math.max(0, to - from + 1);
    }
    const label = `${fmtInt(covered)} of ${fmtInt(total)} blocks (${fmtPercent(covered / total)})`;
    facts.unshift(label);
    bar = h("progress", { max: total, value: covered, "aria-label": `${name}: ${label}` });
  } else if (table.current_block !== null) {
    facts.unshift(`blocks ${fmtInt(table.start_block)} to ${fmtInt(table.current_block)}`);
  } else {
    facts.unshift("no blocks yet");
  }
  return h(
    "li",
    { "data-table": name },
    h("p", { class: "table-name" }, h("code", {}, name)),
    bar,
    h("p", { class: "facts" }, facts.join(" · ")),
  );
}

function eventItem(event) {
  return h(
    "li",
    { "data-event-id": String(event.id) },
    h(
      "p",
      { class: "event-head" },
      timeEl(event.created_at),
      " ",
      badge(event.event_type),
      event.node_id === null || event.node_id === undefined ? null : [" on ", h("code", {}, event.node_id)],
    ),
    event.detail === null || event.detail === undefined
      ? null
      : h("pre", { class: "json detail" }, prettyJson(event.detail)),
  );
}

const LIVE_TEXT = {
  connecting: "Connecting to the live stream…",
  live: "Live: new events appear here as they happen.",
  ended: "Finished: the job is terminal, no more events will come.",
  unsupported:
    "Live updates are not available from this service (it has no follow stream): " +
    "reload to see new events.",
  gone: "This job no longer exists.",
  refused: "The live stream was refused for this token.",
  idle: "The job is terminal: no live stream.",
};

async function renderJob(main, route, ctx) {
  const id = route.id;
  const { signal } = ctx;
  let job;
  let progress;
  let events;
  try {
    [job, progress, events] = await Promise.all([
      api("GET", `/jobs/${id}`, { signal }).then((r) => r.body),
      api("GET", `/jobs/${id}/progress`, { signal }).then((r) => r.body),
      api("GET", `/jobs/${id}/events`, { signal }).then((r) => r.body.events),
    ]);
  } catch (error) {
    if (error.code === "JOB_NOT_FOUND") {
      append(
        main,
        h("h1", { tabindex: -1 }, `Job ${id}`),
        h("p", { class: "banner warn" }, `There is no job ${id} (it may have been deleted).`),
        h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")),
      );
      return;
    }
    throw error;
  }

  const heading = h("h1", { tabindex: -1 });
  const actions = h("p", { class: "actions admin-only", id: "actions" });
  const outcome = h("p", { id: "action-status", class: "outcome", role: "status" });
  const details = h("dl", { class: "fields", id: "job-fields" });
  const progressBox = h("div", { id: "progress" });
  const descriptor = h("pre", { class: "json", id: "descriptor", tabindex: 0 });
  const live = h("p", { id: "live", class: "live", role: "status" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  append(
    main,
    heading,
    actions,
    outcome,
    section("Details", details),
    section("Progress", progressBox),
    section("Descriptor", descriptor),
    section("Events", live, timeline),
  );

  const seen = new Set();
  let lastEvent = null;
  function addEvents(list) {
    for (const event of list) {
      const key = String(event.id);
      if (seen.has(key)) continue;
      seen.add(key);
      timeline.append(eventItem(event));
      lastEvent = event;
    }
  }

  function showJob(current) {
    job = current;
    replace(heading, `Job ${job.id} `, badge(job.status));
    replace(
      details,
      h("dt", {}, "Status"),
      h("dd", { id: "job-status" }, badge(job.status)),
      h("dt", {}, "Node"),
      h("dd", {}, h("a", { href: jobsHash({ status: "all", node: job.node_id }) }, job.node_id)),
      h("dt", {}, "Created"),
      h("dd", {}, timeEl(job.created_at)),
      h("dt", {}, "Updated"),
      h("dd", {}, timeEl(job.updated_at)),
    );
    descriptor.textContent = prettyJson(job.descriptor);
    showActions();
  }

  function showProgress(current) {
    progress = current;
    const names = Object.keys(progress.tables);
    if (names.length === 0) {
      replace(progressBox, h("p", { class: "empty" }, "No files registered yet."));
      return;
    }
    const note = blockNumber(job.descriptor?.end_block) === null
      ? h("p", { class: "hint" }, "The descriptor has no end_block: files and size only.")
      : null;
    replace(
      progressBox,
      note,
      h(
        "ul",
        { class: "progress-list" },
        names.map((name) => progressItem(name, progress.tables[name], job.descriptor)),
      ),
    );
  }

  function showActions() {
    actions.replaceChildren();
    actions.hidden = !ctx.canAct();
    if (!ctx.canAct()) return;
    if (job.status === "SCHEDULED" || job.status === "RUNNING") {
      actions.append(h("button", { type: "button", id: "stop", onclick: stopJob }, "Stop"));
    }
    if (job.status === "FAILED") {
      actions.append(h("button", { type: "button", id: "retry", onclick: retryJob }, "Retry…"));
    }
    if (TERMINAL.includes(job.status)) {
      actions.append(
        h("button", { type: "button", id: "delete", class: "danger", onclick: deleteJob }, "Delete"),
      );
    }
    if (!actions.childElementCount) {
      const why = `No action: a ${job.status} job is on its way to a terminal status.`;
      actions.append(h("span", { class: "hint" }, why));
    }
  }

  async function refresh({ withEvents = false } = {}) {
    try {
      const [current, currentProgress, currentEvents] = await Promise.all([
        api("GET", `/jobs/${id}`, { signal }).then((r) => r.body),
        api("GET", `/jobs/${id}/progress`, { signal }).then((r) => r.body),
        withEvents ? api("GET", `/jobs/${id}/events`, { signal }).then((r) => r.body.events) : [],
      ]);
      showJob(current);
      showProgress(currentProgress);
      addEvents(currentEvents);
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error.code === "JOB_NOT_FOUND") {
        actions.hidden = true;
        outcome.textContent = `Job ${id} no longer exists.`;
        return;
      }
      outcome.textContent = errorText(error);
    }
  }

  let refreshTimer = null;
  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => refresh(), 150);
  }
  signal.addEventListener("abort", () => clearTimeout(refreshTimer));

  // The follow stream: from the last event shown on, until the terminal one.
  let following = false;
  let unsupported = false;
  function setLive(state, info) {
    live.dataset.state = state;
    if (state === "unsupported") unsupported = true;
    if (state === "reconnecting") {
      live.textContent = `The live stream dropped: reconnecting in ${Math.ceil(info / 1000)} s…`;
    } else if (state === "failed") {
      live.textContent = `The live stream failed: ${errorText(info)}`;
    } else {
      live.textContent = LIVE_TEXT[state] ?? "";
    }
  }
  function startFollowing() {
    if (following || unsupported || signal.aborted) return;
    if (TERMINAL.includes(job.status)) {
      setLive("idle");
      return;
    }
    following = true;
    follow({
      url: `/jobs/${id}/events?follow=true`,
      lastEventId: lastEvent?.id,
      signal,
      isFinished: () => TERMINAL.includes(lastEvent?.event_type),
      onState: setLive,
      onEvent: (event) => {
        if (seen.has(String(event.id))) return;
        addEvents([event]);
        refreshSoon();
      },
    }).finally(() => {
      following = false;
    });
  }

  async function act(run, done) {
    outcome.textContent = "";
    for (const button of actions.querySelectorAll("button")) button.disabled = true;
    try {
      await run();
      if (done) outcome.textContent = done;
    } catch (error) {
      if (error.name === "AbortError") return;
      outcome.textContent = errorText(error);
    }
    await refresh({ withEvents: true });
    startFollowing();
  }

  async function stopJob() {
    const ok = await ctx.confirm({
      title: `Stop job ${id}?`,
      text:
        `Job ${id} (${job.status} on ${job.node_id}) becomes STOP_REQUESTED; ` +
        "its worker stops it when it next hears from the service.",
      ok: "Stop the job",
    });
    if (!ok) return;
    await act(() => api("PUT", `/jobs/${id}/stop`, { signal }), `Stop requested for job ${id}.`);
  }

  async function deleteJob() {
    const ok = await ctx.confirm({
      title: `Delete job ${id}?`,
      text: `Job ${id} (${job.status}) is deleted with its events, tables and files. This cannot be undone.`,
      ok: "Delete the job",
    });
    if (!ok) return;
    try {
      await api("DELETE", `/jobs/${id}`, { signal });
    } catch (error) {
      if (error.name === "AbortError") return;
      outcome.textContent = errorText(error);
      return;
    }
    ctx.flash(`Job ${id} was deleted.`);
    location.hash = "#/jobs";
  }

  async function retryJob() {
    let workers = [];
    try {
      workers = (await api("GET", "/workers", { signal })).body.workers;
    } catch (error) {
      if (error.name === "AbortError") return;
      outcome.textContent = `The workers could not be listed: ${errorText(error)}`;
    }
    workers.sort((a, b) => (a.status === b.status ? 0 : a.status === "ALIVE" ? -1 : 1));
    const choices = workers.map((w) => [w.node_id, `${w.node_id} (${w.status})`]);
    if (!workers.some((w) => w.node_id === job.node_id)) {
      choices.unshift([job.node_id, `${job.node_id} (its node, not registered)`]);
    }
    const select = h(
      "select",
      { id: "retry-node", required: true },
      choices.map(([value, label]) => h("option", { value }, label)),
    );
    select.value = job.node_id;
    const ok = await ctx.confirm({
      title: `Retry job ${id}?`,
      text: `Job ${id} failed. It becomes SCHEDULED again, on the worker chosen here.`,
      extra: h("p", {}, h("label", { for: "retry-node" }, "Run it on"), select),
      ok: "Retry the job",
    });
    if (!ok) return;
    const node = select.value;
    await act(
      () => api("PUT", `/jobs/${id}/status`, { body: { status: "SCHEDULED", node_id: node }, signal }),
      `Job ${id} is scheduled again on ${node}.`,
    );
  }

  showJob(job);
  showProgress(progress);
  addEvents(events);
  startFollowing();
}

// ---- Workers ----------------------------------------------------------------------------

async function renderWorkers(main, route, ctx) {
  const { signal } = ctx;
  const refreshButton = h("button", { type: "button", onclick: () => ctx.rerender() }, "Refresh");
  append(main, h("h1", { tabindex: -1 }, "Workers"), h("p", { class: "toolbar" }, refreshButton));
  const answer = await api("GET", "/workers", { signal });
  const offset = clockOffset(answer.date);
  const workers = answer.body.workers;
  if (workers.length === 0) {
    main.append(h("p", { class: "empty" }, "No worker has registered yet."));
    return;
  }
  const ages = [];
  const rows = workers.map((worker) => {
    const age = h("span", { class: "age" });
    ages.push([age, Date.parse(worker.heartbeat_at)]);
    const jobsCell = h("td", { class: "worker-jobs line", "data-label": "Active jobs" }, "Loading…");
    const row = h(
      "tr",
      { "data-node": worker.node_id },
      h("th", { scope: "row" }, h("code", {}, worker.node_id)),
      h("td", {}, badge(worker.status)),
      h("td", { class: "line", "data-label": "Last heartbeat" }, age, " ", timeEl(worker.heartbeat_at)),
      jobsCell,
    );
    row.jobsCell = jobsCell;
    row.nodeId = worker.node_id;
    return row;
  });
  main.append(
    h("p", { class: "summary" }, `${fmtInt(workers.length)} workers, most recently registered first.`),
    h(
      "div",
      { class: "scroll" },
      h(
        "table",
        { class: "list stack", id: "workers-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", { scope: "col" }, "Node"),
            h("th", { scope: "col" }, "Status"),
            h("th", { scope: "col" }, "Last heartbeat"),
            h("th", { scope: "col" }, "Active jobs"),
          ),
        ),
        h("tbody", {}, rows),
      ),
    ),
  );

  // Ages tick on the service's clock (the Date header), without asking it again.
  const tick = () => {
    const now = Date.now() + offset;
    for (const [el, at] of ages) {
      el.textContent = Number.isNaN(at) ? "–" : `${fmtAge((now - at) / 1000)} ago`;
    }
  };
  tick();
  const timer = setInterval(tick, 1000);
  signal.addEventListener("abort", () => clearInterval(timer));

  // Each worker's active jobs, four requests at a time.
  const SHOWN = 10;
  const queue = [...rows];
  async function next() {
    for (let row = queue.shift(); row && !signal.aborted; row = queue.shift()) {
      const q = new URLSearchParams({ node_id: row.nodeId, limit: String(SHOWN) });
      try {
        const { body } = await api("GET", `/jobs?${q}`, { signal });
        if (body.jobs.length === 0) {
          replace(row.jobsCell, "none");
          continue;
        }
        const links = body.jobs.map((job) => [
          h("a", { href: `#/jobs/${job.id}` }, String(job.id)),
          " ",
          badge(job.status),
        ]);
        const many = body.next_cursor === null ? fmtInt(body.jobs.length) : `more than ${SHOWN}`;
        replace(
          row.jobsCell,
          h("a", { href: jobsHash({ node: row.nodeId }), class: "more" }, `${many} active`),
          h("ul", { class: "inline" }, links.map((parts) => h("li", {}, parts))),
        );
      } catch (error) {
        if (error.name === "AbortError") return;
        replace(row.jobsCell, errorText(error));
      }
    }
  }
  await Promise.all([next(), next(), next(), next()]);
}

// ---- Clean-up -----------------------------------------------------------------------------

const CLEANUP_CHOICES = [
  ["terminal", "Completed, stopped and failed (every terminal job)", "terminal"],
  ["completed", "Completed", "completed"],
  ["stopped", "Stopped", "stopped"],
  ["error", "Failed", "failed"],
];
const COUNT_PAGES = 10; // counting stops past 10,000 matching jobs

async function countMatching(listStatus, signal, isCancelled) {
  let count = 0;
  let cursor = null;
  for (let page = 0; page < COUNT_PAGES; page += 1) {
    if (isCancelled()) return null;
    const q = new URLSearchParams({ status: listStatus, limit: "1000" });
    if (cursor !== null) q.set("last_job_id", String(cursor));
    const { body } = await api("GET", `/jobs?${q}`, { signal });
    count += body.jobs.length;
    if (body.next_cursor === null) return { count, exact: true };
    cursor = body.next_cursor;
  }
  return { count, exact: false };
}

async function renderCleanup(main, route, ctx) {
  const { signal } = ctx;
  append(
    main,
    h("h1", { tabindex: -1 }, "Clean-up"),
    h(
      "p",
      {},
      "Deletes terminal jobs with their events, tables and files, a batch at a time " +
        "(DELETE /jobs?status=…, repeated while the service answers that more remain). " +
        "Active jobs are never deleted.",
    ),
  );
  if (!ctx.canAct()) {
    main.append(h("p", { class: "banner warn", id: "cleanup-readonly" }, READ_ONLY_WHY));
    return;
  }
  const radios = CLEANUP_CHOICES.map(([value, label], i) =>
    h(
      "p",
      { class: "choice" },
      h("input", { type: "radio", name: "cleanup-status", id: `cleanup-${value}`, value, checked: i === 0 }),
      h("label", { for: `cleanup-${value}` }, label),
    ),
  );
  const start = h("button", { type: "submit", id: "cleanup-start", class: "danger" }, "Count and delete…");
  const form = h(
    "form",
    { class: "cleanup admin-only", id: "cleanup-form" },
    h("fieldset", {}, h("legend", {}, "Delete the jobs that are"), radios),
    h("p", {}, start),
  );
  const bar = h("progress", { id: "cleanup-progress", max: 1, "aria-label": "Clean-up progress" });
  const count = h("p", { id: "cleanup-count", role: "status" });
  const cancel = h("button", { type: "button", id: "cleanup-cancel" }, "Cancel");
  const run = h(
    "section",
    { id: "cleanup-run", class: "panel", hidden: true, "aria-label": "Clean-up progress" },
    bar,
    count,
    h("p", {}, cancel),
  );
  append(main, form, run);

  let cancelled = false;
  cancel.addEventListener("click", () => {
    cancelled = true;
    cancel.disabled = true;
    count.textContent = `${count.textContent} Cancelling after this request…`;
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = form.querySelector("input[name=cleanup-status]:checked").value;
    const [, label, listStatus] = CLEANUP_CHOICES.find(([v]) => v === value);
    const what = value === "terminal" ? "terminal" : label.toLowerCase();
    cancelled = false;
    start.disabled = true;
    cancel.disabled = false;
    run.hidden = false;
    bar.removeAttribute("value"); // indeterminate while counting
    count.textContent = `Counting ${what} jobs…`;
    const done = () => {
      start.disabled = false;
      cancel.disabled = true;
    };
    try {
      const matching = await countMatching(listStatus, signal, () => cancelled);
      if (matching === null) {
        count.textContent = "Cancelled before anything was deleted.";
        done();
        return;
      }
      if (matching.count === 0) {
        bar.max = 1;
        bar.value = 1;
        count.textContent = `No ${what} jobs: nothing to delete.`;
        done();
        return;
      }
      const many = matching.exact ? fmtInt(matching.count) : `more than ${fmtInt(matching.count)}`;
      count.textContent = `${many} ${what} jobs match.`;
      const ok = await ctx.confirm({
        title: `Delete ${many} ${what} jobs?`,
        text:
          `Every ${what} job (${many} now) is deleted with its events, tables and files. ` +
          "This cannot be undone. You can cancel between requests.",
        ok: "Delete them",
      });
      if (!ok) {
        count.textContent = `${many} ${what} jobs match. Nothing was deleted.`;
        done();
        return;
      }
      let deleted = 0;
      let requests = 0;
      const show = () => {
        if (matching.exact) {
          bar.max = Math.max(matching.count, deleted);
          bar.value = deleted;
        }
        const of = matching.exact ? ` of ${fmtInt(matching.count)}` : "";
        count.textContent = `Deleted so far: ${fmtInt(deleted)}${of} (${fmtInt(requests)} requests).`;
      };
      show();
      for (;;) {
        if (cancelled) {
          count.textContent =
            `Cancelled: ${fmtInt(deleted)} deleted in ${fmtInt(requests)} requests; ` +
            `${what} jobs may remain.`;
          break;
        }
        const answer = await api("DELETE", `/jobs?status=${value}`, { signal });
        requests += 1;
        if (answer.status === 204) {
          bar.max = Math.max(matching.exact ? matching.count : deleted, 1);
          bar.value = bar.max;
          const started = matching.exact ? `${fmtInt(matching.count)} matched` : `${many} matched`;
          count.textContent =
            `Done: no ${what} jobs remain ` +
            `(${started} when it started; ${fmtInt(requests)} requests).`;
          break;
        }
        deleted += Number(answer.body.deleted);
        show();
      }
    } catch (error) {
      if (error.name === "AbortError") return;
      count.textContent = errorText(error);
    }
    done();
  });
}

function renderNotFound(main) {
  append(
    main,
    h("h1", { tabindex: -1 }, "No such page"),
    h("p", {}, h("a", { href: "#/jobs" }, "Go to the jobs")),
  );
}

export const VIEWS = {
  jobs: renderJobs,
  job: renderJob,
  workers: renderWorkers,
  cleanup: renderCleanup,
  notfound: renderNotFound,
};
