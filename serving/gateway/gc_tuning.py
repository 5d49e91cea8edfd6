"""Garbage-collector settings for the long-lived serving processes.

A gateway or model replica holds a few hundred thousand objects from start-up
(Ray, torch, pydantic, SQLAlchemy) that live as long as the process. CPython's
collector rescans them on every full collection, and under load a request path
allocating a few hundred objects per request triggers one every second or two,
and its pause is what a light tenant's p99 meets beside a busy neighbour
(docs/benchmarks.md). After start-up,
:func:`settle` moves everything alive into the permanent generation
(:func:`gc.freeze`), so collections scan only what was made since, and lets the
youngest generation grow larger before it is collected. Cycles are still found
and freed; memory held by the frozen objects is what start-up holds anyway.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# Allocations minus deallocations before a young collection (CPython's default: 700).
YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Call once the process has finished starting (models loaded, ports open)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.info(
        "gc: %d start-up objects frozen; young threshold %d", gc.get_freeze_count(), YOUNG_THRESHOLD
    )
