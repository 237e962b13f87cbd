"""Settings (CONTRACT §2): defaults, parsing, and one clear line naming a bad variable."""

from __future__ import annotations

import os

import pytest

from tocsin.core.settings import Settings, SettingsError, exit_on_bad_settings, load_settings
from tocsin.schemas.alert import DEFAULT_ALERT_TYPES


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TOCSIN_ variable of the developer's shell or CI may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("TOCSIN_"):
            monkeypatch.delenv(name)


def test_contract_defaults() -> None:
    s = load_settings()
    assert s.nats_url == []  # unset: make run embeds a server
    assert s.http_host == "127.0.0.1"
    assert s.http_port == 8080
    assert s.jwt_secret is None
    assert s.jwt_public_key is None
    assert s.max_connections_per_user == 5
    assert s.max_messages_per_minute == 60
    assert s.ban_duration_minutes == 15
    assert s.offline_queue_max == 100
    assert s.retention_hours == 24
    assert s.retention_seconds == 24 * 3600
    assert s.heartbeat_seconds == 30


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "TOCSIN_NATS_URL": "nats://a:4222, tls://b:4222",
        "TOCSIN_HTTP_HOST": "0.0.0.0",
        "TOCSIN_HTTP_PORT": "9000",
        "TOCSIN_JWT_SECRET": "s" * 32,
        "TOCSIN_MAX_CONNECTIONS_PER_USER": "2",
        "TOCSIN_MAX_MESSAGES_PER_MINUTE": "10",
        "TOCSIN_BAN_DURATION_MINUTES": "1.5",
        "TOCSIN_OFFLINE_QUEUE_MAX": "7",
        "TOCSIN_RETENTION_HOURS": "2",
        "TOCSIN_HEARTBEAT_SECONDS": "5",
        "TOCSIN_REDELIVERY_BACKOFF": "0.5, 2",
        "TOCSIN_ALERT_TYPES": "flood_watch,heat_wave",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    assert s.nats_url == ["nats://a:4222", "tls://b:4222"]
    assert (s.http_host, s.http_port) == ("0.0.0.0", 9000)
    assert s.jwt_secret == "s" * 32
    assert s.max_connections_per_user == 2
    assert s.max_messages_per_minute == 10
    assert s.ban_duration_minutes == 1.5
    assert s.offline_queue_max == 7
    assert s.retention_seconds == 7200
    assert s.heartbeat_seconds == 5
    assert s.redelivery_backoff == [0.5, 2.0]
    assert s.accepted_alert_types == {*DEFAULT_ALERT_TYPES, "flood_watch", "heat_wave"}


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError):
        s.http_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOCSIN_HTTP_PORT", "abc"),
        ("TOCSIN_HTTP_PORT", "70000"),
        ("TOCSIN_OFFLINE_QUEUE_MAX", "0"),
        ("TOCSIN_REDELIVERY_BACKOFF", "1,x"),
        ("TOCSIN_REDELIVERY_BACKOFF", "1,-2"),
        ("TOCSIN_REDELIVERY_BACKOFF", ","),
        ("TOCSIN_NATS_URL", "http://x"),
        ("TOCSIN_NATS_URL", "nats://ok:4222,localhost:4222"),
        ("TOCSIN_HEARTBEAT_SECONDS", "0"),
        ("TOCSIN_CLUSTER", "2"),
        ("TOCSIN_CLUSTER", "0"),
        ("TOCSIN_CLUSTER", "three"),
        ("TOCSIN_MAX_CONNECTIONS_PER_USER", "-1"),
        ("TOCSIN_RETENTION_HOURS", "soon"),
        ("TOCSIN_ALERT_TYPES", "Flood-Watch"),
        ("TOCSIN_NAMESPACE", "Has.Dots"),
        ("TOCSIN_ACK_TIMEOUT_SECONDS", "0"),
        ("TOCSIN_ACK_TIMEOUT_SECONDS", "never"),
        ("TOCSIN_WS_COMPRESSION", "gzip"),
        ("TOCSIN_WS_COMPRESSION", "true"),
        ("TOCSIN_WS_SEND_BUFFER_KIB", "-1"),
        ("TOCSIN_WS_SEND_BUFFER_KIB", "256k"),
        ("TOCSIN_ALLOWED_ORIGINS", "evil.example"),
        ("TOCSIN_ALLOWED_ORIGINS", "https://a.example/path"),
        ("TOCSIN_JWT_JWKS_URL", "ftp://id.example/jwks"),
        ("TOCSIN_RATE_LIMIT_BURST", "0"),
        ("TOCSIN_BAN_AFTER_WARNINGS", "0"),
        ("TOCSIN_BAN_DURATION_MINUTES", "0"),
        ("TOCSIN_HANDSHAKE_TIMEOUT_SECONDS", "0"),
        ("TOCSIN_JWT_LEEWAY_SECONDS", "-1"),
        ("TOCSIN_NATS_CREDS", "/nonexistent/user.creds"),
        ("TOCSIN_NATS_INBOX_PREFIX", "has.dots"),
    ],
)
def test_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert variable in message
    assert "\n" not in message, "one line"


def test_bad_list_item_names_the_item(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOCSIN_REDELIVERY_BACKOFF", "1,x")
    with pytest.raises(SettingsError, match=r"TOCSIN_REDELIVERY_BACKOFF \(item 1\)"):
        load_settings()


def test_bad_value_shows_what_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOCSIN_HTTP_PORT", "abc")
    with pytest.raises(SettingsError, match="'abc'"):
        load_settings()


def test_rule_across_fields_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOCSIN_MAX_DELIVER", "3")  # the default backoff has 6 steps
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "TOCSIN_MAX_DELIVER" in str(info.value)
    assert "TOCSIN_REDELIVERY_BACKOFF" in str(info.value)


def test_short_jwt_secret_is_refused_without_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hunter2-but-longer"  # under 32 characters
    monkeypatch.setenv("TOCSIN_JWT_SECRET", secret)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "TOCSIN_JWT_SECRET" in message
    assert secret not in message
    assert "hunter2" not in message


def test_secret_never_appears_in_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "a-valid-secret-of-forty-characters-xyzw"
    monkeypatch.setenv("TOCSIN_JWT_SECRET", secret)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    body = pem.splitlines()[1]
    monkeypatch.setenv("TOCSIN_JWT_PUBLIC_KEY", pem)
    monkeypatch.setenv("TOCSIN_HTTP_PORT", "abc")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert secret not in str(info.value)
    assert body not in str(info.value)
    s = load_settings(http_port=1)
    assert secret not in repr(s) and secret not in str(s)
    assert body not in repr(s)


def test_a_bad_public_key_stops_start_up_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOCSIN_JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----private-ish")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "TOCSIN_JWT_PUBLIC_KEY" in str(info.value)
    assert "private-ish" not in str(info.value)


def test_settings_error_is_a_clean_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert issubclass(SettingsError, SystemExit)
    monkeypatch.setenv("TOCSIN_OFFLINE_QUEUE_MAX", "0")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.__cause__ is None  # no pydantic traceback at start-up


def test_exit_on_bad_settings_prints_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TOCSIN_HTTP_PORT", "abc")
    with pytest.raises(SystemExit) as info:
        exit_on_bad_settings()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "TOCSIN_HTTP_PORT" in err


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOCSIN_HTTP_PORT", "9000")
    assert load_settings(http_port=9100).http_port == 9100
    assert isinstance(load_settings(), Settings)


@pytest.mark.parametrize("value", ["alerts", "ingest", "tocsin", "a-b", "a_b", "A", "1abc"])
def test_namespaces_that_could_collide_are_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TOCSIN_NAMESPACE", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "TOCSIN_NAMESPACE" in str(info.value)


def test_tocsin_run_offers_the_dev_sign_in_only_with_its_own_dev_secret() -> None:
    from tocsin.cli.run import dev_sign_in
    from tocsin.core.settings import isolated_settings

    secret = "s" * 32
    assert dev_sign_in(isolated_settings(), {}) is True  # the dev secret of `tocsin run`
    assert dev_sign_in(isolated_settings(jwt_secret=secret), {}) is False
    off = {"TOCSIN_DEV_SIGN_IN": "false"}
    assert dev_sign_in(isolated_settings(dev_sign_in=False), off) is False
    on = {"TOCSIN_DEV_SIGN_IN": "true"}
    assert dev_sign_in(isolated_settings(jwt_secret=secret, dev_sign_in=True), on) is True
    assert isolated_settings().dev_sign_in is False  # the default: off
