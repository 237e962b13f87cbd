"""A tiny TCP proxy: several gateway instances behind one loopback address.

Each new connection goes to the next backend in turn; a backend that refuses (killed,
restarting) is skipped. When either side closes, the other is closed too, so a client
whose gateway died sees its connection end and reconnects, to another instance. It is
the bad-network :class:`~tocsin.bench.netem.Link` with no profile (bytes piped straight
through).
"""

from __future__ import annotations

from tocsin.bench.netem import Link


class RoundRobinProxy(Link):
    def __init__(self, backends: list[tuple[str, int]], host: str = "127.0.0.1") -> None:
        super().__init__(list(backends), None, host=host)

    @property
    def backends(self) -> list[tuple[str, int]]:
        return self.upstreams

    async def start(self) -> RoundRobinProxy:
        await super().start()
        return self
