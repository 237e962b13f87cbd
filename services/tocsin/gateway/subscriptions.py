"""What ``subscribe``, ``unsubscribe`` and ``update_filters`` do to a device's subscription.

The decision is pure (:func:`decide`); the session applies an accepted change to its queue
and its live filter (:meth:`Session.resubscribe`). A refused frame changes nothing: one bad
group spoils the whole frame, so a client never ends up half subscribed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tocsin.schemas import Subscribe, SubscriptionResponse, Unsubscribe, UpdateFilters
from tocsin.schemas.subscription import (
    MAX_GROUPS,
    FilterError,
    Filters,
    Group,
    Subscription,
    authorize,
    parse_group,
)

Status = Literal["ok", "denied", "invalid"]


@dataclass(frozen=True)
class Decision:
    subscription: Subscription  # the device's subscription after the frame
    status: Status
    detail: str = ""


def decide(
    current: Subscription,
    frame: Subscribe | Unsubscribe | UpdateFilters,
    token_regions: tuple[str, ...] | None,
) -> Decision:
    if isinstance(frame, UpdateFilters):
        try:
            filters = Filters.from_update(frame.filters)
        except FilterError as exc:
            return Decision(current, "invalid", str(exc))
        return Decision(Subscription(groups=current.groups, filters=filters), "ok")
    groups: list[Group] = []
    for text in frame.groups:
        try:
            groups.append(parse_group(text))
        except ValueError as exc:
            return Decision(current, "invalid", str(exc).splitlines()[0])
    if isinstance(frame, Unsubscribe):
        return Decision(current.unsubscribe(groups), "ok")
    _, denied = authorize(groups, token_regions)
    if denied:
        names = ", ".join(str(g) for g in denied)
        bound = ", ".join(token_regions or ())
        return Decision(current, "denied", f"{names}: outside the token's regions ({bound})")
    after = current.subscribe(groups)
    if len(after.groups) > MAX_GROUPS:
        return Decision(
            current, "invalid", f"groups: at most {MAX_GROUPS} per device; unsubscribe some first"
        )
    return Decision(after, "ok")


def response(
    frame: Subscribe | Unsubscribe | UpdateFilters, decision: Decision
) -> SubscriptionResponse:
    state = decision.subscription.as_dict()
    return SubscriptionResponse(
        action=frame.type,
        groups=list(getattr(frame, "groups", [])),
        status=decision.status,
        detail=decision.detail,
        subscribed=state["groups"],
        filters=state["filters"],
    )
