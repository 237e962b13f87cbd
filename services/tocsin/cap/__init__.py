"""OASIS CAP 1.2: reading it safely (schema.py), mapping it to and from the alert
(mapping.py), and the Atom index of current alerts (feed.py)."""

from .mapping import CapMeta, CapRules, derive_alert_id, parse_type_rules, to_alert, to_cap
from .schema import CAP_MEDIA_TYPE, MAX_CAP_BYTES, CapError, looks_like_xml, parse_cap

__all__ = [
    "CAP_MEDIA_TYPE",
    "MAX_CAP_BYTES",
    "CapError",
    "CapMeta",
    "CapRules",
    "derive_alert_id",
    "looks_like_xml",
    "parse_cap",
    "parse_type_rules",
    "to_alert",
    "to_cap",
]
