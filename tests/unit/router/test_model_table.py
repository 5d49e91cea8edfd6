"""The live model table: atomic swaps, production-only routing, staging in the index."""

from __future__ import annotations

from typing import Any, cast

import pytest

from router._exceptions import NotFound
from router.canary import Split
from router.model_table import STAGING_REASON, LiveModelTable
from router.service import IndexEntry, ServedModel
from router.types import ModelSignature, TensorSpec

SIG = ModelSignature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (1,)),), 8)


def served(name: str, version: str) -> ServedModel:
    return ServedModel(name, version, SIG, cast(Any, f"batcher-{name}-{version}"))


def test_only_production_takes_traffic_and_swaps_are_whole() -> None:
    table = LiveModelTable()
    with pytest.raises(NotFound, match="unknown model 'm'"):
        table.resolve("m", None)
    v1, v2 = served("m", "1"), served("m", "2")
    table.swap([v1], [v2])
    assert table.resolve("m", None) is v1 and table.resolve("m", "1") is v1
    with pytest.raises(NotFound, match="staging"):
        table.resolve("m", "2")
    with pytest.raises(NotFound, match="no version '3'"):
        table.resolve("m", "3")
    assert table.versions("m") == ["1"] and table.versions("other") == []
    assert table.index() == [
        IndexEntry("m", "1", "READY"),
        IndexEntry("m", "2", "UNAVAILABLE", STAGING_REASON),
    ]
    before = table.resolve("m", None)
    table.swap([v2, served("n", "10")])
    assert before is v1  # a request that resolved earlier keeps its version
    assert table.resolve("m", None) is v2
    assert [(e.name, e.version, e.state) for e in table.index()] == [
        ("m", "2", "READY"),
        ("n", "10", "READY"),
    ]
    with pytest.raises(ValueError, match="two production versions"):
        table.swap([v1, v2])
    assert table.resolve("m", None) is v2  # a refused swap changes nothing


def test_serving_lists_what_resolves_production_and_candidates() -> None:
    table = LiveModelTable()
    assert table.serving() == [] and table.serving("m") == []
    m1, m2, m3, n1 = served("m", "1"), served("m", "2"), served("m", "3"), served("n", "1")
    table.swap([m1, n1], [m2, m3])
    assert table.serving() == [m1, n1]  # staging versions take no requests
    table.set_splits({"m": Split("3", 0.1), "x": Split("1", 0.5)})  # "x" has no production
    assert table.serving() == [m1, m3, n1]
    assert table.serving("m") == [m1, m3] and table.serving("n") == [n1]
    assert table.serving("x") == [] and table.serving("nope") == []
    for m in table.serving():
        assert table.resolve(m.name, m.version) is m  # each one resolves, as listed
    table.set_splits({"m": Split("1", 0.5)})  # a split onto production itself: no duplicate
    assert table.serving("m") == [m1]
