"""All settings in one pydantic-settings model (CONTRACT §2); a bad value names its variable."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from tocsin.schemas.alert import ALERT_TYPE_PATTERN, DEFAULT_ALERT_TYPES, AlertLevel

#: A namespace equal to these would overlap the subjects of an un-namespaced deployment.
RESERVED_NAMESPACES = frozenset({"alerts", "ingest", "tocsin"})


def _csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of tocsin; environment variables are ``TOCSIN_`` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="TOCSIN_", extra="ignore", frozen=True)

    # --- CONTRACT §2 ---------------------------------------------------------------
    nats_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="NATS server URLs, comma-separated; empty = embedded"
    )
    nats_creds: Path | None = Field(
        default=None,
        description="a NATS .creds file (JWT + NKey) to connect with; user/password or a "
        "token go in TOCSIN_NATS_URL (nats://user:password@host:4222)",
    )
    nats_inbox_prefix: str = Field(
        default="_INBOX",
        pattern=r"^_?[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="prefix of this service's reply inboxes: one of its own lets NATS "
        "permissions keep other users from reading its replies (docs/security.md)",
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    jwt_secret: str | None = Field(default=None, min_length=32, repr=False)
    jwt_public_key: str | None = Field(default=None, repr=False)
    max_connections_per_user: int = Field(default=5, ge=1)
    max_messages_per_minute: int = Field(default=60, ge=1)
    ban_duration_minutes: float = Field(default=15, gt=0, le=7 * 24 * 60)
    ban_after_warnings: int = Field(
        default=3, ge=1, le=1000, description="rate_limit_warnings within a minute that ban a user"
    )
    offline_queue_max: int = Field(default=100, ge=1, le=1_000_000)
    retention_hours: float = Field(default=24, gt=0, le=24 * 365)
    heartbeat_seconds: float = Field(default=30, gt=0, le=3600)
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins a browser handshake (one with an Origin header) may come from, "
        "comma-separated ('*': any); empty: the gateway's own origin only",
    )
    jwt_jwks_url: str | None = Field(
        default=None,
        description="JWKS document of the identity provider: RS256/ES256 tokens are checked "
        "against the key their kid names",
    )
    jwt_issuer: str | None = Field(default=None, description="when set, a token's iss must match")
    jwt_audience: str | None = Field(default=None, description="when set, a token's aud must match")
    push_url: str | None = Field(
        default=None,
        description="endpoint taking FCM HTTP v1 messages:send bodies (FCM itself, "
        "https://fcm.googleapis.com/v1/projects/<project>/messages:send, or a push gateway); "
        "unset: no push notifications",
    )
    push_credentials: Path | None = Field(
        default=None,
        description="Google service-account JSON file; its token_uri mints the OAuth2 bearer "
        "sent to TOCSIN_PUSH_URL (unset: requests carry no Authorization)",
    )
    push_min_level: AlertLevel = Field(
        default=AlertLevel.HIGH,
        description="alerts at this alert_level or above are pushed to offline devices",
    )
    push_after_seconds: float = Field(
        default=10,
        gt=0,
        le=24 * 3600,
        description="a matching alert a device has not received this long after its append "
        "is pushed to it (once)",
    )

    # --- tocsin's own ----------------------------------------------------------------
    namespace: str = Field(
        default="",
        pattern=r"^([a-z][a-z0-9]{0,31})?$",
        description="prefix for every stream, subject and consumer; lets several "
        "deployments (or test runs) share one NATS",
    )
    replicas: int = Field(default=1, ge=1, le=5, description="replicas of the streams")
    device_replicas: int = Field(default=1, ge=1, le=5, description="replicas of device consumers")
    max_devices: int = Field(
        default=50_000, ge=1, description="max_consumers of ALERTS (the server default is 1,000)"
    )
    duplicate_window_seconds: float | None = Field(
        default=None, gt=0, description="ALERTS dedupe window; default: the retention"
    )
    max_inflight: int = Field(
        default=64, ge=1, le=10_000, description="alerts sent and not yet acked, per connection"
    )
    redelivery_backoff: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0, 30.0],
        description="the device queues' JetStream backoff (ack_wait is its first step): "
        "when JetStream offers an unacked alert again to a reader of the queue",
    )
    ack_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="on an open connection no alert is sent twice; a connection whose "
        "in-flight window stays full this long without an ack is closed (4408) so that it "
        "reconnects and gets the unacked alerts again",
    )
    max_deliver: int = Field(default=50, ge=2, description="JetStream max_deliver of device queues")
    checkpoint_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="how often the acked positions of a gateway's live devices are saved to "
        "JetStream, in a few journal messages per gateway; after a gateway crash a device may "
        "get again what it acked in this last interval",
    )
    queue_save_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="how often a live device's own queue is moved to its acked position (a "
        "consumer reset, ~0.5 ms of nats-server CPU each), when it moved; the journal holds "
        "the position meanwhile, and every close saves it",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="the gateway's event loop: 'auto' is uvloop where it is installed (a "
        "dependency), asyncio's own loop otherwise; 'uvloop' fails without it",
    )
    ws_compression: Literal["off", "client", "on"] = Field(
        default="client",
        description="permessage-deflate: 'client' accepts it from clients that ask with "
        "compression=deflate in the query (a phone on a slow link), 'on' whenever a client "
        "offers it (browsers always do), 'off' never. Fewer bytes per alert, for ~105 KiB "
        "of compressor per connection and CPU per frame (docs/benchmarks.md)",
    )
    handshake_timeout_seconds: float = Field(
        default=10,
        gt=0,
        le=300,
        description="a connection whose first HTTP request (the WebSocket upgrade) has not "
        "arrived whole by then is closed; also how long an idle HTTP keep-alive connection is "
        "kept",
    )
    rate_limit_burst: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="client messages a connection may send at once before "
        "TOCSIN_MAX_MESSAGES_PER_MINUTE paces it (the token bucket's size)",
    )
    jwt_leeway_seconds: float = Field(
        default=10, ge=0, le=300, description="clock skew allowed on exp, nbf and iat"
    )
    ws_send_buffer_kib: int = Field(
        default=256,
        ge=0,
        le=65536,
        description="SO_SNDBUF of each WebSocket connection, KiB (0: the kernel's autotuning, "
        "up to net.ipv4.tcp_wmem's maximum, 4 MiB by default): a client that stops reading is "
        "cut off once this much is unread (4008), instead of holding megabytes of kernel "
        "memory; 256 KiB carry ~2.5 MB/s to a client 100 ms away, far more than alerts need",
    )
    alert_types: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="alert types accepted besides the built-in ones"
    )
    cap_alert_types: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Health=outbreak_risk", "Infra=system_health"],
        description="CAP category (or Category/Event) -> alert_type, e.g. "
        "Met/Thunderstorm=storm,Met=weather,*=public_alert; the first match wins, "
        "Category/Event before Category before *; the types must be accepted ones",
    )
    cap_languages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["en"],
        description="CAP info languages in order of preference (en matches en-US); a message "
        "with none of them is read in its first info block",
    )
    cap_sender: str = Field(
        default="tocsin",
        pattern=r"^[^\s,<&]{1,200}$",
        description="the CAP sender of alerts tocsin emits that did not come as CAP",
    )
    data_dir: Path = Field(default=Path(".tocsin"), description="embedded nats-server data")
    nats_port: int = Field(default=4222, ge=0, le=65535, description="embedded nats-server port")
    cluster: int = Field(
        default=1,
        description="embedded nats-server nodes in `tocsin run`: 1, or 3 or 5 for a JetStream "
        "cluster on loopback (streams then default to 3 replicas)",
    )
    gateways: int = Field(
        default=1,
        ge=1,
        le=64,
        description="gateway processes `tocsin run` starts, sharing TOCSIN_HTTP_PORT "
        "(SO_REUSEPORT: the kernel spreads the connections); a gateway told it is one of "
        "more than 1 listens with SO_REUSEPORT",
    )
    gateway_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="this gateway process's own port beside the shared TOCSIN_HTTP_PORT, "
        "on TOCSIN_HTTP_HOST: the same endpoints (/metrics, /readyz, the stats), answered "
        "by this process alone; 0: none. `tocsin run` with TOCSIN_GATEWAYS > 1 gives its "
        "gateways this port and the next ones (free ports when 0)",
    )
    shutdown_grace_seconds: float = Field(default=10, gt=0)
    takeover_seconds: float = Field(
        default=15,
        gt=0,
        le=300,
        description="how long a new connection of a device waits for an older one to let the "
        "device go before it is closed with 4503",
    )
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="json: one JSON object per line; console: readable, for a terminal; "
        "auto: console when stderr is a terminal, else json",
    )
    ingest_metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="the ingest service's /metrics (and /healthz) on TOCSIN_HTTP_HOST; 0: off",
    )
    dev_sign_in: bool = Field(
        default=False,
        description="the browser page's development sign-in (POST /api/v1/dev/token mints "
        "any token for a loopback caller); `tocsin run` turns it on when it made the dev "
        "JWT secret itself. Never in production (docs/security.md)",
    )
    push_max_attempts: int = Field(
        default=8,
        ge=1,
        le=100,
        description="attempts of one push (429, 5xx, timeouts are retried); after the last "
        "it is kept in the PUSH_DLQ stream with the reason",
    )
    push_backoff_seconds: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="the first retry's delay; each further one doubles it (with jitter, at "
        "most 10 minutes), or waits what Retry-After says if that is longer",
    )
    push_concurrency: int = Field(
        default=64, ge=1, le=1024, description="push requests the notifier has in flight at once"
    )
    push_timeout_seconds: float = Field(
        default=10, gt=0, le=120, description="one push request's timeout (then it is retried)"
    )
    notifier_metrics_port: int = Field(
        default=9465,
        ge=0,
        le=65535,
        description="the notifier's /metrics (and /healthz) on TOCSIN_HTTP_HOST; 0: off",
    )
    stats_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="how long the stats' JetStream figures (offline queues, cluster) are "
        "reused before they are read again",
    )

    _split = field_validator(
        "nats_url",
        "alert_types",
        "allowed_origins",
        "cap_alert_types",
        "cap_languages",
        mode="before",
    )(_csv)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for origin in value:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]) or *")
        return [o.lower() for o in value]

    @field_validator("nats_creds")
    @classmethod
    def _creds_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)!r} is not a file (a NATS .creds file)")
        return value

    @field_validator("push_url")
    @classmethod
    def _push_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value or None

    @field_validator("push_credentials")
    @classmethod
    def _push_credentials(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        import json

        try:
            info = json.loads(value.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{str(value)!r}: not a readable JSON file ({exc})") from None
        keys = ("client_email", "private_key", "token_uri")
        missing = [k for k in keys if not isinstance(info, dict) or k not in info]
        if missing:
            raise ValueError(f"{str(value)!r}: not a service-account file (missing {missing})")
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value or None

    @field_validator("redelivery_backoff", mode="before")
    @classmethod
    def _floats(cls, value: object) -> object:
        return _csv(value)

    @field_validator("redelivery_backoff")
    @classmethod
    def _backoff_whole(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("needs one or more positive numbers of seconds, e.g. 1,2,4,8")
        return value

    @field_validator("alert_types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        import re

        for name in value:
            if not re.fullmatch(ALERT_TYPE_PATTERN, name):
                raise ValueError(f"{name!r} is not a valid alert type ({ALERT_TYPE_PATTERN})")
        return value

    @field_validator("cap_alert_types")
    @classmethod
    def _cap_types(cls, value: list[str]) -> list[str]:
        import re

        for item in value:
            key, sep, alert_type = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{item!r}: expected Category=alert_type or Category/Event=type")
            if not re.fullmatch(ALERT_TYPE_PATTERN, alert_type.strip()):
                raise ValueError(f"{item!r}: {alert_type!r} is not a valid alert type")
        return value

    @model_validator(mode="after")
    def _cap_types_accepted(self) -> Settings:
        for item in self.cap_alert_types:
            alert_type = item.partition("=")[2].strip()
            if alert_type not in self.accepted_alert_types:
                raise ValueError(
                    f"TOCSIN_CAP_ALERT_TYPES maps to {alert_type!r}, which TOCSIN_ALERT_TYPES "
                    "does not accept"
                )
        return self

    @model_validator(mode="after")
    def _gateway_port(self) -> Settings:
        if self.gateway_metrics_port and self.gateway_metrics_port == self.http_port:
            raise ValueError(
                f"TOCSIN_GATEWAY_METRICS_PORT and TOCSIN_HTTP_PORT are both {self.http_port}: "
                "a gateway's own port must differ from the port the gateways share"
            )
        return self

    @field_validator("nats_url")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"{url!r} is not a NATS URL (nats://host:port)")
        return value

    @field_validator("jwt_public_key")
    @classmethod
    def _pem(cls, value: str | None) -> str | None:
        if value:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                load_pem_public_key(value.encode())
            except ValueError:
                raise ValueError("not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
        return value

    @field_validator("cluster")
    @classmethod
    def _odd_cluster(cls, value: int) -> int:
        if value not in (1, 3, 5):
            raise ValueError("must be 1, 3 or 5 (a JetStream cluster needs an odd quorum)")
        return value

    @field_validator("namespace")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_NAMESPACES:
            raise ValueError(f"{value!r} is the first token of tocsin's own subjects")
        return value

    @model_validator(mode="after")
    def _deliver_exceeds_backoff(self) -> Settings:
        if self.max_deliver <= len(self.redelivery_backoff):
            raise ValueError(
                "TOCSIN_MAX_DELIVER must exceed the number of TOCSIN_REDELIVERY_BACKOFF steps"
            )
        return self

    @property
    def retention_seconds(self) -> float:
        return self.retention_hours * 3600

    @property
    def accepted_alert_types(self) -> frozenset[str]:
        return frozenset(DEFAULT_ALERT_TYPES) | frozenset(self.alert_types)


class _Isolated(Settings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def isolated_settings(**values: Any) -> Settings:
    """Settings from ``values`` and the defaults only, whatever this process's environment
    holds: for children whose settings the caller decides (``tocsin bench``)."""
    return _Isolated(**values)


class SettingsError(SystemExit):
    """Raised by :func:`load_settings`; its message is the one line printed at start-up."""


def load_settings(**overrides: object) -> Settings:
    """Read the environment; on a bad value raise SystemExit with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"]
        if not loc:  # a rule across fields: its message names the variables itself
            raise SettingsError(f"tocsin: invalid settings: {first['msg']}") from None
        field = str(loc[0])
        item = f" (item {loc[1]})" if len(loc) > 1 else ""
        secret = field in {"jwt_secret", "jwt_public_key"}
        shown = "" if secret or item else f" (got {first.get('input')!r})"
        raise SettingsError(
            f"tocsin: invalid TOCSIN_{field.upper()}{item}: {first['msg']}{shown}"
        ) from None


def exit_on_bad_settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
