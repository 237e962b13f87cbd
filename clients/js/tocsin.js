// tocsin JavaScript client: one ES module, no build step, no dependencies.
//
// Browsers use their own WebSocket. Node.js 20+ needs the `ws` package: pass its class as
// `WebSocket`, or have it installed where this file can import it. Node 22+ has a global
// WebSocket, used when nothing is passed. The protocol is docs/protocol.md; this client is
// its §7 ("Recommended client algorithm"), documented in docs/sdk.md ("JavaScript").
//
//   import { TocsinClient } from "./tocsin.js";
//   const client = new TocsinClient({
//     url: "ws://127.0.0.1:8080/api/v1/alerts/ws",
//     token: () => fetchToken(),            // a string, or a function returning one
//     clientId: "phone-1",                    // stable per installation
//     onAlert: async (alert, frame) => { show(alert); },  // acked once it resolves
//   });
//   client.on("state", (s) => console.log(s.state));
//   client.start();

/** Base class of every error this client throws or emits. */
export class TocsinError extends Error {
  constructor(message, details = {}) {
    super(message);
    this.name = new.target.name;
    Object.assign(this, details);
  }
}
/** The token was refused (401/403 at the handshake) or expired (4401) with no way to renew it. */
export class AuthError extends TocsinError {}
/** A limit: 429 too_many_connections or banned, close 1008, rate_limit_warning. */
export class LimitError extends TocsinError {}
/** Close 4009: the same device connected elsewhere; this client does not reconnect. */
export class ReplacedError extends TocsinError {}
/** A bad request or answer: 400 invalid_parameter, an `error` frame, a malformed frame. */
export class ProtocolError extends TocsinError {}
/** The `onAlert` handler threw: the alert is not acked and comes again after a reconnect. */
export class HandlerError extends TocsinError {}
/** A request could not be answered: the client was stopped. */
export class ClosedError extends TocsinError {}

const DEFAULTS = {
  clientId: "default",
  ackMode: "client",
  backoffInitial: 0.5, // seconds; the step doubles up to backoffMax (protocol §7)
  backoffMax: 30,
  ackDelayMs: 100, // acks of alerts handled within this time go in one frame
  seenMax: 10000, // alert_ids remembered for dedupe (oldest forgotten first)
  refreshMarginSeconds: 60, // a renewable token is renewed this long before its exp
  connectTimeoutMs: 15000, // a handshake not answered by then is abandoned
};

/** Close codes (docs/protocol.md §3). */
export const Close = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  POLICY: 1008,
  HEARTBEAT_TIMEOUT: 4000,
  SLOW_CLIENT: 4008,
  REPLACED: 4009,
  TOKEN_EXPIRED: 4401,
  ACK_TIMEOUT: 4408,
  BACKEND_UNAVAILABLE: 4503,
});

/** The key an alert_id is deduplicated by: the server treats 7 and "7" as one alert. */
export function alertKey(alertId) {
  return String(alertId);
}

/** The claims of a JWT (its payload, not verified: the gateway does that), or null. */
export function tokenClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part));
    return claims !== null && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** The `exp` claim of a JWT (seconds), or null. */
export function tokenExpiry(token) {
  const exp = tokenClaims(token)?.exp;
  return typeof exp === "number" ? exp : null;
}

/**
 * A persistence hook for the seen alert_ids, in a Web Storage (localStorage by default).
 * Any object with `load()` (returning an array of keys) and `save(keys)` will do.
 */
export function storageSeenStore(key = "tocsin.seen", storage = globalThis.localStorage) {
  return {
    load() {
      try {
        const keys = JSON.parse(storage.getItem(key) ?? "[]");
        return Array.isArray(keys) ? keys.map(String) : [];
      } catch {
        return [];
      }
    },
    save(keys) {
      try {
        storage.setItem(key, JSON.stringify(keys));
      } catch {
        // storage full or disabled: dedupe still works for this page's lifetime
      }
    },
  };
}

/** Bounded, insertion-ordered set of alert keys, saved through `store` when it changes. */
class SeenIds {
  constructor(max, store) {
    this.max = max;
    this.store = store;
    this.keys = new Set(store ? store.load() : []);
    this.trim();
    this.saveTimer = null;
  }
  has(key) {
    return this.keys.has(key);
  }
  add(key) {
    this.keys.add(key);
    this.trim();
    if (this.store && this.saveTimer === null) {
      this.saveTimer = setTimeout(() => this.flush(), 0);
    }
  }
  trim() {
    while (this.keys.size > this.max) this.keys.delete(this.keys.values().next().value);
  }
  flush() {
    if (this.saveTimer !== null) clearTimeout(this.saveTimer);
    this.saveTimer = null;
    if (this.store) this.store.save([...this.keys]);
  }
}

/** Parse a Retry-After header value (seconds) or return null. */
function retryAfterSeconds(value) {
  const n = Number(value);
  return value != null && value !== "" && Number.isFinite(n) && n >= 0 ? n : null;
}

/** What a refused handshake means to the client: give up (fatal), renew the token, or wait. */
function classifyRefusal(status, error) {
  if (status === 429 || status === 503) return "wait";
  if (!error) return "retry"; // not the gateway's answer (a proxy, or a probe of a good handshake)
  if (status === 401 && error === "token_expired") return "renew";
  if (status === 401 || status === 403 || status === 400) return "fatal";
  return "retry";
}

function sleepMs(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

function checkGroups(groups) {
  if (!Array.isArray(groups) || groups.length === 0 || groups.length > 64) {
    throw new ProtocolError("groups: give 1-64 groups such as 'region:KE' or 'level:high'");
  }
  for (const g of groups) {
    if (typeof g !== "string" || !g.includes(":")) {
      throw new ProtocolError(`groups: ${JSON.stringify(g)} is not <kind>:<value>`);
    }
  }
  return [...groups];
}

let importedWs = null;
async function webSocketClass(given) {
  if (given) return given;
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  if (importedWs === null) {
    try {
      importedWs = (await import("ws")).WebSocket;
    } catch {
      throw new TocsinError(
        "no WebSocket: pass the `ws` package's WebSocket as options.WebSocket (Node.js 20), " +
          "or install `ws` where this module can import it",
      );
    }
  }
  return importedWs;
}

/**
 * One device's connection to a tocsin gateway, kept up until `stop()`.
 *
 * Events (`on(name, fn)`): "state" ({state, attempt, delayMs}), "established" (the
 * connection_established frame), "backlog_truncated", "alert" (after the handler, with
 * {alert, frame, duplicate}), "refused" ({status, error, detail, retryAfter}), "closed"
 * ({code, reason}), "error" (a TocsinError), "frame" (every frame received), "ack" ({seq}).
 */
export class TocsinClient {
  constructor(options) {
    if (!options || !options.url) throw new TypeError("options.url: the gateway's ws(s):// URL");
    if (!options.token) throw new TypeError("options.token: a JWT, or a function returning one");
    this.options = { ...DEFAULTS, ...options };
    this.url = options.url;
    this.state = "idle";
    this.listeners = new Map();
    this.seen = new SeenIds(this.options.seenMax, options.seenStore ?? null);
    this.ws = null;
    this.conn = null; // the state of the current connection
    this.requests = []; // subscribe/unsubscribe/update_filters/get_stats waiting for answers
    this.stopped = true;
    this.controller = null;
    this.attempt = 0; // connection attempts since the last connection_established
    this.connections = 0; // handshakes started, for tests and logs
    this.counters = { acksSent: 0, alertsHandled: 0, duplicates: 0 };
    this.lastEstablished = null;
    this.currentToken = null;
  }

  // ------------------------------------------------------------------ events
  on(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, new Set());
    this.listeners.get(name).add(fn);
    return () => this.listeners.get(name).delete(fn);
  }
  emit(name, value) {
    for (const fn of this.listeners.get(name) ?? []) {
      try {
        fn(value);
      } catch (err) {
        if (name !== "error") this.emit("error", err);
      }
    }
  }
  setState(state, extra = {}) {
    this.state = state;
    this.emit("state", { state, ...extra });
  }

  // ------------------------------------------------------------------ lifecycle
  /** Connect, and keep connecting until stop() or a reason not to (4009, a refused token). */
  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.controller = new AbortController();
    this.loop = this.run(this.controller.signal);
  }

  /** Close and stop reconnecting. Pending acks are sent first unless `flushAcks` is false. */
  async stop({ flushAcks = true } = {}) {
    this.stopped = true;
    if (this.controller) this.controller.abort();
    const conn = this.conn;
    if (conn) {
      if (flushAcks) this.flushAcks(conn);
      conn.finish({ code: Close.NORMAL, reason: "client stopped", local: true });
    }
    for (const r of this.requests.splice(0)) r.reject(new ClosedError("client stopped"));
    this.seen.flush();
    if (this.loop) await this.loop;
    this.setState("stopped");
  }

  async token() {
    const t = this.options.token;
    this.currentToken = typeof t === "function" ? await t() : t;
    return this.currentToken;
  }

  connectUrl(token) {
    const u = new URL(this.url, globalThis.location?.href);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    const o = this.options;
    u.searchParams.set("auth_token", token);
    u.searchParams.set("client_id", o.clientId);
    u.searchParams.set("ack_mode", o.ackMode);
    const f = o.filters ?? {};
    if (f.location_filter) u.searchParams.set("location_filter", JSON.stringify(f.location_filter));
    if (f.risk_threshold != null) u.searchParams.set("risk_threshold", String(f.risk_threshold));
    if (f.alert_types) {
      const types = Array.isArray(f.alert_types) ? f.alert_types.join(",") : f.alert_types;
      u.searchParams.set("alert_types", types);
    }
    return u.toString();
  }

  async run(signal) {
    let step = this.options.backoffInitial;
    while (!this.stopped) {
      let outcome;
      try {
        this.setState("connecting", { attempt: this.attempt });
        outcome = await this.connectOnce(await this.token(), signal);
      } catch (err) {
        outcome = { kind: "retry", error: err };
      }
      if (outcome.established) step = this.options.backoffInitial;
      if (this.stopped) break;
      if (outcome.kind === "fatal") {
        this.stopped = true;
        if (outcome.error) this.emit("error", outcome.error);
        for (const r of this.requests.splice(0)) r.reject(outcome.error ?? new ClosedError("stopped"));
        this.setState("failed", { error: outcome.error });
        return;
      }
      if (outcome.error && outcome.kind !== "renew") this.emit("error", outcome.error);
      if (outcome.kind === "limit") step = this.options.backoffMax; // banned: no haste
      let delay = Math.random() * step * 1000; // full jitter
      if (outcome.kind === "now") delay = 0;
      if (outcome.waitSeconds != null) delay = Math.max(delay, outcome.waitSeconds * 1000);
      step = Math.min(step * 2, this.options.backoffMax);
      this.attempt += 1;
      this.setState("reconnecting", { attempt: this.attempt, delayMs: Math.round(delay) });
      await sleepMs(delay, signal);
    }
  }

  /** One connection, from handshake to close; resolves with what to do next. */
  async connectOnce(token, signal) {
    const WS = await webSocketClass(this.options.WebSocket);
    const url = this.connectUrl(token);
    this.connections += 1;
    return new Promise((resolve) => {
      const ws = new WS(url);
      const conn = new Connection(this, ws, token);
      this.ws = ws;
      this.conn = conn;
      conn.probeUrl = url.replace(/^ws/, "http");
      const abort = () => conn.finish({ code: Close.NORMAL, local: true });
      signal.addEventListener("abort", abort);
      conn.onDone = (outcome) => {
        signal.removeEventListener("abort", abort);
        if (this.conn === conn) {
          this.conn = null;
          this.ws = null;
        }
        resolve(outcome);
      };
    });
  }

  // ------------------------------------------------------------------ requests
  /** Subscribe to groups; resolves with the subscription_response (check its `status`). */
  subscribe(groups) {
    return this.groupsRequest("subscribe", groups);
  }
  /** Unsubscribe groups; resolves with the subscription_response. */
  unsubscribe(groups) {
    return this.groupsRequest("unsubscribe", groups);
  }
  groupsRequest(type, groups) {
    try {
      return this.request({ type, groups: checkGroups(groups) }, "subscription_response");
    } catch (err) {
      return Promise.reject(err);
    }
  }
  /** Replace the device's filters (`{}` clears them); resolves with the subscription_response. */
  updateFilters(filters) {
    if (filters === null || typeof filters !== "object" || Array.isArray(filters)) {
      return Promise.reject(new ProtocolError("filters: must be an object ({} clears them)"));
    }
    return this.request({ type: "update_filters", filters }, "subscription_response");
  }
  /** This connection's counters; resolves with the connection_stats frame. */
  getStats() {
    return this.request({ type: "get_stats" }, "connection_stats");
  }

  request(frame, answer) {
    if (this.stopped && this.state !== "idle") {
      return Promise.reject(new ClosedError("client stopped"));
    }
    return new Promise((resolve, reject) => {
      const r = { frame, answer, resolve, reject, sentOn: null };
      this.requests.push(r);
      if (this.conn && this.conn.established) this.conn.sendRequest(r);
    });
  }

  flushAcks(conn) {
    conn.flushAcks();
  }
}

/** The state of one WebSocket connection. */
class Connection {
  constructor(client, ws, token) {
    this.client = client;
    this.ws = ws;
    this.token = token;
    this.established = false;
    this.opened = false;
    this.done = false;
    this.handled = 0; // highest seq handled (acked or to be acked)
    this.acked = 0; // highest seq acked
    this.ackTimer = null;
    this.chain = Promise.resolve(); // alerts are handled one at a time, in order
    this.watchdog = null;
    this.refreshTimer = null;
    this.heartbeat = 30;
    this.refusal = null; // {status, error, detail, retryAfter} from `ws`'s unexpected-response
    this.failedHandler = false;
    this.onDone = () => {};
    this.attach();
    this.watchdog = setTimeout(
      () => this.finish({ code: Close.ABNORMAL, reason: "handshake timed out", abort: true }),
      client.options.connectTimeoutMs,
    );
  }

  attach() {
    const ws = this.ws;
    if (typeof ws.on === "function") {
      // the `ws` package: the refused handshake's status, headers and body are visible
      ws.on("unexpected-response", (req, res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => (body += chunk));
        const done = () => {
          if (this.refusal) return;
          let parsed = {};
          try {
            parsed = JSON.parse(body);
          } catch {
            // not the gateway's JSON: keep the status alone
          }
          this.refusal = {
            status: res.statusCode,
            error: parsed.error ?? null,
            detail: parsed.detail ?? null,
            retryAfter: retryAfterSeconds(res.headers["retry-after"]),
          };
          req.destroy();
          this.finish({ code: Close.ABNORMAL, reason: "handshake refused" });
        };
        res.on("end", done);
        res.on("error", done);
      });
      ws.on("error", () => {}); // reported through close (or unexpected-response)
    }
    ws.onopen = () => {
      this.opened = true;
      this.kick();
    };
    ws.onmessage = (ev) => this.onMessage(ev.data);
    ws.onclose = (ev) => this.finish({ code: ev.code, reason: ev.reason ?? "" });
    ws.onerror = () => {};
  }

  send(frame) {
    if (this.done || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Dead-link watchdog: nothing received for two heartbeat intervals ends the connection. */
  kick() {
    if (this.watchdog !== null) clearTimeout(this.watchdog);
    if (this.done) return;
    this.watchdog = setTimeout(
      () => this.finish({ code: Close.ABNORMAL, reason: "no frame for two heartbeats", abort: true }),
      2 * this.heartbeat * 1000 + 1000,
    );
  }

  onMessage(data) {
    if (this.done) return;
    this.kick();
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      this.client.emit("error", new ProtocolError("a frame that is not JSON"));
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    const client = this.client;
    client.emit("frame", frame);
    switch (frame.type) {
      case "connection_established":
        this.onEstablished(frame);
        break;
      case "alert":
        this.onAlert(frame);
        break;
      case "ping":
        this.send({ type: "pong", ts: frame.ts ?? null });
        break;
      case "backlog_truncated":
        client.emit("backlog_truncated", frame);
        break;
      case "subscription_response":
      case "connection_stats":
        this.answer(frame);
        break;
      case "rate_limit_warning":
        client.emit("error", new LimitError("rate limit: client frames are being dropped", { frame }));
        break;
      case "error":
        this.onErrorFrame(frame);
        break;
      default:
        break; // unknown frame types are ignored (protocol §2)
    }
  }

  onEstablished(frame) {
    const client = this.client;
    this.established = true;
    this.heartbeat = Number(frame.heartbeat_interval) || 30;
    this.kick();
    client.attempt = 0;
    client.lastEstablished = frame;
    client.setState("open", { established: frame });
    client.emit("established", frame);
    for (const r of client.requests) this.sendRequest(r); // unanswered ones, again: idempotent
    this.scheduleRefresh();
  }

  scheduleRefresh() {
    const client = this.client;
    if (typeof client.options.token !== "function") return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const lifetime = exp - Date.now() / 1000;
    const margin = Math.min(client.options.refreshMarginSeconds, lifetime / 10);
    const inMs = Math.max(0, (lifetime - margin) * 1000);
    this.refreshTimer = setTimeout(() => {
      // a new connection with a fresh token; the device's queue makes the switch lossless
      this.flushAcks();
      this.finish({ code: Close.NORMAL, reason: "token renewal", local: true, kind: "now" });
    }, Math.min(inMs, 2 ** 31 - 1));
  }

  sendRequest(r) {
    r.sentOn = this;
    this.send(r.frame);
  }

  answer(frame) {
    const requests = this.client.requests;
    const i = requests.findIndex((r) => r.sentOn === this && r.answer === frame.type);
    if (i < 0) return;
    const [r] = requests.splice(i, 1);
    r.resolve(frame);
  }

  onErrorFrame(frame) {
    const err = new ProtocolError(`${frame.code}: ${frame.detail}`, { code: frame.code, frame });
    if (frame.code === "invalid_frame" || frame.code === "unknown_type") {
      const requests = this.client.requests;
      const i = requests.findIndex((r) => r.sentOn === this);
      if (i >= 0) {
        requests.splice(i, 1)[0].reject(err);
        return;
      }
    }
    this.client.emit("error", err);
  }

  onAlert(frame) {
    this.chain = this.chain.then(() => this.handle(frame));
  }

  async handle(frame) {
    if (this.done || this.failedHandler) return;
    const client = this.client;
    const alert = frame.alert ?? {};
    const key = alertKey(alert.alert_id);
    const expired = alert.expiry_time && Date.parse(alert.expiry_time) <= Date.now();
    const duplicate = client.seen.has(key);
    if (!duplicate && !expired) {
      try {
        if (client.options.onAlert) await client.options.onAlert(alert, frame);
      } catch (err) {
        // not acked: the connection is recycled so that it comes again (redelivered)
        this.failedHandler = true;
        client.emit("error", new HandlerError(`onAlert failed for alert ${key}: ${err}`, { cause: err, frame }));
        this.finish({ code: Close.NORMAL, reason: "handler failed", local: true });
        return;
      }
      client.seen.add(key);
      client.counters.alertsHandled += 1;
    } else if (duplicate) {
      client.counters.duplicates += 1;
    }
    client.emit("alert", { alert, frame, duplicate, expired: Boolean(expired) });
    this.handled = Math.max(this.handled, frame.seq);
    if (client.options.ackMode === "client" && this.ackTimer === null) {
      this.ackTimer = setTimeout(() => this.flushAcks(), client.options.ackDelayMs);
    }
  }

  flushAcks() {
    if (this.ackTimer !== null) clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.client.options.ackMode !== "client" || this.handled <= this.acked) return;
    if (this.send({ type: "ack", seq: this.handled })) {
      this.acked = this.handled;
      this.client.counters.acksSent += 1;
      this.client.emit("ack", { seq: this.acked });
    }
  }

  /** The connection is over (closed by either side, refused, or abandoned). */
  finish({ code, reason = "", local = false, abort = false, kind = null }) {
    if (this.done) return;
    this.done = true;
    for (const t of [this.watchdog, this.ackTimer, this.refreshTimer]) if (t !== null) clearTimeout(t);
    const ws = this.ws;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      if (abort && typeof ws.terminate === "function") ws.terminate();
      else if (ws.readyState <= 1) ws.close(local ? Close.NORMAL : undefined);
    } catch {
      // already closed
    }
    for (const r of this.client.requests) if (r.sentOn === this) r.sentOn = null; // resent later
    this.client.emit("closed", { code, reason, established: this.established });
    this.decide(code, reason, local, kind).then((outcome) =>
      this.onDone({ ...outcome, established: this.established }),
    );
  }

  /** What to do after a close (docs/protocol.md §1 refusals, §3 close codes). */
  async decide(code, reason, local, kind) {
    if (kind) return { kind };
    if (local) return { kind: "retry" };
    if (this.refusal) return this.onRefusal(this.refusal);
    if (!this.opened && code === Close.ABNORMAL) {
      const refusal = await this.probe();
      return refusal ? this.onRefusal(refusal) : { kind: "retry" };
    }
    switch (code) {
      case Close.REPLACED:
        return {
          kind: "fatal",
          error: new ReplacedError("replaced (4009): this device connected elsewhere", { code }),
        };
      case Close.TOKEN_EXPIRED:
        if (typeof this.client.options.token === "function") return { kind: "now" };
        return { kind: "fatal", error: new AuthError("token expired (4401)", { code }) };
      case Close.POLICY:
        return { kind: "limit", error: new LimitError(`closed 1008: ${reason || "banned"}`, { code }) };
      case Close.GOING_AWAY:
      default:
        return { kind: "retry" };
    }
  }

  /**
   * A browser's WebSocket (and Node's built-in one) hides the status of a refused
   * handshake. The gateway answers a plain GET of the same URL with the same checks
   * (docs/protocol.md §1), so ask it; a network failure or a cross-origin gateway without
   * CORS leaves the reason unknown (then: back off and retry).
   */
  async probe() {
    if (typeof fetch !== "function") return null;
    try {
      const res = await fetch(this.probeUrl, { cache: "no-store", credentials: "omit" });
      const type = res.headers.get("content-type") ?? "";
      const body = type.includes("json") ? await res.json() : {};
      return {
        status: res.status,
        error: body.error ?? null,
        detail: body.detail ?? null,
        retryAfter: retryAfterSeconds(res.headers.get("retry-after")),
      };
    } catch {
      return null;
    }
  }

  onRefusal(refusal) {
    const client = this.client;
    client.emit("refused", refusal);
    const what = classifyRefusal(refusal.status, refusal.error);
    const text = `handshake refused: ${refusal.status} ${refusal.error ?? ""} ${refusal.detail ?? ""}`.trim();
    if (what === "renew") {
      // backoff, not at once: a token source that keeps handing out expired tokens
      if (typeof client.options.token === "function") return { kind: "retry" };
      return { kind: "fatal", error: new AuthError(text, refusal) };
    }
    if (what === "fatal") {
      const Cls = refusal.status === 400 ? ProtocolError : AuthError;
      return { kind: "fatal", error: new Cls(text, refusal) };
    }
    if (what === "wait") {
      const error = refusal.status === 429 ? new LimitError(text, refusal) : null;
      return { kind: refusal.error === "banned" ? "limit" : "retry", waitSeconds: refusal.retryAfter, error };
    }
    return { kind: "retry" };
  }
}
