"""The loaders and the forward pass import without Ray: the Triton benchmark peer runs
them in a venv of its own that has torch but no Ray."""

from __future__ import annotations

import subprocess
import sys

# What loadtests/peer_triton.py imports, with Ray made unimportable.
PROBE = """
import sys
sys.modules["ray"] = None  # any `import ray` now raises ImportError
from serving.config import ModelConfig
from serving.demo import bench_model_config
from serving.replica import ModelRunner, load_module
print("imported", ModelRunner.__name__)
try:
    from serving.replica import model_deployment
except ImportError:
    print("deployment needs ray")
"""


def test_runner_and_loaders_import_without_ray() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["imported ModelRunner", "deployment needs ray"]
