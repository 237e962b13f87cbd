"""Alert bodies for demos, benchmarks and tests: valid, with a fresh integer ``alert_id``."""

from __future__ import annotations

import itertools
import time
from typing import Any

#: Ids from the current time in ms upwards: distinct across runs against one stream.
_ids = itertools.count(int(time.time() * 1000) + 1)


def alert_body(region: str = "KE-30", **fields: Any) -> dict[str, Any]:
    """An alert as the ingest service takes it; ``fields`` replace or add keys."""
    body: dict[str, Any] = {
        "alert_id": next(_ids),
        "alert_level": "high",
        "alert_type": "outbreak_risk",
        "title": "Malaria outbreak risk rising",
        "message": "Risk model predicts a rise in cases",
        "priority": "urgent",
        "location": {"region": region},
        "risk_score": 0.8,
    }
    body.update(fields)
    return body
