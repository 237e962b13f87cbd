// The operator dashboard (GET /dashboard): polls GET /api/v1/dashboard with an admin or
// analyst token and draws the figures, with small SVG charts of the last points.
import { bindSignIn, claimsOf, forgetToken, setText, storedToken, webConfig } from "/static/common.js";

const $ = (id) => document.getElementById(id);
const KEY = "tocsin.dashboard.token";
const POINTS = 90;
const interval = Number(new URLSearchParams(location.search).get("interval")) || 2000;

let token = null;
let timer = null;
let previous = null; // {at, sent: {instance: messages_sent}, live: counts[]}
const series = { connections: [], rate: [], latency: [], queued: [] };

/** The q-quantile (0-1) of a histogram's counts (bucket i: up to bounds[i]), interpolated. */
export function quantile(bounds, counts, q) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  const rank = q * total;
  let below = 0;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] > 0 && below + counts[i] >= rank) {
      if (i >= bounds.length) return Infinity; // above the last bound
      const lo = i === 0 ? 0 : bounds[i - 1];
      return lo + ((bounds[i] - lo) * (rank - below)) / counts[i];
    }
    below += counts[i];
  }
  return bounds[bounds.length - 1];
}

function ms(seconds) {
  if (seconds === null) return "–";
  if (seconds === Infinity) return `>${"10 s"}`;
  const v = seconds * 1000;
  return v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`;
}

function number(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
}

function push(name, value) {
  const s = series[name];
  s.push(value);
  if (s.length > POINTS) s.shift();
}

/** A sparkline of `values` (nulls skipped) in an SVG of viewBox 100 x 40. */
function chart(svg, values) {
  const points = values.map((v, i) => [i, v]).filter(([, v]) => v !== null && Number.isFinite(v));
  svg.replaceChildren();
  if (points.length < 2) return;
  const max = Math.max(...points.map(([, v]) => v), 1e-9);
  const offset = POINTS - values.length; // the newest point at the right edge
  const x = (i) => (100 * (i + offset)) / (POINTS - 1);
  const y = (v) => 38 - (36 * v) / max;
  const coords = points.map(([i, v]) => `${x(i).toFixed(2)},${y(v).toFixed(2)}`);
  const ns = "http://www.w3.org/2000/svg";
  const area = document.createElementNS(ns, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `${x(points[0][0])},38 ${coords.join(" ")} ${x(points.at(-1)[0])},38`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", coords.join(" "));
  svg.append(area, line);
}

function gatewaysOf(body) {
  const replies = body.gateways?.replies ?? [];
  return replies.length ? replies : [body.stats];
}

function draw(body) {
  const now = performance.now();
  const gateways = gatewaysOf(body);
  const connections = gateways.reduce((a, g) => a + (g.active_connections ?? 0), 0);
  const sent = Object.fromEntries(gateways.map((g) => [g.instance, g.messages_sent ?? 0]));
  const live = body.latency.live;
  let rate = null;
  let window = null;
  if (previous) {
    const dt = (now - previous.at) / 1000;
    let delta = 0;
    for (const [instance, n] of Object.entries(sent)) {
      const before = previous.sent[instance];
      delta += before === undefined || n < before ? n * 0 : n - before; // a restart starts at 0
    }
    rate = dt > 0 ? delta / dt : null;
    window = live.counts.map((c, i) => c - (previous.live[i] ?? 0));
  }
  previous = { at: now, sent, live: live.counts };
  const recent = window && window.some((c) => c > 0);
  const counts = recent ? window : live.counts;
  const [p50, p90, p99] = [0.5, 0.9, 0.99].map((q) => quantile(live.bounds, counts, q));
  const stats = body.stats;
  const queues = stats.offline_queues ?? {};
  const dlq = stats.cluster?.dlq_messages ?? null;

  setText($("v-connections"), number(connections));
  setText($("n-connections"), `${gateways.length} gateway${gateways.length === 1 ? "" : "s"}`);
  setText($("v-rate"), rate === null ? "–" : rate.toFixed(rate < 10 ? 1 : 0));
  setText($("v-latency"), `${ms(p50)} / ${ms(p90)} / ${ms(p99)}`);
  setText($("n-latency"), recent ? `live path, last ${Math.round(interval / 1000)} s` : "live path, since start");
  setText($("v-queued"), number(queues.total_queued_messages));
  setText(
    $("n-queued"),
    `alerts not yet acknowledged · ${number(queues.queued_devices)} devices of ${number(queues.device_queues)}`,
  );
  setText($("v-dlq"), number(dlq));
  $("v-dlq").classList.toggle("bad", dlq > 0);
  setText($("v-sent"), number(Object.values(sent).reduce((a, b) => a + b, 0)));
  $("v-rate").dataset.value = rate ?? "";
  $("v-rate").dataset.max = Math.max(Number($("v-rate").dataset.max) || 0, rate ?? 0);
  $("v-connections").dataset.value = connections;
  $("v-sent").dataset.value = Object.values(sent).reduce((a, b) => a + b, 0);

  push("connections", connections);
  push("rate", rate);
  push("latency", p90 === Infinity ? null : p90);
  push("queued", queues.total_queued_messages ?? null);
  chart($("c-connections"), series.connections);
  chart($("c-rate"), series.rate);
  chart($("c-latency"), series.latency);
  chart($("c-queued"), series.queued);

  const rows = gateways.map((g) => {
    const tr = document.createElement("tr");
    const nats = g.system_health?.nats_connected;
    const cells = [
      g.instance,
      number(g.active_connections),
      number(g.healthy_connections),
      number(g.messages_sent),
      g.avg_latency_ms === null || g.avg_latency_ms === undefined ? "–" : `${g.avg_latency_ms} ms`,
      nats ? "connected" : "DISCONNECTED",
    ];
    for (const [i, text] of cells.entries()) {
      const td = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) td.scope = "row";
      td.textContent = text;
      if (i === 5) td.className = nats ? "good" : "bad";
      tr.append(td);
    }
    return tr;
  });
  $("gateways").replaceChildren(...rows);
  const g = body.gateways ?? {};
  setText(
    $("gw-caption"),
    g.error ? `Other gateways could not be asked: ${g.error}` : `${g.answered ?? 1} answered over NATS`,
  );
  setText($("updated"), `Updated ${new Date().toLocaleTimeString()} (every ${interval / 1000} s)`);
}

async function poll() {
  const conn = $("conn");
  try {
    const res = await fetch("/api/v1/dashboard", {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    if (res.status === 401 || res.status === 403) {
      const body = await res.json();
      stop(`${body.error}: ${body.detail}`);
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    draw(await res.json());
    conn.dataset.state = "open";
    setText(conn, "Live");
  } catch (err) {
    conn.dataset.state = "reconnecting";
    setText(conn, `Gateway not answering (${err.message}); retrying`);
  }
  timer = setTimeout(poll, interval);
}

function stop(reason) {
  clearTimeout(timer);
  forgetToken(KEY);
  $("live").hidden = true;
  $("signin").hidden = false;
  $("signout").hidden = true;
  setText($("signin-error"), reason);
  $("conn").dataset.state = "failed";
  setText($("conn"), "Not signed in");
}

function start(t) {
  token = t;
  const claims = claimsOf(t) ?? {};
  setText($("who"), `${claims.sub} · ${(claims.roles ?? []).join(", ")}`);
  $("signin").hidden = true;
  $("live").hidden = false;
  $("signout").hidden = false;
  clearTimeout(timer);
  previous = null;
  poll();
}

async function main() {
  const config = await webConfig();
  bindSignIn({ config, onToken: start, key: KEY });
  $("signout").addEventListener("click", () => stop(""));
  const t = storedToken(KEY);
  if (t && claimsOf(t)) start(t);
  else $("signin").hidden = false;
}

main();
