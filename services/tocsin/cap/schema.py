"""Reading CAP 1.2 XML safely, and checking it against the OASIS XML Schema.

Untrusted XML is parsed by defusedxml with DTDs, entity declarations and external references
all forbidden: a document that declares any of them is refused before anything is expanded or
fetched (no XXE, no billion laughs, nothing read from disk or network). The size is checked
before parsing and the depth after (CAP nests five elements deep). The schema is the OASIS
XSD shipped in this package (cap-v1.2.xsd); it has no imports, so xmlschema reads nothing
else, and it is loaded once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import xmlschema
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

CAP_NS = "urn:oasis:names:tc:emergency:cap:1.2"
CAP_MEDIA_TYPE = "application/cap+xml"
XSD_PATH = Path(__file__).with_name("cap-v1.2.xsd")
#: The largest CAP document accepted (inline resources make CAP larger than alert JSON).
MAX_CAP_BYTES = 256 * 1024
#: Deepest element nesting accepted: CAP needs five (alert/info/area/geocode/value).
MAX_CAP_DEPTH = 8


class CapError(ValueError):
    """A CAP document tocsin does not take; ``field`` names the CAP element (may be empty)."""

    def __init__(self, field: str, message: str, reason: str = "invalid_cap") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.reason = reason  # the ingest Reason (DLQ subject token)


@functools.cache
def cap_schema() -> xmlschema.XMLSchema10:
    return xmlschema.XMLSchema10(str(XSD_PATH))


def looks_like_xml(raw: bytes) -> bool:
    """How an event on ``ingest.alerts`` is told apart: JSON starts with ``{``, XML with ``<``."""
    head = raw[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"<")


def tag(name: str) -> str:
    return f"{{{CAP_NS}}}{name}"


def _depth(root: Element) -> int:
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_CAP_DEPTH:
            break
        stack.extend((child, depth + 1) for child in node)
    return deepest


def parse_cap(raw: bytes) -> Element:
    """The document's root ``alert`` element, valid against the CAP 1.2 schema, or CapError."""
    if len(raw) > MAX_CAP_BYTES:
        raise CapError("", f"CAP document is {len(raw)} bytes; the limit is {MAX_CAP_BYTES}")
    try:
        root: Element = fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise CapError("", f"refused XML: {type(exc).__name__} (no DTDs or entities)") from exc
    except ParseError as exc:
        raise CapError("", f"not well-formed XML: {exc}") from exc
    if _depth(root) > MAX_CAP_DEPTH:
        raise CapError("", f"XML nests deeper than {MAX_CAP_DEPTH} elements")
    if root.tag != tag("alert"):
        raise CapError("", f"root element is {root.tag!r}; expected alert in {CAP_NS}")
    check_cap(root)
    return root


def check_cap(root: Element) -> None:
    """CapError naming the first element the CAP 1.2 schema refuses."""
    error: Any = next(iter(cap_schema().iter_errors(root)), None)
    if error is None:
        return
    path = str(getattr(error, "path", "") or "")
    field = ".".join(p.split("}")[-1].split("[")[0] for p in path.split("/") if p)
    reason = getattr(error, "reason", None) or str(error).splitlines()[0]
    raise CapError(field.removeprefix("alert.") or "alert", f"not valid CAP 1.2: {reason}")
