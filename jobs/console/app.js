// The console's frame: who we are (the token's role), hash routing
// (#/jobs, #/jobs/42, #/workers, #/cleanup), the token prompt and the
// confirmation dialog. The pages themselves are in views.js.

import { forgetToken, onAuthProblem, probeRole, setToken, token } from "./api.js";
import { h, replace } from "./dom.js";
import { VIEWS } from "./views.js";

const $ = (id) => document.getElementById(id);

// role: null (not known yet), "open" (the service has no tokens), "admin",
// "reader" (the worker token: read-only) or "none" (a token is needed).
const state = { role: null, controller: null, routeName: null, flash: null };

const ACCESS_TEXT = {
  open: "Open service: no token needed",
  admin: "Admin token",
  reader: "Worker token: read-only",
  none: "No token",
};

function canAct() {
  return state.role === "admin" || state.role === "open";
}

function showAccess() {
  $("access").textContent = ACCESS_TEXT[state.role] ?? "Checking access…";
  $("readonly").hidden = state.role !== "reader";
  const stored = Boolean(token());
  $("forget-token").hidden = !stored;
  $("change-token").hidden = state.role === "none" || state.role === "open";
  document.body.classList.toggle("read-only", !canAct());
}

// ---- Routes --------------------------------------------------------------------------

export function parseRoute(hash) {
  if (hash === "" || hash === "#" || hash === "#/") return { name: "jobs", params: new URLSearchParams() };
  if (!hash.startsWith("#/")) return null; // the skip link's #main: not a route
  const question = hash.indexOf("?");
  const path = question === -1 ? hash.slice(1) : hash.slice(1, question);
  const params = new URLSearchParams(question === -1 ? "" : hash.slice(question + 1));
  if (path === "/jobs") return { name: "jobs", params };
  const job = path.match(/^\/jobs\/([1-9][0-9]{0,18})$/);
  if (job) return { name: "job", id: job[1], params };
  if (path === "/workers") return { name: "workers", params };
  if (path === "/cleanup") return { name: "cleanup", params };
  return { name: "notfound", params };
}

const SECTION = { jobs: "jobs", job: "jobs", workers: "workers", cleanup: "cleanup" };

async function render() {
  const route = parseRoute(location.hash);
  if (route === null) return;
  state.controller?.abort();
  const controller = new AbortController();
  state.controller = controller;
  for (const link of document.querySelectorAll("nav a[data-section]")) {
    if (link.dataset.section === SECTION[route.name]) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const main = $("main");
  if (state.role === null) {
    showAccess();
    try {
      state.role = await probeRole();
    } catch (error) {
      if (controller.signal.aborted) return;
      replace(
        main,
        h("h1", {}, "The console could not check its access"),
        h("p", { class: "banner error", role: "alert" }, String(error.message)),
        h("button", { type: "button", onclick: () => render() }, "Try again"),
      );
      return;
    }
    if (controller.signal.aborted) return;
  }
  showAccess();
  if (state.role === "none") {
    showLogin();
    return;
  }
  hideLogin();
  const flash = state.flash;
  state.flash = null;
  replace(main, flash ? h("p", { class: "banner ok", role: "status" }, flash) : null);
  const moved = state.routeName !== route.name;
  state.routeName = route.name;
  const ctx = {
    signal: controller.signal,
    canAct,
    confirm: confirmDialog,
    flash: (text) => {
      state.flash = text;
    },
    rerender: () => render(),
  };
  try {
    await VIEWS[route.name](main, route, ctx);
    if (moved && !controller.signal.aborted) main.querySelector("h1")?.focus({ preventScroll: false });
  } catch (error) {
    if (controller.signal.aborted || error.name === "AbortError") return;
    if (error.status === 401) return; // the token prompt is already up
    showError(main, error);
  }
}

function showError(main, error) {
  const code = error.code ? `${error.status ? `${error.status} ` : ""}${error.code}: ` : "";
  main.append(h("p", { class: "banner error", role: "alert" }, `${code}${error.message}`));
}

// ---- Tokens -----------------------------------------------------------------------------

function showLogin(why) {
  $("main").hidden = true;
  const login = $("login");
  if (why) $("login-why").textContent = why;
  else if (!login.hidden) return;
  login.hidden = false;
  // Changing a token that works can be given up; asking for a missing one cannot.
  $("login-cancel").hidden = state.role === null || state.role === "none";
  $("login-token").focus();
}

function hideLogin() {
  $("login").hidden = true;
  $("main").hidden = false;
}

onAuthProblem((error) => {
  if (error.status === 401) {
    const hadToken = Boolean(token());
    forgetToken();
    state.role = "none";
    state.controller?.abort(); // the page under it stops asking
    showAccess();
    showLogin(
      hadToken
        ? "The service refused that token (401 UNAUTHORIZED). Enter the admin or worker token."
        : "This service asks for a token (it answered 401 UNAUTHORIZED).",
    );
  } else if (error.status === 403 && state.role !== "reader") {
    // The worker token on an admin route: from now on the console is read-only.
    state.role = "reader";
    showAccess();
    for (const el of document.querySelectorAll(".admin-only")) el.hidden = true;
  }
});

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("login-token");
  const value = input.value.trim();
  input.value = "";
  if (!value) return;
  setToken(value);
  state.role = null;
  hideLogin();
  render();
});

$("login-cancel").addEventListener("click", () => {
  $("login-token").value = "";
  hideLogin();
});

$("forget-token").addEventListener("click", () => {
  forgetToken();
  state.role = null;
  render();
});

$("change-token").addEventListener("click", () => {
  $("login-why").textContent = "Enter another token (admin or worker).";
  showLogin();
});

// ---- Confirmation ------------------------------------------------------------------------

// A modal <dialog>: resolves true when the operator confirms. ``extra`` is an
// element placed under the text (the retry's choice of worker).
function confirmDialog({ title, text, ok = "OK", extra = null }) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  replace($("confirm-extra"), extra);
  $("confirm-ok").textContent = ok;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

window.addEventListener("hashchange", () => render());
render();
