"""What admission lets a tenant do beyond its weight and models: the priority levels
granted to it and its caps on requests and input bytes in flight (enforced by the
router, ``router.service``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from router import DEFAULT_PRIORITY_LEVEL
from serving.config import TenantConfig, priority_levels

# Largest cap a tenant may be given (a 32-bit column holds the request cap).
MAX_REQUESTS_CAP = 2**31 - 1
# 2**53: the largest integer a JSON number carries exactly (clients parse them as doubles).
MAX_BYTES_CAP = 2**53


class _Keep:
    """A field an update leaves as it is (``None`` means "the server's default")."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


@dataclass(frozen=True)
class Admission:
    """What admission lets a tenant do beyond its weight: its priority levels and caps."""

    priorities: tuple[int, ...] = (DEFAULT_PRIORITY_LEVEL,)
    max_requests_in_flight: int | None = None  # None: the server's default
    max_bytes_in_flight: int | None = None

    @classmethod
    def checked(
        cls,
        priorities: Iterable[int] = (DEFAULT_PRIORITY_LEVEL,),
        max_requests_in_flight: int | None = None,
        max_bytes_in_flight: int | None = None,
    ) -> Admission:
        """Validated values (ValueError names the problem); the default level is added."""
        levels = tuple(priority_levels(list(priorities)))
        for name, value, top in (
            ("max_requests_in_flight", max_requests_in_flight, MAX_REQUESTS_CAP),
            ("max_bytes_in_flight", max_bytes_in_flight, MAX_BYTES_CAP),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top
            ):
                raise ValueError(f"{name} must be an integer in 0..{top} or unset, got {value!r}")
        return cls(levels, max_requests_in_flight, max_bytes_in_flight)

    @classmethod
    def of_config(cls, tc: TenantConfig) -> Admission:
        return cls.checked(tc.priorities, tc.max_requests_in_flight, tc.max_bytes_in_flight)

    @classmethod
    def of_row(cls, row: Any) -> Admission:
        return cls(
            tuple(json.loads(row.priorities)), row.max_requests_in_flight, row.max_bytes_in_flight
        )

    def columns(self) -> dict[str, Any]:
        return {
            "priorities": json.dumps(list(self.priorities)),
            "max_requests_in_flight": self.max_requests_in_flight,
            "max_bytes_in_flight": self.max_bytes_in_flight,
        }

    def described(self) -> dict[str, Any]:
        """The audit record's form."""
        return {
            "priorities": list(self.priorities),
            "max_requests_in_flight": self.max_requests_in_flight,
            "max_bytes_in_flight": self.max_bytes_in_flight,
        }


# A tenant without grants or caps of its own: the default level, the server's caps.
NO_GRANTS = Admission()
