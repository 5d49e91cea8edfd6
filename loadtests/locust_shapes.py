"""Load shapes selectable by name (``shape:`` in the config or ``GPUGATE_LOCUST_SHAPE``).

Every shape reads Locust's own ``-u`` (peak users), ``-r`` (spawn rate) and ``-t``
(run time, default 60 s) and stops the test when the run time is over:

* ``steady``: ``-u`` users from the start (spawned at ``-r``/s) until the end;
* ``ramp``: from 1 user up to ``-u`` over the first 80% of the run, then held;
* ``spike``: a fifth of ``-u`` (at least 1), then all ``-u`` at once for the
  middle 30% of the run, then back to the fifth;
* ``noisy-neighbour``: the light tenants (every tenant but ``noisy_tenant``,
  each with its fixed ``users``, default 1 per protocol it uses) run alone for
  the first third; then the noisy tenant joins with the rest of ``-u`` at once,
  at its own ``rate`` (none = back to back), until the end. :class:`PhaseRecorder`
  keeps each light tenant's latencies per phase, so the run ends with its p99
  alone and beside the flood.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from locust import LoadTestShape

DEFAULT_RUN_TIME_S = 60.0
ALONE = "alone"
BESIDE = "beside"


class _ShapeBase(LoadTestShape):
    abstract = True
    use_common_options = True

    def _options(self) -> tuple[int, float, float]:
        assert self.runner is not None
        opts = self.runner.environment.parsed_options
        users = int(getattr(opts, "num_users", None) or 10)
        rate = float(getattr(opts, "spawn_rate", None) or users)
        run_time = float(getattr(opts, "run_time", None) or DEFAULT_RUN_TIME_S)
        return users, rate, run_time


class SteadyShape(_ShapeBase):
    def tick(self) -> tuple[int, float] | None:
        users, rate, run_time = self._options()
        return None if self.get_run_time() >= run_time else (users, rate)


class RampShape(_ShapeBase):
    def tick(self) -> tuple[int, float] | None:
        users, rate, run_time = self._options()
        elapsed = self.get_run_time()
        if elapsed >= run_time:
            return None
        target = max(1, math.ceil(users * min(1.0, elapsed / (0.8 * run_time))))
        return target, rate


class SpikeShape(_ShapeBase):
    def tick(self) -> tuple[int, float] | None:
        users, _rate, run_time = self._options()
        elapsed = self.get_run_time()
        if elapsed >= run_time:
            return None
        base = max(1, users // 5)
        spiking = 0.4 * run_time <= elapsed < 0.7 * run_time
        # All users at once: a spike that ramps up is not a spike.
        return (users if spiking else base), float(users)


class NoisyNeighbourShape(_ShapeBase):
    """Light tenants alone for the first third, then the noisy tenant floods."""

    light_classes: ClassVar[list[Any]] = []
    all_classes: ClassVar[list[Any]] = []
    recorder: ClassVar[PhaseRecorder | None] = None

    def tick(self) -> tuple[int, float, list[Any]] | None:
        users, rate, run_time = self._options()
        elapsed = self.get_run_time()
        if elapsed >= run_time:
            return None
        light = sum(cls.fixed_count for cls in self.light_classes)
        if elapsed < run_time / 3:
            return light, rate, self.light_classes
        if self.recorder is not None:
            self.recorder.phase = BESIDE
        # The flood arrives at once, as a neighbour's batch job does.
        return max(users, light + 1), float(max(users, light + 1)), self.all_classes


SHAPES: dict[str, type[_ShapeBase]] = {
    "steady": SteadyShape,
    "ramp": RampShape,
    "spike": SpikeShape,
    "noisy-neighbour": NoisyNeighbourShape,
}


class PhaseRecorder:
    """Latencies of the light tenants' requests, by noisy-neighbour phase."""

    def __init__(self, light_tenants: list[str]) -> None:
        self.phase = ALONE
        self.light = set(light_tenants)
        self.ms: dict[tuple[str, str], list[float]] = {}

    def on_request(self, response_time: float, context: Any = None, **_kw: Any) -> None:
        tenant = (context or {}).get("tenant")
        if tenant in self.light:
            self.ms.setdefault((tenant, self.phase), []).append(float(response_time))

    def summary(self) -> list[str]:
        lines = []
        for tenant in sorted(self.light):
            alone = self.ms.get((tenant, ALONE), [])
            beside = self.ms.get((tenant, BESIDE), [])
            if not alone or not beside:
                lines.append(f"noisy-neighbour: {tenant}: not enough requests in both phases")
                continue
            p_alone = float(np.percentile(alone, 99))
            p_beside = float(np.percentile(beside, 99))
            lines.append(
                f"noisy-neighbour: {tenant} p99 alone {p_alone:.1f} ms ({len(alone)} requests), "
                f"beside the noisy tenant {p_beside:.1f} ms ({len(beside)} requests): "
                f"{p_beside / p_alone:.2f}x"
            )
        return lines
