"""A push stack: the token endpoint and the recording push endpoint (tocsin.bench.pushsink),
a gateway and a notifier in this process, all on one real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from faststream import FastStream
from nats.js import JetStreamContext

from tocsin.bench.pushsink import PushSink
from tocsin.core.settings import Settings
from tocsin.notifier.app import Notifier, app_notifiers, create_app

from ..support import Client, RunningGateway, start_gateway, token


@dataclass
class Stack:
    settings: Settings
    endpoints: PushSink
    gateway: RunningGateway
    app: FastStream | None = None

    @property
    def notifier(self) -> Notifier:
        assert self.app is not None
        return app_notifiers[self.app]

    async def start_notifier(self) -> None:
        self.app = create_app(self.settings, list(self.settings.nats_url))
        await self.app.start()

    async def stop_notifier(self) -> None:
        if self.app is not None:
            await self.app.stop()
            self.app = None

    async def register_http(self, sub: str, client_id: str, fcm_token: str, **kw: Any) -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.put(
                f"{self.gateway.http}/api/v1/devices/{client_id}/push",
                json={"provider": "fcm", "token": fcm_token},
                headers={"Authorization": f"Bearer {token(sub, **kw)}"},
            ) as resp,
        ):
            return resp.status

    async def offline_device(
        self, sub: str, fcm_token: str, client_id: str = "phone", groups: list[str] | None = None
    ) -> None:
        """A device that connected once (its queue and record exist), registered over its
        socket, perhaps subscribed, and left."""
        client = await Client.connect(self.gateway.ws_url, token(sub), client_id=client_id)
        await client.next("connection_established")
        await client.send({"type": "register_push", "provider": "fcm", "token": fcm_token})
        answer = await client.next("push_registered")
        assert answer == {"type": "push_registered", "provider": "fcm", "client_id": client_id}
        if groups:
            await client.send({"type": "subscribe", "groups": groups})
            assert (await client.next("subscription_response"))["status"] == "ok"
        await client.close()


@pytest.fixture
async def endpoints() -> AsyncIterator[PushSink]:
    running = await PushSink().start()
    yield running
    await running.stop()


@pytest.fixture
def push_settings(
    make_settings: Callable[..., Settings], endpoints: PushSink, tmp_path: Path
) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "push_url": endpoints.url,
            "push_credentials": endpoints.service_account(tmp_path / "service-account.json"),
            "push_after_seconds": 1.0,
            "push_backoff_seconds": 0.3,
            "push_max_attempts": 3,
            "push_concurrency": 8,
            "notifier_metrics_port": 0,
        }
        values.update(overrides)
        return make_settings(**values)

    return make


@pytest.fixture
async def stack(
    push_settings: Callable[..., Settings], endpoints: PushSink, js: JetStreamContext
) -> AsyncIterator[Stack]:
    settings = push_settings()
    gateway = await start_gateway(settings)
    running = Stack(settings, endpoints, gateway)
    await running.start_notifier()
    yield running
    await running.stop_notifier()
    await running.gateway.stop()
