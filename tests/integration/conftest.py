"""One real local Ray + Serve for the whole test session (a cold start costs ~10 s)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[None]:
    os.environ.pop("RAY_ADDRESS", None)
    from ray import serve

    from serving import cluster

    started = cluster.connect()
    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        cluster.shutdown(started)
