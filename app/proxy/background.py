"""Background responses this process created: who pays for each (the creating call's attribution) and
which upstream holds it, so that the poll which finds it complete meters it for the right feature and user.

Bounded, and only a hint: the usage row of a background response is keyed by its response id, so the
database keeps it to one row however many polls, workers or replicas see it complete.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from app.call.record import CallRecord

_CAPACITY = 100_000


@dataclass(frozen=True, slots=True)
class Origin:
    feature: str | None
    user_id: str | None
    api_key_id: str | None
    model: str | None
    upstream: str


class BackgroundResponses:
    def __init__(self, capacity: int = _CAPACITY) -> None:
        self._origins: OrderedDict[str, Origin] = OrderedDict()
        self._metered: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def remember(self, response_id: str, call: CallRecord, upstream: str) -> None:
        who = call.admitted
        self._origins[response_id] = Origin(who.feature, who.user_id, who.api_key_id, who.model, upstream)
        _trim(self._origins, self._capacity)

    def origin(self, response_id: str) -> Origin | None:
        return self._origins.get(response_id)

    def first_metering(self, response_id: str) -> bool:
        """True the first time this process meters the response; later polls skip the event."""
        if response_id in self._metered:
            return False
        self._metered[response_id] = None
        _trim(self._metered, self._capacity)
        self._origins.pop(response_id, None)
        return True


def _trim(entries: OrderedDict[str, Any], size: int) -> None:
    while len(entries) > size:
        entries.popitem(last=False)
