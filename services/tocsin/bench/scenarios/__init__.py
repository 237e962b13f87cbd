"""The focused benchmarks beside ``tocsin bench``'s table: ``tocsin bench <scenario> [options]``.

Each scenario is a module of this package with its own options, its own Markdown table and
JSON twin (written to ``benchmarks/results/`` under the current directory unless ``--out``
says otherwise), runnable as ``tocsin bench <scenario>`` or
``python -m tocsin.bench.scenarios.<scenario>``; what they share is in :mod:`.common`.
This module stays light (no NATS, aiohttp or gateway imports): the ``tocsin`` command
builds its parser from :data:`SCENARIOS` and imports a scenario only to run it.
"""

from __future__ import annotations

import importlib

#: Scenario name -> one line of help (``tocsin bench --help``).
SCENARIOS: dict[str, str] = {
    "cap": "what CAP and the alert index cost: the ingest store with and without the "
    "index, CAP in and out per document, the backlog's supersede check",
    "compression": "permessage-deflate on and off with clients that offer it as browsers "
    "do: gateway memory and CPU, bytes per alert, heartbeat and reconnect bytes",
    "deadlinks": "how soon vanished peers and stuck readers are found, and what a stuck "
    "socket holds meanwhile",
    "delivery": "the gateway's live path against per-device durable pull consumers, "
    "catch-up and checkpoint cost (in-process gateway)",
    "ownership": "what claiming a device costs per WebSocket handshake: times and NATS "
    "operations (in-process gateway)",
    "push": "push notifications to 10,000 registered offline devices: pushes/s and the "
    "delay from append to push request (the notifier against a local FCM stand-in)",
    "peers": "tocsin beside Socket.IO 4 (Node.js) and the bare ceiling, the same clients "
    "with and without permessage-deflate offered: latency, deliveries/s, server CPU per "
    "delivery and per broadcast, idle CPU, memory and connect rate",
    "replicas": "R1 against R3 device consumers on a 3-node cluster, and a node's loss",
    "scale": "connections held against memory, connect time and CPU of every process, in "
    "steps up to 25,000, with one gateway process per core on one port (SO_REUSEPORT)",
    "storm": "a gateway restart (SIGTERM, then SIGKILL) with every device reconnecting at "
    "once: time until all are live with their backlog, handshake failures, JetStream calls",
    "subscriptions": "subscription change round trips and the fine filter's cost per device "
    "on broadcast (in-process gateway)",
}


def run_scenario(name: str, argv: list[str]) -> int:
    """Parse ``argv`` with scenario ``name``'s own options and run it; its exit code."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    module = importlib.import_module(f"{__name__}.{name}")
    code: int = module.main(argv, prog=f"tocsin bench {name}")
    return code
