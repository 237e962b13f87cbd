// What the tests share: the gateway's URL and the control harness (tests/clients/harness.py)
// from the environment, and waiting on a condition with a deadline (never a bare sleep).
import { WebSocket } from "ws";

export const WS_URL = process.env.TOCSIN_TEST_WS_URL;
export const CONTROL = process.env.TOCSIN_TEST_CONTROL;
if (!WS_URL || !CONTROL) {
  throw new Error("run through pytest (tests/clients/test_js_client.py): TOCSIN_TEST_WS_URL unset");
}
export { WebSocket };

async function call(path, init) {
  const res = await fetch(CONTROL + path, init);
  if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
  return res.headers.get("content-type")?.includes("json") ? res.json() : res.text();
}

export function token(sub, { regions = "KE", roles = "health_worker", ttl = 3600 } = {}) {
  const q = new URLSearchParams({ sub, regions, roles, ttl: String(ttl) });
  return call(`/token?${q}`);
}

export function publish(fields = {}) {
  return call("/publish", { method: "POST", body: JSON.stringify(fields) });
}

export const stopGateway = (signal = "TERM") =>
  call(`/gateway/stop?signal=${signal}`, { method: "POST" });
export const startGateway = () => call("/gateway/start", { method: "POST" });

export async function waitFor(check, what, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A unique name per test, so that devices and users never collide. */
let n = 0;
export const unique = (prefix) => `${prefix}${process.pid}x${++n}`;
