// The alert page (GET /): one device of the signed-in user, through the JavaScript client.
import { TocsinClient, storageSeenStore } from "/static/tocsin.js";
import { bindSignIn, claimsOf, forgetToken, setText, storedToken, webConfig } from "/static/common.js";

const $ = (id) => document.getElementById(id);
const HISTORY_MAX = 200;
const LEVELS = ["low", "medium", "high", "critical", "emergency"];

let client = null;
let claims = null;
let history = [];
let historyKey = null;
let backlog = null; // {pending, received, dropped} while a backlog is replayed

/** This browser's device id: kept in localStorage (one per browser profile), or ?client_id=. */
function deviceId() {
  const asked = new URLSearchParams(location.search).get("client_id");
  if (asked) return asked;
  let id = localStorage.getItem("tocsin.client_id");
  if (!id) {
    id = `web-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem("tocsin.client_id", id);
  }
  return id;
}

function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}`;
}

// ---------------------------------------------------------------- the list
function render(alert, { fresh }) {
  const list = $("alerts");
  const id = String(alert.alert_id);
  if (list.querySelector(`[data-alert-id="${CSS.escape(id)}"]`)) return;
  const level = LEVELS.includes(alert.alert_level) ? alert.alert_level : "low";
  const li = document.createElement("li");
  li.className = `alert level-${level}${fresh ? " fresh" : ""}`;
  li.dataset.alertId = id;
  li.tabIndex = 0;
  const head = document.createElement("p");
  head.className = "head";
  const badge = document.createElement("span");
  badge.className = "level";
  badge.textContent = level;
  const title = document.createElement("strong");
  title.className = "title";
  title.textContent = alert.title ?? "";
  head.append(badge, " ", title);
  const message = document.createElement("p");
  message.className = "message";
  message.textContent = alert.message ?? "";
  const meta = document.createElement("p");
  meta.className = "meta";
  const when = alert.created_at ? new Date(alert.created_at) : null;
  const parts = [
    alert.location?.region,
    alert.alert_type?.replace(/_/g, " "),
    alert.priority && `priority ${alert.priority}`,
    typeof alert.risk_score === "number" && `risk ${alert.risk_score.toFixed(2)}`,
    alert.action_required && "action required",
  ].filter(Boolean);
  meta.textContent = parts.join(" · ");
  if (when && !Number.isNaN(when.getTime())) {
    const time = document.createElement("time");
    time.dateTime = alert.created_at;
    time.textContent = ` · ${when.toLocaleString()}`;
    meta.append(time);
  }
  li.setAttribute("aria-label", `${level} alert: ${alert.title}`);
  li.append(head, message, meta);
  if (alert.action_url && /^https?:\/\//.test(alert.action_url)) {
    const a = document.createElement("a");
    a.href = alert.action_url;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    a.textContent = "What to do";
    li.append(a);
  }
  list.prepend(li);
  setText($("count"), `(${list.children.length})`);
  $("empty").hidden = true;
}

function expired(alert) {
  return alert.expiry_time && Date.parse(alert.expiry_time) <= Date.now();
}

function loadHistory() {
  try {
    history = JSON.parse(localStorage.getItem(historyKey) ?? "[]").filter((a) => !expired(a));
  } catch {
    history = [];
  }
  $("alerts").replaceChildren();
  setText($("count"), "");
  $("empty").hidden = history.length > 0;
  for (const alert of history) render(alert, { fresh: false });
}

function remember(alert) {
  history.push(alert);
  if (history.length > HISTORY_MAX) history.splice(0, history.length - HISTORY_MAX);
  try {
    localStorage.setItem(historyKey, JSON.stringify(history));
  } catch {
    // storage full: the list still shows this session's alerts
  }
}

/** Shown, then acked: the client acks once this resolves (after the next paint). */
function show(alert) {
  render(alert, { fresh: true });
  remember(alert);
  if (backlog) {
    backlog.received += 1;
    updateBanner();
  }
  if (document.visibilityState !== "visible") return undefined;
  return new Promise((resolve) => requestAnimationFrame(() => resolve()));
}

// ---------------------------------------------------------------- banner and state
function updateBanner() {
  const banner = $("banner");
  if (!backlog) {
    banner.hidden = true;
    return;
  }
  const lines = [];
  if (backlog.dropped) {
    lines.push(
      `${backlog.dropped} older alert${backlog.dropped === 1 ? " was" : "s were"} skipped while ` +
        "you were away: the offline queue keeps only the newest.",
    );
  }
  if (backlog.pending) {
    const done = backlog.received >= backlog.pending;
    lines.push(
      done
        ? `Caught up: ${backlog.received} missed alert${backlog.received === 1 ? "" : "s"} delivered.`
        : `Catching up: ${backlog.received} of up to ${backlog.pending} missed alerts delivered…`,
    );
  }
  banner.replaceChildren();
  for (const text of lines) {
    const p = document.createElement("p");
    p.textContent = text;
    banner.append(p);
  }
  const dismiss = document.createElement("button");
  dismiss.type = "button";
  dismiss.textContent = "Dismiss";
  dismiss.addEventListener("click", () => {
    backlog = null;
    updateBanner();
  });
  banner.append(dismiss);
  banner.dataset.kind = backlog.dropped ? "truncated" : "backlog";
  banner.hidden = lines.length === 0;
}

const STATE_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  open: "Connected: live",
  stopped: "Disconnected",
};

function showState(s) {
  const conn = $("conn");
  let text = STATE_TEXT[s.state] ?? s.state;
  if (s.state === "reconnecting") {
    text = `Connection lost: reconnecting in ${Math.ceil((s.delayMs ?? 0) / 1000)} s (attempt ${s.attempt})`;
  }
  if (s.state === "failed") text = failedText(s.error);
  if (s.state === "failed" && s.error?.name === "AuthError") {
    forgetToken();
    $("signin").hidden = false;
    setText($("signin-error"), text);
  }
  conn.dataset.state = s.state;
  setText(conn, text);
  $("reconnect").hidden = s.state !== "failed";
}

function failedText(error) {
  if (!error) return "Stopped";
  if (error.name === "ReplacedError") return "Opened in another tab or device: this page stopped";
  if (error.name === "AuthError") {
    return `Signed out: ${error.detail ?? error.message}${error.error ? ` (${error.error})` : ""}`;
  }
  return `Stopped: ${error.message}`;
}

// ---------------------------------------------------------------- groups and filters
function showSubscription(groups, filters) {
  const list = $("groups");
  list.replaceChildren();
  for (const g of groups) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = g;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Unsubscribe ${g}`);
    remove.addEventListener("click", () => answer(client.unsubscribe([g])));
    li.append(label, remove);
    list.append(li);
  }
  $("groups-none").hidden = groups.length > 0;
  $("f-risk").value = filters.risk_threshold ?? "";
  $("f-types").value = (filters.alert_types ?? []).join(",");
  $("f-regions").value = (filters.location_filter?.regions ?? []).join(",");
}

async function answer(promise) {
  const result = $("sub-result");
  try {
    const r = await promise;
    showSubscription(r.subscribed ?? [], r.filters ?? {});
    setText(result, r.status === "ok" ? `${r.action}: done` : `${r.action} ${r.status}: ${r.detail}`);
    result.dataset.status = r.status;
  } catch (err) {
    setText(result, `Not sent: ${err.message}`);
    result.dataset.status = "error";
  }
}

function csv(text) {
  return text
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
}

function bindControls() {
  $("group-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const groups = csv($("group").value);
    if (groups.length) answer(client.subscribe(groups));
    $("group").value = "";
  });
  $("filter-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const filters = {};
    const risk = $("f-risk").value.trim();
    if (risk !== "") filters.risk_threshold = Number(risk);
    const types = csv($("f-types").value);
    if (types.length) filters.alert_types = types;
    const regions = csv($("f-regions").value);
    if (regions.length) filters.location_filter = { regions };
    answer(client.updateFilters(filters));
  });
  $("clear-filters").addEventListener("click", () => answer(client.updateFilters({})));
}

// ---------------------------------------------------------------- sign-in and start
function start(token, config) {
  claims = claimsOf(token);
  const clientId = deviceId();
  historyKey = `tocsin.history.${claims.sub}.${clientId}`;
  $("signin").hidden = true;
  $("live").hidden = false;
  $("signout").hidden = false;
  const regions = (claims.roles ?? []).includes("admin") ? "every region" : (claims.regions ?? []).join(", ");
  setText($("who"), `${claims.sub} · ${regions} · device ${clientId}`);
  loadHistory();
  client = new TocsinClient({
    url: wsUrl(config.ws_path),
    token,
    clientId,
    seenStore: storageSeenStore(`tocsin.seen.${claims.sub}.${clientId}`),
    onAlert: show,
  });
  client.on("state", showState);
  client.on("established", (f) => {
    showSubscription(f.groups ?? [], f.filters ?? {});
    backlog = f.pending > 0 ? { pending: f.pending, received: 0, dropped: backlog?.dropped ?? 0 } : null;
    updateBanner();
  });
  client.on("backlog_truncated", (f) => {
    backlog = { ...(backlog ?? { pending: 0, received: 0 }), dropped: f.dropped };
    updateBanner();
  });
  client.start();
}

async function main() {
  const config = await webConfig();
  bindControls();
  $("signout").addEventListener("click", async () => {
    if (client) await client.stop();
    client = null;
    forgetToken();
    location.reload();
  });
  $("reconnect").addEventListener("click", () => client && client.start());
  bindSignIn({
    config,
    onToken: async (t) => {
      if (client) await client.stop();
      start(t, config);
    },
  });
  const token = storedToken();
  if (token && claimsOf(token)) start(token, config);
  else $("signin").hidden = false;
}

main();
