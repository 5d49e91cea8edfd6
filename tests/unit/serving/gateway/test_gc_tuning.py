"""serving.gateway.gc_tuning.settle, in a fresh interpreter (it changes the process's collector)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json
from serving.gateway import gc_tuning
junk = [[i] for i in range(50_000)]  # start-up state that lives on
before = gc.get_freeze_count()
gc_tuning.settle()
frozen = gc.get_freeze_count()
# A cycle made after settling is still found and freed.
class Node: pass
a, b = Node(), Node()
a.peer, b.peer = b, a
del a, b
freed = gc.collect()
print(json.dumps({"before": before, "frozen": frozen, "threshold": gc.get_threshold(),
                  "freed": freed, "after": gc.get_freeze_count()}))
"""


def test_settle_freezes_start_up_objects_and_still_frees_new_cycles() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True, timeout=60
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == 0
    assert got["frozen"] > 50_000  # the list and its 50,000 rows at least
    assert got["threshold"][0] == 20_000
    assert got["freed"] >= 2  # the two nodes of the new cycle
    assert got["after"] == got["frozen"]  # frozen objects stay out of collections
