"""The coarse half of filtering: JetStream subject filters for a device's durable consumer.

A subscription (``tocsin.schemas.subscription``) is judged exactly by the gateway; the
durable consumer only needs a *superset* of it expressed in subjects, so that the offline
queue holds what may match and skips the bulk of what cannot. Subjects carry country,
region, level and type (``alerts.<country>.<region>.<level>.<type>``), so those narrow on
the server; priority, risk, bbox and near are left to the gateway.

Each group (or "no groups") becomes a box: a set of regions × levels × types, ``None`` on
an axis meaning any. The boxes are intersected with the token's regions and the filters,
overlapping boxes are merged into their hull (JetStream refuses overlapping filters on one
consumer, error 10138), and the result is spelled as subjects. Past :data:`MAX_SUBJECTS`
the types, then the levels, are widened to any: the filter stays a superset, only coarser.
"""

from __future__ import annotations

from dataclasses import dataclass

from tocsin.schemas.alert import AlertLevel, region_contains
from tocsin.schemas.subscription import Group, Subscription

from .naming import Names

#: Many filter subjects slow JetStream delivery (nats-server #4888, #7014): stay below this.
MAX_SUBJECTS = 64

Axis = frozenset[str] | None  # None: any value


def _collapse(regions: frozenset[str]) -> frozenset[str]:
    """Drop regions contained in another of the set (``KE`` swallows ``KE-30``)."""
    return frozenset(
        r for r in regions if not any(o != r and region_contains(o, r) for o in regions)
    )


def _meet_regions(a: Axis, b: Axis) -> Axis:
    if a is None or b is None:
        return b if a is None else a
    inner = {r for r in a if any(region_contains(o, r) for o in b)}
    inner |= {r for r in b if any(region_contains(o, r) for o in a)}
    return _collapse(frozenset(inner))


def _meet(a: Axis, b: Axis) -> Axis:
    if a is None or b is None:
        return b if a is None else a
    return a & b


def _join_regions(a: Axis, b: Axis) -> Axis:
    return None if a is None or b is None else _collapse(a | b)


def _join(a: Axis, b: Axis) -> Axis:
    return None if a is None or b is None else a | b


@dataclass(frozen=True)
class Box:
    regions: Axis = None
    levels: Axis = None
    types: Axis = None

    @property
    def empty(self) -> bool:
        axes = (self.regions, self.levels, self.types)
        return any(axis is not None and not axis for axis in axes)

    def meet(self, other: Box) -> Box:
        return Box(
            _meet_regions(self.regions, other.regions),
            _meet(self.levels, other.levels),
            _meet(self.types, other.types),
        )

    def join(self, other: Box) -> Box:
        return Box(
            _join_regions(self.regions, other.regions),
            _join(self.levels, other.levels),
            _join(self.types, other.types),
        )

    def overlaps(self, other: Box) -> bool:
        return not self.meet(other).empty

    def size(self) -> int:
        return len(self.regions or (1,)) * len(self.levels or (1,)) * len(self.types or (1,))


def _group_box(group: Group) -> Box:
    if group.kind == "region":
        return Box(regions=frozenset({group.value}))
    if group.kind == "level":
        rank = AlertLevel(group.value).rank
        return Box(levels=frozenset(lv.value for lv in AlertLevel if lv.rank >= rank))
    if group.kind == "type":
        return Box(types=frozenset({group.value}))
    return Box()  # priority is not in the subject


def _filter_box(subscription: Subscription) -> Box:
    f = subscription.filters
    loc = f.location_filter
    regions = None
    if loc is not None and loc.regions is not None and loc.bbox is None and loc.near is None:
        regions = frozenset(loc.regions)  # with bbox/near an alert's point may decide instead
    types = None if f.alert_types is None else frozenset(f.alert_types)
    return Box(regions=None if regions is None else _collapse(regions), types=types)


def _merge(boxes: list[Box]) -> list[Box]:
    """Replace overlapping boxes by their hull until none overlap."""
    out = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                if out[i].overlaps(out[j]):
                    out[i] = out[i].join(out.pop(j))
                    changed = True
                    break
            if changed:
                break
    return out


def boxes(subscription: Subscription, token_regions: tuple[str, ...] | None) -> list[Box]:
    """Non-overlapping boxes whose union holds every alert ``subscription`` can match."""
    bound = Box(regions=None if token_regions is None else _collapse(frozenset(token_regions)))
    bound = bound.meet(_filter_box(subscription))
    groups = [_group_box(g) for g in subscription.groups] or [Box()]
    found = _merge([b for b in (bound.meet(g) for g in groups) if not b.empty])
    for widen in ("types", "levels"):
        if sum(b.size() for b in found) <= MAX_SUBJECTS:
            break
        found = _merge([Box(**{**b.__dict__, widen: None}) for b in found])
    return found


def _values(axis: Axis) -> list[str | None]:
    if axis is None:
        return [None]
    values: list[str | None] = [*sorted(axis)]
    return values


def coarse_filters(
    names: Names, subscription: Subscription, token_regions: tuple[str, ...] | None
) -> list[str]:
    """Subject filters for the device's consumer, sorted; never empty (nothing matches
    :attr:`Names.no_alerts`)."""
    found = boxes(subscription, token_regions)
    if sum(b.size() for b in found) > MAX_SUBJECTS:  # too many regions: the token alone
        return names.region_filters(token_regions)
    subjects = [
        names.alert_filter(region, level, type_)
        for b in found
        for region in _values(b.regions)
        for level in _values(b.levels)
        for type_ in _values(b.types)
    ]
    return sorted(subjects) or [names.no_alerts]
