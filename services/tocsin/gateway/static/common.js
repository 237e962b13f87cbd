// What the alert page and the dashboard share: signing in (a pasted token, #token= in the
// URL, or the development sign-in of `tocsin run`) and reading a token's claims.

import { tokenClaims as claimsOf } from "/static/tocsin.js";

const TOKEN_KEY = "tocsin.token";

export { claimsOf };

/** A token from #token= (then removed from the address bar) or from this tab's storage. */
export function storedToken(key = TOKEN_KEY) {
  const hash = new URLSearchParams(location.hash.slice(1));
  const fromHash = hash.get("token");
  if (fromHash) {
    sessionStorage.setItem(key, fromHash);
    history.replaceState(null, "", location.pathname + location.search);
    return fromHash;
  }
  return sessionStorage.getItem(key);
}

export function forgetToken(key = TOKEN_KEY) {
  sessionStorage.removeItem(key);
}

export async function webConfig() {
  try {
    const res = await fetch("/api/v1/web/config", { cache: "no-store" });
    return res.ok ? await res.json() : { dev_sign_in: false, ws_path: "/api/v1/alerts/ws" };
  } catch {
    return { dev_sign_in: false, ws_path: "/api/v1/alerts/ws" };
  }
}

/**
 * Wire the sign-in section: the token form, and the development form when the gateway
 * offers it. `onToken(token)` is called with a token that at least decodes.
 */
export function bindSignIn({ config, onToken, key = TOKEN_KEY }) {
  const error = document.getElementById("signin-error");
  const fail = (text) => {
    error.textContent = text;
  };
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = document.getElementById("token").value.trim();
    const claims = claimsOf(token);
    if (!claims || !claims.sub) return fail("That is not a JWT: expected three dot-separated parts.");
    if (claims.exp && claims.exp * 1000 < Date.now()) return fail("That token has expired.");
    fail("");
    sessionStorage.setItem(key, token);
    onToken(token);
  });
  const dev = document.getElementById("dev-form");
  dev.hidden = !config.dev_sign_in;
  dev.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = new FormData(dev);
    const body = {
      user: String(form.get("user")).trim(),
      regions: String(form.get("regions") ?? ""),
      roles: [String(form.get("roles"))],
    };
    try {
      const res = await fetch("/api/v1/dev/token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const answer = await res.json();
      if (!res.ok) return fail(answer.detail ?? `refused (${res.status})`);
      fail("");
      sessionStorage.setItem(key, answer.token);
      onToken(answer.token);
    } catch (err) {
      fail(`The gateway did not answer: ${err}`);
    }
  });
}

/** Text of an element, set only when it changes (screen readers repeat live regions). */
export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}
