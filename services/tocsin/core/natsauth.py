"""NATS users with least privilege (issue 11; docs/security.md): what each of tocsin's
parties may publish and subscribe to, as a nats-server ``authorization`` block.

* ``engine`` (the alert engine): publish to ``ingest.alerts`` only; its PubAcks come to
  inboxes under ``_INBOX_engine`` (its client's inbox prefix: nats-py ``inbox_prefix``,
  Go ``nats.CustomInboxPrefix``). It cannot read ``ALERTS`` (no JetStream API, no
  ``alerts.>``) nor publish alerts past validation (``alerts.>``).
* ``ingest``: the JetStream API (its consumer on ``INGEST``, appends), acks, ``alerts.>``,
  the dead-letter subjects and the alert index (``tocsin.index.>``); the notifier (push
  notifications) connects as this user too, and publishes to ``tocsin.push.>`` and
  ``tocsin.devices.*.push``.
* ``gateway``: the JetStream API (device queues, records, the ``GUARD`` bucket), acks and
  flow control, its control subjects (takeover, stats) and replies to requests it got,
  and ``alerts.>`` (``POST /api/v1/alerts`` appends the alerts it validated).
* ``operator``: everything (``tocsin status``, ``tocsin ban``, the ``nats`` CLI).

Every party but the operator takes its inboxes under a prefix of its own
(``TOCSIN_NATS_INBOX_PREFIX`` for tocsin's services) and may subscribe to that prefix
only, so none can read the replies another gets: alerts fetched from device queues come
to the gateway's inbox. (The ingest service's faststream pull subscriber uses ``_INBOX``
whatever the prefix, so the ingest user may also subscribe there; no other party may.)
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from .naming import Names
from .settings import Settings

PARTIES = ("engine", "ingest", "gateway", "operator")
#: Inbox prefixes of the parties that must not share ``_INBOX`` (nats-py ``inbox_prefix``).
INBOXES = {"engine": "_INBOX_engine", "ingest": "_INBOX_ingest", "gateway": "_INBOX_gateway"}
USERS_FILE = "nats-users.json"


def permissions(names: Names, party: str) -> dict[str, Any]:
    """The nats-server ``permissions`` of ``party``."""
    prefix = f"{names.namespace}." if names.namespace else ""
    jetstream = ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>"]
    if party == "engine":
        return {
            "publish": {"allow": [names.ingest_subject]},
            "subscribe": {"allow": [f"{INBOXES['engine']}.>"]},  # its PubAcks, nothing else
        }
    if party == "ingest":
        # The notifier (push notifications) connects as this user too: it publishes its push
        # jobs, their ledger and dead letters, and drops a registration FCM no longer knows.
        push = [f"{prefix}tocsin.push.>", names.device_push_all]
        return {
            # index_all: where an appended alert is indexed by id (core/alert_index.py)
            "publish": {
                "allow": [*jetstream, names.alerts_all, names.dlq_all, names.index_all, *push]
            },
            # faststream's pull subscriber takes its inboxes under _INBOX whatever the
            # connection's prefix (no other party but the operator may subscribe there).
            "subscribe": {"allow": [f"{INBOXES['ingest']}.>", "_INBOX.>"]},
        }
    if party == "gateway":
        return {
            "publish": {
                "allow": [
                    *jetstream,
                    f"$KV.{names.guard_bucket}.>",
                    f"{prefix}tocsin.>",
                    names.alerts_all,  # POST /api/v1/alerts appends the alerts it validated
                ]
            },
            "subscribe": {"allow": [f"{INBOXES['gateway']}.>", f"{prefix}tocsin.>"]},
            "allow_responses": True,  # answers to takeover and stats requests
        }
    if party == "operator":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    raise ValueError(f"unknown party {party!r}; one of {', '.join(PARTIES)}")


def authorization_config(names: Names, passwords: dict[str, str] | None = None) -> str:
    """The ``authorization`` block for nats-server's config (JSON is valid there). Without
    ``passwords``, each is the variable ``$NATS_<PARTY>_PASSWORD`` (deploy/nats/users.conf:
    nats-server reads it from the environment)."""
    users = [
        {
            "user": party,
            "password": passwords[party] if passwords else variable(party),
            "permissions": permissions(names, party),
        }
        for party in PARTIES
    ]
    text = "authorization " + json.dumps({"users": users}, indent=2) + "\n"
    if not passwords:  # a variable is read only bare, never inside quotes
        for party in PARTIES:
            text = text.replace(f'"{variable(party)}"', variable(party))
    return text


def variable(party: str) -> str:
    return f"$NATS_{party.upper()}_PASSWORD"


def main() -> None:
    """``python -m tocsin.core.natsauth``: deploy/nats/users.conf, as committed."""
    print(
        "# The users of deploy/nats/nats.conf, written by `python -m tocsin.core.natsauth`\n"
        "# (tests/deploy/test_nats_users.py checks it is what that prints). Passwords come\n"
        "# from the environment (compose.yaml): NATS_ENGINE_PASSWORD, NATS_INGEST_PASSWORD,\n"
        "# NATS_GATEWAY_PASSWORD, NATS_OPERATOR_PASSWORD. Permissions: docs/security.md.\n"
        + authorization_config(Names()),
        end="",
    )


if __name__ == "__main__":
    main()


def load_or_create_passwords(data_dir: Path) -> dict[str, str]:
    """Each party's password for the embedded server, kept in ``data_dir`` (mode 0600),
    made on first use: the same across restarts of ``tocsin run``."""
    path = data_dir / USERS_FILE
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and all(isinstance(saved.get(p), str) for p in PARTIES):
            return {p: saved[p] for p in PARTIES}
    except (OSError, ValueError):
        pass
    passwords = {party: secrets.token_urlsafe(24) for party in PARTIES}
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(passwords, out)
    return passwords


def with_user(url: str, user: str, password: str) -> str:
    """``url`` carrying ``user``'s credentials (nats-py and faststream read them there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{quote(user)}:{quote(password)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect_options(settings: Settings) -> dict[str, Any]:
    """What nats-py's ``connect`` (and faststream's broker) take from the settings besides
    the URLs (which carry user/password or a token)."""
    options: dict[str, Any] = {}
    if settings.nats_creds is not None:
        options["user_credentials"] = str(settings.nats_creds)
    if settings.nats_inbox_prefix != "_INBOX":
        options["inbox_prefix"] = settings.nats_inbox_prefix
    return options
