"""Types shared by the router's codecs, validation and servers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# KServe v2 datatype -> numpy dtype. BYTES is not served: models here are torch
# tensors in and out, so a BYTES tensor is refused as a wrong datatype.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DTYPE_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model signature. ``shape`` is one row's shape (no batch dim)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    input_by_name: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    output_names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_by_name", {t.name: t for t in self.inputs})
        object.__setattr__(self, "output_names", frozenset(t.name for t in self.outputs))


# Triton's convention: 1 is the most urgent level, larger is less urgent, and 0 (or no
# parameter) means the default level. Three levels: 1 urgent, 2 default, 3 background.
DEFAULT_PRIORITY = 0
DEFAULT_PRIORITY_LEVEL = 2
MAX_PRIORITY_LEVEL = 3
PRIORITY_LEVELS = range(1, MAX_PRIORITY_LEVEL + 1)


@dataclass(frozen=True)
class Rate:
    """``per_s`` tokens a second, at most ``burst`` held (at least 1)."""

    per_s: float
    burst: float

    @classmethod
    def of(cls, per_s: float | None, burst: float | None = None) -> Rate | None:
        """None without a rate; the burst defaults to one second's worth (at least 1)."""
        if per_s is None:
            return None
        return cls(per_s, burst if burst is not None else max(1.0, per_s))


@dataclass(frozen=True)
class Quota:
    """A tenant's rate quotas (over every model, or for one model)."""

    requests: Rate | None = None
    rows: Rate | None = None

    def __bool__(self) -> bool:
        return self.requests is not None or self.rows is not None


NO_QUOTA = Quota()


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float
    models: frozenset[str]  # "*" allows every model
    # The priority levels the tenant may ask for: a level is a grant, since a more
    # urgent level is served before fair share. The default level is always granted.
    priorities: frozenset[int] = frozenset({DEFAULT_PRIORITY_LEVEL})
    # Caps on the tenant's requests in flight and their input bytes, over every model;
    # None: the server's default.
    max_requests_in_flight: int | None = None
    max_bytes_in_flight: int | None = None
    # Why the tenant is suspended (every request refused 403 with it); None: served.
    suspended: str | None = None
    # Its budget is exhausted: why every request is refused (403); None: served.
    over_budget: str | None = None
    # Its budget is exhausted and it is served best effort: its requests at the least
    # urgent level (its weight is lowered by whoever looked it up).
    demoted: bool = False
    # Rate quotas (router.quota): over every model, and per model on top.
    quota: Quota = NO_QUOTA
    model_quotas: tuple[tuple[str, Quota], ...] = ()

    def quota_of(self, model: str) -> Quota:
        """The tenant's quota for ``model`` alone (NO_QUOTA when it has none)."""
        for name, quota in self.model_quotas:
            if name == model:
                return quota
        return NO_QUOTA

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def may_ask(self, priority: int) -> bool:
        return priority == DEFAULT_PRIORITY_LEVEL or priority in self.priorities
