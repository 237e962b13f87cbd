"""deploy/nginx/nginx.conf: WebSockets through to both gateways, with long read timeouts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from tocsin.core.settings import Settings

from .compose import ROOT, container_ports, environment

CONFIG = ROOT / "deploy" / "nginx" / "nginx.conf"
TOKEN = re.compile(
    r"""(?P<comment>#[^\n]*)|"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bad>["'])"""
    r"""|(?P<word>[;{}]|[^\s;{}"'#]+)"""
)
SERVICE = "proxy"


@dataclass
class Block:
    """One nginx context: its directives (name -> list of argument lists) and sub-blocks."""

    name: str
    args: list[str]
    directives: dict[str, list[list[str]]] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    def one(self, name: str) -> list[str]:
        values = self.directives.get(name, [])
        assert len(values) == 1, f"{self.name} {self.args}: {name} given {len(values)} times"
        return values[0]

    def block(self, name: str, *args: str) -> Block:
        found = [b for b in self.blocks if b.name == name and (not args or b.args == list(args))]
        assert len(found) == 1, f"expected one {name} {args} in {self.name}, found {len(found)}"
        return found[0]


def parse(text: str) -> Block:
    """nginx's config syntax: ``name args;`` and ``name args { ... }``, ``#`` comments,
    quoted strings. Unbalanced braces or a missing ``;`` raise."""
    tokens = []
    for m in TOKEN.finditer(text):
        if m["bad"]:
            raise AssertionError(f"unterminated quote at {m.start()}")
        if m["comment"] is None:
            tokens.append(next(g for g in (m["dq"], m["sq"], m["word"]) if g is not None))
    root = Block("main", [])
    stack = [root]
    words: list[str] = []
    for token in tokens:
        if token == ";":
            assert words, "empty directive"
            stack[-1].directives.setdefault(words[0], []).append(words[1:])
            words = []
        elif token == "{":
            assert words, "block without a name"
            block = Block(words[0], words[1:])
            stack[-1].blocks.append(block)
            stack.append(block)
            words = []
        elif token == "}":
            assert not words and len(stack) > 1, "unbalanced } or missing ;"
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, "unclosed block or missing ;"
    return root


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert m, value
    return int(m[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


@pytest.fixture(scope="module")
def conf() -> Block:
    return parse(CONFIG.read_text())


def gateway_location(conf: Block) -> Block:
    server = conf.block("http").block("server")
    return server.block("location", "/")


def test_the_parser_refuses_broken_syntax() -> None:
    with pytest.raises(AssertionError):
        parse("http { server { listen 8080 } }")
    with pytest.raises(AssertionError):
        parse("http { server { listen 8080; }")


def test_the_compose_service_mounts_this_file_as_nginx_conf(services: dict[str, Any]) -> None:
    assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in services[SERVICE]["volumes"]


def test_upstreams_are_the_gateway_services_on_their_http_ports(
    conf: Block, services: dict[str, Any]
) -> None:
    http = conf.block("http")
    target = gateway_location(conf).one("proxy_pass")[0]
    upstream = http.block("upstream", target.removeprefix("http://"))
    servers = [args[0] for args in upstream.directives["server"]]
    assert len(servers) >= 2
    for server in servers:
        host, port = server.rsplit(":", 1)
        assert host in services, f"upstream {host} is not a compose service"
        env = environment(services[host])
        assert env["TOCSIN_HTTP_PORT"] == port and int(port) in container_ports(services[host])
        assert services[host]["command"] == ["gateway"]
    gateways = {n for n, s in services.items() if s.get("command") == ["gateway"]}
    assert {s.rsplit(":", 1)[0] for s in servers} == gateways  # every gateway, no other


def test_websocket_upgrade_is_passed_through(conf: Block) -> None:
    location = gateway_location(conf)
    assert location.one("proxy_http_version") == ["1.1"]
    headers = {args[0]: args[1] for args in location.directives["proxy_set_header"]}
    assert headers["Upgrade"] == "$http_upgrade"
    variable = headers["Connection"]
    maps = [b for b in conf.block("http").blocks if b.name == "map"]
    mapping = next(b for b in maps if b.args == ["$http_upgrade", variable])
    assert mapping.directives["default"] == [["upgrade"]]


def test_idle_sockets_outlive_the_longest_heartbeat(conf: Block) -> None:
    # The gateway pings every TOCSIN_HEARTBEAT_SECONDS (at most this): an idle socket
    # must never be cut by the proxy first.
    longest = Settings.model_fields["heartbeat_seconds"].metadata
    ceiling = next(m.le for m in longest if getattr(m, "le", None) is not None)
    location = gateway_location(conf)
    assert seconds(location.one("proxy_read_timeout")[0]) > ceiling
    assert seconds(location.one("proxy_send_timeout")[0]) > ceiling


def test_the_proxy_listens_where_compose_publishes_and_health_checks(
    conf: Block, services: dict[str, Any]
) -> None:
    server = conf.block("http").block("server")
    listen = {int(args[0].rsplit(":", 1)[-1]) for args in server.directives["listen"]}
    proxy = services[SERVICE]
    assert container_ports(proxy) <= listen
    check = " ".join(proxy["healthcheck"]["test"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*)", check)
    assert m and int(m[1]) in listen
    assert server.block("location", "=", m[2]).one("return")[0] == "200"
