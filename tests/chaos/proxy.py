"""A tiny TCP proxy: several gateway instances behind one loopback address.

Each new connection goes to the next backend in turn; a backend that refuses (killed,
restarting) is skipped. When either side closes, the other is closed too, so a client
whose gateway died sees its connection end and reconnects, to another instance.
"""

from __future__ import annotations

import asyncio
import contextlib

from tocsin.core.embedded import free_port


class RoundRobinProxy:
    def __init__(self, backends: list[tuple[str, int]], host: str = "127.0.0.1") -> None:
        self.backends = list(backends)
        self.host = host
        self.port = 0
        self._next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.routed: list[int] = [0] * len(backends)  # connections per backend
        self.refused = 0  # connections no backend took

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/api/v1/alerts/ws"

    async def start(self) -> RoundRobinProxy:
        self.port = free_port(self.host)
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _connect_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            index = self._next
            self._next = (self._next + 1) % len(self.backends)
            host, port = self.backends[index]
            try:
                pair = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            except (OSError, TimeoutError):
                continue
            self.routed[index] += 1
            return pair
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            backend = await self._connect_backend()
            if backend is None:
                self.refused += 1
                return
            b_reader, b_writer = backend
            try:
                up = asyncio.ensure_future(self._pipe(reader, b_writer))
                down = asyncio.ensure_future(self._pipe(b_reader, writer))
                try:
                    await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    up.cancel()
                    down.cancel()
                    with contextlib.suppress(BaseException):
                        await asyncio.gather(up, down, return_exceptions=True)
            finally:
                b_writer.close()
                with contextlib.suppress(Exception):
                    await b_writer.wait_closed()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
