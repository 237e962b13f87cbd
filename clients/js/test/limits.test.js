// Limits, against a gateway with TOCSIN_MAX_CONNECTIONS_PER_USER=1 (started by
// tests/clients/test_js_client.py::test_javascript_client_honours_retry_after).
import assert from "node:assert/strict";
import { test } from "node:test";

import { LimitError, TocsinClient } from "../tocsin.js";
import { WS_URL, WebSocket, token, unique, waitFor } from "./helpers.js";

test("429 too_many_connections: the next attempt waits Retry-After, then gets in", async (t) => {
  const user = unique("capped");
  const tok = await token(user);
  const options = { url: WS_URL, WebSocket, token: tok, backoffInitial: 0.05, backoffMax: 0.1 };
  const first = new TocsinClient({ ...options, clientId: "one" });
  t.after(() => first.stop()); // a failed assertion must not leave a client reconnecting
  first.start();
  await waitFor(() => first.state === "open", "the first device");
  const second = new TocsinClient({ ...options, clientId: "two" });
  t.after(() => second.stop());
  const refusals = [];
  const waits = [];
  const errors = [];
  second.on("refused", (r) => refusals.push(r));
  second.on("state", (s) => s.state === "reconnecting" && waits.push(s.delayMs));
  second.on("error", (e) => errors.push(e));
  second.start();
  await waitFor(() => refusals.length >= 1 && waits.length >= 1, "a refusal");
  assert.equal(refusals[0].status, 429);
  assert.equal(refusals[0].error, "too_many_connections");
  assert.ok(refusals[0].retryAfter >= 1, `Retry-After: ${refusals[0].retryAfter}`);
  assert.ok(waits[0] >= refusals[0].retryAfter * 1000, `waited ${waits[0]} ms, not the backoff`);
  assert.ok(errors[0] instanceof LimitError);
  await first.stop();
  await waitFor(() => second.state === "open", "the second device, once a slot is free");
});
