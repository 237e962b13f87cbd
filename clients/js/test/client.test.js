// The JavaScript client against a real gateway process and nats-server (started by
// tests/clients/test_js_client.py, which runs this file with `node --test`).
import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { AuthError, ReplacedError, TocsinClient } from "../tocsin.js";
import {
  WS_URL,
  WebSocket,
  publish,
  startGateway,
  stopGateway,
  token,
  unique,
  waitFor,
} from "./helpers.js";

const clients = [];
afterEach(async () => {
  for (const c of clients.splice(0)) await c.stop();
});

/** A started client recording what its handler got, and its errors and states. */
function started(options) {
  const got = [];
  const errors = [];
  const states = [];
  const client = new TocsinClient({
    url: WS_URL,
    WebSocket,
    backoffInitial: 0.05,
    backoffMax: 0.5,
    onAlert: (alert, frame) => {
      got.push({ id: alert.alert_id, seq: frame.seq, redelivered: frame.redelivered });
    },
    ...options,
  });
  client.on("error", (e) => errors.push(e));
  client.on("state", (s) => states.push(s.state));
  clients.push(client);
  client.start();
  return { client, got, errors, states };
}

const established = (client) => waitFor(() => client.state === "open", "connection_established");

test("alerts arrive in order, exact ids of both kinds, and are acked after the handler", async () => {
  const user = unique("js");
  const tok = await token(user);
  let release;
  const gate = new Promise((r) => (release = r));
  const got = [];
  const { client } = started({
    token: tok,
    clientId: "node",
    onAlert: async (alert, frame) => {
      got.push({ id: alert.alert_id, seq: frame.seq });
      if (alert.title === "held") await gate; // ack only once the handler is done
    },
  });
  await established(client);
  const ids = [9007199254740991, `str-${user}`, 700000001 + Math.floor(Math.random() * 1e8)];
  const seqs = [];
  for (const id of ids) seqs.push((await publish({ alert_id: id })).seq);
  await waitFor(() => got.length === 3, "three alerts");
  assert.deepEqual(
    got.map((g) => g.id),
    ids,
    "ids exact (2^53-1 and a string) and in publish order",
  );
  await waitFor(async () => (await client.getStats()).acked_seq === seqs[2], "acked up to the last");
  assert.ok(client.counters.acksSent <= 3, `acks coalesced: ${client.counters.acksSent}`);

  const held = (await publish({ title: "held" })).seq;
  await waitFor(() => got.length === 4, "the held alert");
  const before = await client.getStats();
  assert.equal(before.inflight, 1, "sent, handler still running: not acked");
  assert.equal(before.acked_seq, seqs[2]);
  release();
  await waitFor(async () => (await client.getStats()).acked_seq === held, "acked once handled");
  // the server's pings were answered with pong (its latency needs the echoed ts)
  await waitFor(async () => (await client.getStats()).latency_ms !== null, "a pong measured");
});

test("a gateway restart (SIGTERM) loses and repeats nothing", async () => {
  await restartScenario("TERM");
});

test("a gateway crash (SIGKILL) loses and repeats nothing to the handler", async () => {
  await restartScenario("KILL");
});

async function restartScenario(signal) {
  const user = unique("restart");
  const { client, got, states } = started({ token: await token(user), clientId: "node" });
  await established(client);
  const ids = [];
  for (let i = 0; i < 3; i++) ids.push((await publish({ title: `before ${i}` })).alert_id);
  await waitFor(() => got.length === 3, "alerts before the restart");
  await stopGateway(signal);
  await waitFor(() => client.state === "reconnecting" || client.state === "connecting", "noticed");
  for (let i = 0; i < 3; i++) ids.push((await publish({ title: `while down ${i}` })).alert_id);
  await startGateway();
  await waitFor(() => got.length >= 6, "the backlog after the restart", 60000);
  ids.push((await publish({ title: "live after" })).alert_id);
  await waitFor(() => got.length >= 7, "a live alert after the restart");
  await waitFor(async () => (await client.getStats()).inflight === 0, "all acked");
  assert.deepEqual(
    got.map((g) => g.id),
    ids,
    `each alert once, in order (states: ${states.join(",")})`,
  );
  assert.ok(states.includes("reconnecting"));
  assert.ok(client.connections >= 2);
}

test("4009: a replaced client does not reconnect", async () => {
  const user = unique("replaced");
  const tok = await token(user);
  const a = started({ token: tok, clientId: "shared" });
  await established(a.client);
  const b = started({ token: tok, clientId: "shared" });
  await waitFor(() => a.client.state === "failed", "the first client to give up");
  assert.ok(a.errors.some((e) => e instanceof ReplacedError), "a ReplacedError was emitted");
  await established(b.client);
  // a reconnect of the first (backoff 50 ms) would replace the second before this arrives
  const { alert_id } = await publish({ title: "after the takeover" });
  await waitFor(() => b.got.some((g) => g.id === alert_id), "the alert on the second client");
  assert.equal(a.client.connections, 1, "the replaced client never connected again");
  assert.equal(b.client.state, "open");
  assert.equal(b.errors.length, 0);
});

test("dedupe by alert_id across connections, through a persistence hook", async () => {
  const user = unique("dedupe");
  const tok = await token(user);
  let saved = [];
  const store = { load: () => saved, save: (keys) => (saved = keys) };
  const one = started({ token: tok, clientId: "node", seenStore: store, ackDelayMs: 60000 });
  await established(one.client);
  const { alert_id } = await publish({ title: "seen once" });
  await waitFor(() => one.got.length === 1, "the alert");
  await one.client.stop({ flushAcks: false }); // handled, never acked: it will come again
  assert.ok(saved.includes(String(alert_id)), "the seen id was saved");

  const frames = [];
  const two = started({ token: tok, clientId: "node", seenStore: store });
  two.client.on("frame", (f) => f.type === "alert" && frames.push(f));
  await waitFor(() => frames.length === 1, "the alert again");
  assert.equal(frames[0].redelivered, true);
  assert.equal(two.got.length, 0, "the handler did not get it twice");
  assert.equal(two.client.counters.duplicates, 1);
  await waitFor(async () => (await two.client.getStats()).acked_seq === frames[0].seq, "acked");
});

test("subscribe, unsubscribe and updateFilters resolve with the server's answer", async () => {
  const user = unique("groups");
  const { client, got } = started({ token: await token(user), clientId: "node" });
  const early = client.subscribe(["level:critical"]); // before connection_established: queued
  const ok = await early;
  assert.equal(ok.type, "subscription_response");
  assert.equal(ok.status, "ok");
  assert.deepEqual(ok.subscribed, ["level:critical"]);
  const denied = await client.subscribe(["region:UG"]);
  assert.equal(denied.status, "denied");
  assert.match(denied.detail, /region:UG/);
  const invalid = await client.updateFilters({ risk_threshold: 2 });
  assert.equal(invalid.status, "invalid");
  assert.match(invalid.detail, /risk_threshold/);

  await publish({ alert_level: "high", title: "not critical" });
  const critical = await publish({ alert_level: "critical", title: "critical" });
  await waitFor(() => got.length === 1, "the critical alert");
  assert.equal(got[0].id, critical.alert_id, "the group selected: only the critical alert");

  const un = await client.unsubscribe(["level:critical"]);
  assert.deepEqual(un.subscribed, []);
  const filtered = await client.updateFilters({ alert_types: ["flood"] });
  assert.equal(filtered.status, "ok");
  assert.deepEqual(filtered.filters, { alert_types: ["flood"] });
  await publish({ alert_type: "outbreak_risk", title: "filtered out" });
  const flood = await publish({ alert_type: "flood", title: "flood" });
  await waitFor(() => got.length === 2, "the flood alert");
  assert.equal(got[1].id, flood.alert_id);
  await assert.rejects(() => client.subscribe([]), /groups/);
});

test("a refused token stops the client: no reconnect (ws: status seen)", async () => {
  await refusedScenario(WebSocket);
});

/** A WebSocket with the browser's API only: no access to a refused handshake's status. */
class BrowserLikeWebSocket {
  constructor(url) {
    const inner = new WebSocket(url);
    inner.on("error", () => {});
    for (const name of ["open", "message", "close", "error"]) {
      inner.addEventListener(name, (ev) => this[`on${name}`]?.(ev));
    }
    this.inner = inner;
  }
  get readyState() {
    return this.inner.readyState;
  }
  send(data) {
    this.inner.send(data);
  }
  close(code) {
    this.inner.close(code);
  }
}

test("a refused token stops the client: no reconnect (browser API: status probed)", async () => {
  await refusedScenario(BrowserLikeWebSocket);
});

async function refusedScenario(WS) {
  const refusals = [];
  const { client, errors } = started({
    token: "not-a-jwt",
    clientId: "node",
    WebSocket: WS,
  });
  client.on("refused", (r) => refusals.push(r));
  await waitFor(() => client.state === "failed", "the client to give up");
  assert.equal(refusals[0].status, 401);
  assert.equal(refusals[0].error, "malformed_token");
  assert.ok(errors.some((e) => e instanceof AuthError));
  assert.equal(client.connections, 1);
}

test("a token source is asked again before exp, and the switch loses nothing", async () => {
  const user = unique("refresh");
  let asked = 0;
  const { client, got } = started({
    token: () => {
      asked += 1;
      return token(user, { ttl: 3 }); // renewed 10% of its lifetime before exp
    },
    clientId: "node",
  });
  await established(client);
  await waitFor(() => asked >= 2 && client.state === "open", "a renewal", 15000);
  const { alert_id } = await publish({ title: "after renewal" });
  await waitFor(() => got.some((g) => g.id === alert_id), "an alert on the renewed connection");
  assert.ok(client.connections >= 2);
});
