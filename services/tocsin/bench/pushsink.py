"""A stand-in for FCM on loopback, for the push tests, ``tocsin bench push`` and a look at
``make run``'s pushes: an OAuth2 token endpoint (the service account's ``token_uri``: it
checks the signed assertion) and a recording FCM HTTP v1 ``messages:send`` endpoint that
fails on demand, answers slowly, answers 429 with ``Retry-After`` and 404 UNREGISTERED.

``python -m tocsin.bench.pushsink [--port 9999]`` serves it and prints each push; point
``TOCSIN_PUSH_URL`` at the URL it prints (``TOCSIN_PUSH_CREDENTIALS`` at the service-account
file it writes, or leave that unset: it then takes requests without a bearer)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tocsin.core.supervisor import free_port

SEND_PATH = "/v1/projects/tocsin-test/messages:send"


@dataclass
class Pushed:
    at: float  # time.time() when the request arrived
    body: dict[str, Any]
    authorization: str | None

    @property
    def token(self) -> str:
        return str(self.body["message"]["token"])

    @property
    def alert_id(self) -> str:
        return str(self.body["message"]["data"]["alert_id"])


@dataclass
class PushSink:
    """Both servers on one loopback port. ``script[token]``: answers to give, in order,
    before the default 200; ``hold``: requests wait until it is set (then are answered).
    A push without a current bearer it minted is answered 401."""

    port: int = 0
    expires_in: int = 3600
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    pushes: list[Pushed] = field(default_factory=list)  # every request, answered or not
    accepted: list[Pushed] = field(default_factory=list)  # answered 200
    minted: list[str] = field(default_factory=list)
    script: dict[str, list[tuple[int, dict[str, str], dict[str, Any]]]] = field(
        default_factory=dict
    )
    delay: float = 0.0
    hold: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    check_auth: bool = True  # a push must carry the last minted bearer (else 401)
    in_flight: int = 0
    max_in_flight: int = 0  # the most requests open at once
    on_push: Any = None  # called with each Pushed as it arrives
    _expiry: dict[str, float] = field(default_factory=dict)  # minted token -> expiry

    def authorized(self, authorization: str | None) -> bool:
        """A bearer this endpoint minted that has not expired (several notifiers each hold
        their own, as with Google's token endpoint)."""
        token = (authorization or "").removeprefix("Bearer ")
        return self._expiry.get(token, 0.0) > time.time()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{SEND_PATH}"

    def service_account(self, path: Path) -> Path:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "tocsin-test",
                    "private_key_id": "k1",
                    "private_key": pem,
                    "client_email": "tocsin@tocsin-test.iam.gserviceaccount.com",
                    "client_id": "1",
                    "token_uri": f"http://127.0.0.1:{self.port}/token",
                }
            )
        )
        return path

    async def start(self) -> PushSink:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post(SEND_PATH, self._send)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = self.port or free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:  # google-auth signs for Google's token audience whatever token_uri is
            claims = jwt.decode(
                form.get("assertion", [""])[0],
                self.key.public_key(),
                algorithms=["RS256"],
                audience="https://oauth2.googleapis.com/token",
                issuer="tocsin@tocsin-test.iam.gserviceaccount.com",
            )
        except jwt.InvalidTokenError as exc:
            return web.json_response({"error": "invalid_grant", "detail": str(exc)}, status=400)
        if claims.get("scope") != "https://www.googleapis.com/auth/firebase.messaging":
            return web.json_response({"error": "invalid_scope"}, status=400)
        token = f"access-{len(self.minted) + 1}"
        self.minted.append(token)
        self._expiry[token] = time.time() + self.expires_in
        return web.json_response(
            {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.json()
        pushed = Pushed(time.time(), body, request.headers.get("Authorization"))
        self.pushes.append(pushed)
        self.arrived.set()
        if self.on_push is not None:
            self.on_push(pushed)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold is not None:
                await self.hold.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.check_auth and not self.authorized(pushed.authorization):
            return web.json_response(
                {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401
            )
        answers = self.script.get(pushed.token)
        if answers:
            status, headers, payload = answers.pop(0)
            return web.json_response(payload, status=status, headers=headers)
        self.accepted.append(pushed)
        return web.json_response({"name": f"projects/tocsin-test/messages/{len(self.accepted)}"})

    def fail(self, token: str, *answers: int, retry_after: str | None = None) -> None:
        """Answer the next requests for ``token`` with these statuses (404: UNREGISTERED)."""
        queue = self.script.setdefault(token, [])
        for status in answers:
            headers = {"Retry-After": retry_after} if retry_after and status == 429 else {}
            if status == 404:
                payload: dict[str, Any] = {
                    "error": {
                        "code": 404,
                        "status": "NOT_FOUND",
                        "details": [
                            {
                                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                "errorCode": "UNREGISTERED",
                            }
                        ],
                    }
                }
            else:
                payload = {"error": {"code": status, "status": "FAILED"}}
            queue.append((status, headers, payload))

    def accepted_for(self, token: str) -> list[Pushed]:
        return [p for p in self.accepted if p.token == token]

    def requests_for(self, token: str) -> list[Pushed]:
        return [p for p in self.pushes if p.token == token]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tocsin.bench.pushsink",
        description="A recording FCM HTTP v1 endpoint on loopback that prints each push.",
    )
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument(
        "--credentials",
        type=Path,
        default=Path(".tocsin/push-sink-service-account.json"),
        help="where to write a service-account file whose token_uri is this sink",
    )
    args = parser.parse_args(argv)

    async def serve() -> None:
        sink = PushSink(port=args.port, check_auth=False)
        sink.on_push = lambda p: print(
            f"push: token={p.token} alert_id={p.alert_id} "
            f"title={p.body['message']['notification']['title']!r}",
            flush=True,
        )
        await sink.start()
        args.credentials.parent.mkdir(parents=True, exist_ok=True)
        sink.service_account(args.credentials)
        print(f"TOCSIN_PUSH_URL={sink.url}", flush=True)
        print(f"TOCSIN_PUSH_CREDENTIALS={args.credentials} (optional)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sink.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
