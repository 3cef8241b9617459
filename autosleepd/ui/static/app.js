// The live page: polls the host view, draws each engine and its last day, and sends wake, sleep
// and pin orders with the admin token the user gives (sessionStorage: this tab only).
"use strict";

const POLL_MS = 1000;
const DAY_MS = 24 * 3600 * 1000;
const TOKEN_KEY = "autosleepd-admin-token";

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name === "style") Object.assign(node.style, value);   // CSSOM: allowed by the page's CSP
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function gib(bytes) { return bytes == null ? "–" : `${(bytes / 2 ** 30).toFixed(1)} GiB`; }

function span(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)} min`;
  return `${Math.floor(seconds / 3600)} h ${String(Math.floor(seconds % 3600 / 60)).padStart(2, "0")}`;
}

function clock(epochSeconds) { return new Date(epochSeconds * 1000).toLocaleTimeString(); }

function showError(text, source = "order") {
  const box = document.getElementById("error");
  box.textContent = text;
  box.hidden = !text;
  box.dataset.source = source;
}

// ----- orders ---------------------------------------------------------------------------------

function askToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const token = input.value.trim();
      if (dialog.returnValue === "ok" && token) {
        sessionStorage.setItem(TOKEN_KEY, token);
        resolve(true);
      } else resolve(false);
    }, { once: true });
    dialog.showModal();
  });
}

const pending = new Set();   // orders under way: their buttons stay disabled across redraws

async function order(path, body, button) {
  const key = button.dataset.key;
  pending.add(key);
  button.disabled = true;
  try {
    for (;;) {
      const token = sessionStorage.getItem(TOKEN_KEY);
      const headers = { "Content-Type": "application/json" };
      if (token) headers.Authorization = `Bearer ${token}`;
      const response = await fetch(path, { method: "POST", headers, body: body ? JSON.stringify(body) : "" });
      if (response.status === 401) {          // no token yet, or a wrong one: ask
        sessionStorage.removeItem(TOKEN_KEY);
        if (await askToken()) continue;
        return;
      }
      if (!response.ok) {
        const answer = await response.json().catch(() => null);
        showError(answer?.error?.message ?? `${path}: HTTP ${response.status}`);
      } else showError("");
      return;
    }
  } finally {
    pending.delete(key);
    polls = 0;   // the order changed states: read the history again at once
    document.getElementById("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
    refresh();
  }
}

// ----- drawing --------------------------------------------------------------------------------

function card(engine) {
  const name = encodeURIComponent(engine.name);
  const next = engine.next_transition;
  const pin = engine.pin;
  const facts = [
    ["Models", engine.models.join(", ")],
    ["Sleep level", engine.sleep_level ?? "–"],
    ["GPU memory", `${gib(engine.gpu_memory_awake_bytes)} awake, ${gib(engine.gpu_memory_asleep_bytes)} asleep`],
    ["Last used", `${span((Date.now() - Date.parse(engine.last_used)) / 1000)} ago`],
    ["Work", `${engine.in_flight} in flight, ${engine.held} held`],
    ["GPU power", engine.power && engine.power.watts != null
      ? `${engine.power.watts.toFixed(0)} W now, ${engine.power.saved_wh.toFixed(1)} Wh saved` : "not read"],
    ["Next", next ? (next.in_seconds == null ? next.what : `${next.what}, in ${span(next.in_seconds)}`) : "nothing planned"],
    ["Pinned", pin ? (pin.until ? `until ${new Date(pin.until).toLocaleTimeString()} (${span(pin.in_seconds)} left)` : "until unpinned")
      : engine.keep_alive_seconds ? `kept alive ${span(engine.keep_alive_seconds)} by a request` : "no"],
  ];
  const list = el("dl");
  for (const [term, value] of facts) list.append(el("dt", { text: term }), el("dd", { text: String(value) }));
  const actions = el("div", { class: "actions" });
  const button = (label, path, body) => {
    const action = label.toLowerCase().split(" ")[0];
    const node = el("button", { type: "button", "data-action": action, "data-key": `${engine.name}/${action}`, text: label });
    node.disabled = pending.has(node.dataset.key);
    node.addEventListener("click", () => order(path, body, node));
    return node;
  };
  actions.append(button("Wake", `wake?engine=${name}`), button("Sleep", `sleep?engine=${name}`),
                 pin ? button("Unpin", "unpin", { engine: engine.name })
                     : button("Pin 1 h", "pin", { engine: engine.name, duration: "1h" }));
  return el("article", { class: "engine", "data-engine": engine.name },
            el("h3", {}, engine.name, el("span", { class: "state", "data-state": engine.state, text: engine.state.replace("_", " ") })),
            list, actions);
}

function timelineRow(engine, now) {
  const bar = el("div", { class: "bar" });
  const start = now - DAY_MS;
  // The day's history is fetched now and then; the state since then is known from each poll.
  const history = [...(histories.get(engine.name) ?? [])];
  const since = now / 1000 - engine.state_seconds;
  if (!history.length || history[history.length - 1].state !== engine.state) {
    history.push({ at: since, state: engine.state, reason: "now" });
  }
  history.forEach((entry, i) => {
    const from = Math.max(entry.at * 1000, start);
    const to = i + 1 < history.length ? history[i + 1].at * 1000 : now;
    if (to <= start) return;
    bar.append(el("span", {
      class: entry.state,
      style: { left: `${(from - start) / DAY_MS * 100}%`, width: `${Math.max((to - from) / DAY_MS * 100, 0.15)}%` },
      title: `${entry.state} from ${clock(entry.at)} (${entry.reason})`,
    }));
  });
  return el("div", { class: "row" }, el("span", { text: engine.name }), bar);
}

let busy = false;
let polls = 0;
const HISTORY_EVERY = 15;        // polls between two reads of the day's history (it can be long)
const histories = new Map();     // engine name -> its transitions over the last day

function render(host) {
  const engines = document.getElementById("engines");
  engines.replaceChildren(...host.engines.map(card));
  const now = Date.parse(host.now);
  document.getElementById("timeline").replaceChildren(...host.engines.map((e) => timelineRow(e, now)));
  document.getElementById("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
}

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const withHistory = polls++ % HISTORY_EVERY === 0;
    const response = await fetch(withHistory ? "host?history=1" : "host", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const host = await response.json();
    if (withHistory) for (const engine of host.engines) histories.set(engine.name, engine.history);
    render(host);
    if (document.getElementById("error").dataset.source === "poll") showError("", "poll");
  } catch (error) {
    showError(`cannot read the host view: ${error.message}`, "poll");
  } finally {
    busy = false;
  }
}

document.getElementById("forget").addEventListener("click", (event) => {
  sessionStorage.removeItem(TOKEN_KEY);
  event.target.hidden = true;
});
document.getElementById("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
refresh();
setInterval(refresh, POLL_MS);
