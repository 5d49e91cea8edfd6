"""Canary rollouts through a real `gpugate serve` (local Ray, SQLite state, the demo model).

One gateway for the module; the tests run in order, each with its own candidate:
split accuracy and stickiness (HTTP and gRPC), a shadow-only candidate that differs
from production on a known share of inputs, a much slower candidate that is rolled
back automatically, and a good candidate that survives a gateway restart mid-rollout
and is promoted. Candidates are TorchScript modules built around the demo model's
own weights, so they answer like production except where a test wants them not to.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from serving.demo.models import DEMO_HIDDEN, DigitsMLP
from tests.e2e.conftest import (
    Gateway,
    Traffic,
    admin,
    admin_token,
    configured_gateway,
    make_user,
    send,
)
from tests.e2e.conftest import wait_for as poll

pytestmark = pytest.mark.timeout(900)

POLICY = "policies:\n  digits:\n    required_approvals: 1\n"


# -- candidates ------------------------------------------------------------------


class Differs(nn.Module):
    """Production's answer, except the class is shifted by one on marked inputs."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.base(pixels)
        marked = pixels[:, 0:1] > 100.0
        return torch.where(marked, logits.roll(1, dims=1), logits)


class Faulty(nn.Module):
    """Production's answer, but a batch holding a marked input fails (an index out of
    range, computed from the data, so the traced graph fails at run time)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.base(pixels)
        bad = (pixels[:, 0] > 100.0).long().max().reshape(1) * 1000
        return logits + 0.0 * logits.index_select(1, bad)


class Same(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(pixels)
        return out


def production_model(gw: Gateway) -> DigitsMLP:
    model = DigitsMLP(DEMO_HIDDEN)
    weights = gw.state_dir / "models" / "digits" / "1" / "model.safetensors"
    model.load_state_dict(safetensors.torch.load_file(weights))
    return model.eval()


def register_candidate(gw: Gateway, tmp: Path, module: nn.Module, version: str) -> None:
    path = tmp / f"candidate-{version}.pt"
    # Traced, not scripted: no Python control flow depends on the input.
    torch.jit.trace(module.eval(), torch.zeros(2, 64), check_trace=False).save(str(path))
    done = cli(
        gw,
        "models",
        "register",
        "digits",
        "--artifact",
        str(path),
        "--format",
        "torchscript",
        "--version",
        version,
        "--parent",
        "1",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    ok = cli(gw, "models", "approve", "digits", version, "--reason", "canary", token=approver(gw))
    assert ok.returncode == 0, ok.stderr


# -- gateway, CLI ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with configured_gateway(tmp_path_factory, "rollout-state", POLICY) as gw:
        yield gw


def cli(gw: Gateway, *args: str, token: str | None = None) -> Any:
    return gw.admin_cli(*args, token=token)


_approver: dict[Path, str] = {}


def approver(gw: Gateway) -> str:
    if gw.state_dir not in _approver:
        _approver[gw.state_dir] = make_user(gw, "appr", "approver")
    return _approver[gw.state_dir]


def status(gw: Gateway) -> dict[str, Any]:
    done = cli(gw, "rollout", "status", "digits", "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def api(gw: Gateway, method: str, path: str, body: Any = None) -> Any:
    """The admin HTTP API as the admin (no process start per call, unlike the CLI)."""
    status, data = admin(gw, method, path, admin_token(gw), body)
    assert status < 300, (status, data)
    return data


def stage(gw: Gateway, version: str) -> str:
    shown = cli(gw, "models", "show", "digits", version, "--json")
    return str(json.loads(shown.stdout)["stage"])


def wait_for(
    what: str, check: Any, timeout_s: float = 180.0, every_s: float = 0.25, gw: Any = None
) -> Any:
    """conftest's wait_for; a failure also shows the rollout's status when ``gw`` is given."""
    explain = None if gw is None else (lambda: f"rollout: {json.dumps(status(gw))}")
    return poll(what, check, timeout_s, every_s, explain)


def canary_ready(gw: Gateway, version: str) -> bool:
    return any(e["version"] == version and e["state"] == "READY" for e in gw.index())


# -- tests ---------------------------------------------------------------------------


def test_sticky_split_is_accurate_stable_and_explicit_versions_bypass_it(
    gateway: Gateway, tmp_path: Path
) -> None:
    register_candidate(gateway, tmp_path, Same(production_model(gateway)), "2")
    started = cli(
        gateway,
        "rollout",
        "start",
        "digits",
        "2",
        "--steps",
        "10,100",
        "--interval",
        "1h",
        "--sticky",
        "header:x-user",
        "--json",
    )
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["weights"] == {"1": 0.9, "2": 0.1}
    wait_for("the candidate to serve", lambda: canary_ready(gateway, "2"))

    users = [f"user-{i}" for i in range(5000)]
    first: dict[str, str | None] = {}
    lock = threading.Lock()

    def worker(part: list[str]) -> None:
        rng = random.Random(len(part))
        for u in part:
            o = send(gateway, False, u, rng)
            with lock:
                first[u] = o.version if o.status == 200 else f"failed: {o.status} {o.error}"

    threads = [threading.Thread(target=worker, args=(users[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(first.values()) == {"1", "2"}, Counter(first.values()).most_common(4)
    share = Counter(first.values())["2"] / len(users)
    print(f"sticky split: {share:.2%} of 5000 keys on the 10% candidate")
    assert abs(share - 0.10) <= 0.015, share

    rng = random.Random(7)
    again = rng.sample(users, 400)
    assert all(send(gateway, False, u, rng).version == first[u] for u in again)
    # Naming a version bypasses the split, whatever the key says.
    to_candidate = [u for u in again if first[u] == "2"][:20]
    assert to_candidate and all(
        send(gateway, False, u, rng, "1").version == "1" for u in to_candidate
    )
    assert send(gateway, False, None, rng, "2").version == "2"

    # gRPC metadata carries the same key to the same version.
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    x = grpcclient.InferInput("pixels", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    for u in again[:100]:
        result = client.infer(
            "digits", [x], headers={"authorization": f"Bearer {gateway.demo_key}", "x-user": u}
        )
        assert result.get_response().model_version == first[u]
    client.close()

    aborted = cli(gateway, "rollout", "abort", "digits", "--reason", "split checked")
    assert aborted.returncode == 0, aborted.stderr
    assert stage(gateway, "2") == "archived"
    assert all(send(gateway, False, u, rng).version == "1" for u in to_candidate)
    # The gauge follows at the controller's next pass (every 0.5 s), not with the command.
    wait_for(
        "the rollout gauge to say aborted",
        lambda: (
            gateway.metric("gpugate_rollout_state", model="digits", candidate="2", state="aborted")
            == 1.0
        ),
        timeout_s=10,
    )


def test_shadow_agreement_is_measured_and_drives_a_rollback(
    gateway: Gateway, tmp_path: Path
) -> None:
    register_candidate(gateway, tmp_path, Differs(production_model(gateway)), "3")
    started = cli(
        gateway,
        "rollout",
        "start",
        "digits",
        "3",
        "--steps",
        "0,100",
        "--interval",
        "3s",
        "--min-requests",
        "60",
        "--mirror",
        "100",
        "--min-agreement",
        "0.9",
        "--failure-threshold",
        "2",
    )
    assert started.returncode == 0, started.stderr
    wait_for("the candidate to deploy", lambda: canary_ready(gateway, "3"))
    with Traffic(gateway, threads=4, mark_share=0.25) as traffic:
        wait_for("the rollback", lambda: status(gateway)["state"] == "failed", 120, gw=gateway)
    seen = traffic.snapshot()
    assert seen and all(o.status == 200 for o in seen), [o for o in seen if o.status != 200][:3]
    assert {o.version for o in seen} == {"1"}  # step 0: shadow only, clients never see it

    st = status(gateway)
    history = [e["action"] for e in st["history"]]
    assert history[0] == "start" and history[-2:] == ["fail", "rollback"], history
    shadow = st["last_analysis"]["shadow"]
    print(f"shadow: {shadow}; client requests {len(seen)}, all 200")
    # A quarter of the inputs are marked and answered differently: agreement about 3/4.
    assert shadow["compared"] >= 60 and abs(shadow["agreement"] - 0.75) <= 0.1, shadow
    assert shadow["errors"] == 0
    assert "shadow_agreement" in st["history"][-1]["reason"]
    assert stage(gateway, "3") == "archived"
    assert (
        gateway.metric(
            "gpugate_shadow_requests_total", model="digits", version="3", outcome="compared"
        )
        >= shadow["compared"]
    )
    # Shadow work is billed to the 'shadow' owner, never to the tenant who sent it.
    with sqlite3.connect(gateway.state_dir / "gpugate.db") as db:
        owners = dict(
            db.execute(
                "SELECT a.tenant, SUM(a.requests) FROM ledger_allocations a "
                "JOIN ledger_batches b ON b.id = a.batch_id WHERE b.version = '3' "
                "GROUP BY a.tenant"
            ).fetchall()
        )
    assert set(owners) == {"shadow"} and owners["shadow"] >= shadow["compared"]


def test_a_faulty_candidate_is_rolled_back_within_two_intervals(
    gateway: Gateway, tmp_path: Path
) -> None:
    register_candidate(gateway, tmp_path, Faulty(production_model(gateway)), "4")
    interval = 3.0
    started = cli(
        gateway,
        "rollout",
        "start",
        "digits",
        "4",
        "--steps",
        "30,100",
        "--interval",
        f"{interval}s",
        "--min-requests",
        "15",
        "--failure-threshold",
        "2",
        "--max-p99-ratio",
        "4",
    )
    assert started.returncode == 0, started.stderr
    wait_for("the candidate to deploy", lambda: canary_ready(gateway, "4"))
    with Traffic(gateway, threads=4, mark_share=0.1) as traffic:
        first = wait_for(
            "a candidate answer",
            lambda: next((o.at for o in traffic.snapshot() if o.version == "4"), None),
        )
        rollout = "/models/digits/rollout"
        wait_for(
            "the rollback",
            lambda: api(gateway, "GET", rollout)["state"] == "failed",
            60,
            0.1,
            gateway,
        )
        rolled_back = time.monotonic()
        time.sleep(2.0)
    seen = traffic.snapshot()
    st = status(gateway)
    history = [(e["action"], e["reason"]) for e in st["history"]]
    # Rolled back at the second analysis: two intervals of traffic, no waits.
    failures = sum(o.status != 200 for o in seen)
    # The gateway's own clock: the rollback's record against the first candidate answer
    # (the window opened when the candidate entered the table, just before).
    first_wall = time.time() - (time.monotonic() - first)
    decided = datetime.fromisoformat(st["history"][-1]["at"]).timestamp() - first_wall
    print(
        f"faulty: rollback recorded {decided:.2f}s after the candidate's first answer "
        f"(interval {interval}s); {len(seen)} requests, {failures} failed, all on the "
        f"candidate; {history}"
    )
    assert [a for a, _ in history] == ["start", "fail", "rollback"], history
    assert decided <= 2 * interval + 1.0, decided
    served = Counter(o.version for o in seen)
    failed = [o for o in seen if o.status != 200]
    # The candidate's own failures are what the analysis caught; the switch itself
    # failed nobody: every failure names the candidate, none came from production, and
    # none after the rollback (a request in flight at that moment may still finish).
    assert served["4"] > 0 and failed
    assert all(o.status == 500 and "version 4 failed" in o.error for o in failed), failed[:3]
    assert all(o.at <= rolled_back + 1.0 for o in failed)
    assert {o.version for o in seen if o.at > rolled_back + 1.0} == {"1"}
    checks = {c["check"]: c for c in st["last_analysis"]["checks"]}
    assert not checks["error_rate"]["passed"] and checks["error_rate"]["value"] > 0.01
    assert stage(gateway, "4") == "archived"
    records = json.loads(cli(gateway, "audit", "log", "--json").stdout)
    rollback = [r for r in records if r["action"] == "rollout.rollback"][-1]
    assert rollback["actor"] == "rollout-controller"
    assert rollback["after"]["figures"]["candidate"]["version"] == "4"
    assert rollback["after"]["figures"]["candidate"]["errors"] > 0


def test_good_candidate_resumes_after_a_restart_and_is_promoted(
    gateway: Gateway, tmp_path: Path
) -> None:
    register_candidate(gateway, tmp_path, Same(production_model(gateway)), "5")
    started = cli(
        gateway,
        "rollout",
        "start",
        "digits",
        "5",
        "--steps",
        "25,50,100",
        "--interval",
        "4s",
        "--min-requests",
        "15",
        "--max-p99-ratio",
        "4",
    )
    assert started.returncode == 0, started.stderr
    wait_for("the candidate to deploy", lambda: canary_ready(gateway, "5"))
    with Traffic(gateway, threads=3) as traffic:
        # The admin API, not the CLI: no process start between seeing step 2 and pausing.
        rollout = "/models/digits/rollout"
        wait_for("step 2", lambda: api(gateway, "GET", rollout)["step"] >= 2, 90, 0.1, gateway)
        paused = api(gateway, "POST", rollout + "/pause", {"reason": "restart"})
        assert (paused["state"], paused["step"]) == ("paused", 2), paused
    assert all(o.status == 200 for o in traffic.snapshot())
    assert status(gateway)["step"] == 2

    gateway.restart()

    st = status(gateway)
    assert (st["state"], st["step"], st["weights"]) == ("paused", 2, {"1": 0.5, "5": 0.5})
    wait_for("the candidate to serve again", lambda: canary_ready(gateway, "5"))
    rng = random.Random(3)
    got = Counter(send(gateway, False, None, rng).version for _ in range(200))
    assert got["5"] == pytest.approx(100, abs=2), got  # the paused step's split, exactly

    with Traffic(gateway, threads=3) as traffic:
        assert cli(gateway, "rollout", "resume", "digits").returncode == 0
        wait_for("the promotion", lambda: status(gateway)["state"] == "succeeded", 90, gw=gateway)
        wait_for(
            "v1 to leave",
            lambda: not canary_ready(gateway, "1") and stage(gateway, "5") == "production",
            90,
        )
        time.sleep(1.0)
    seen = traffic.snapshot()
    assert seen and all(o.status == 200 for o in seen), [o for o in seen if o.status != 200][:3]
    assert seen[-1].version == "5"
    print(
        f"promotion: {len(seen)} requests across resume and promotion, 0 failed; "
        f"{Counter(o.version for o in seen)}"
    )
    assert stage(gateway, "1") == "archived"
    history = [e["action"] for e in status(gateway)["history"]]
    assert history[:1] == ["start"] and history[-1] == "promote"
    assert "pause" in history and "resume" in history


def test_rollout_commands_refuse_bad_input_and_wrong_roles(gateway: Gateway) -> None:
    def call(method: str, path: str, body: Any, token: str) -> tuple[int, Any]:
        return admin(gateway, method, path, token, body)

    root = admin_token(gateway)
    made = cli(gateway, "users", "create", "fin-ro", "--role", "finance", "--json")
    finance = json.loads(made.stdout)["token"]
    code, body = call("GET", "/models/nope/rollout", None, root)
    assert code == 404 and "no rollout" in body["error"]
    code, body = call("POST", "/models/digits/rollout", {"version": "4", "steps": [50, 10]}, root)
    assert code == 400 and "steps must increase" in body["error"]
    code, body = call("POST", "/models/digits/rollout", {"version": "4", "color": "red"}, root)
    assert code == 400 and "color" in body["error"]
    code, body = call("POST", "/models/digits/rollout", {"version": "4"}, finance)
    assert code == 403 and "may not models.promote" in body["error"]
    code, body = call("POST", "/models/digits/rollout/pause", {}, root)
    assert code == 404 and "no rollout in progress" in body["error"]
    # The CLI says the same in its own form.
    bad = cli(gateway, "rollout", "start", "digits", "4", "--steps", "10,x")
    assert bad.returncode == 2 and "comma-separated percentages" in bad.stderr
    bad = cli(gateway, "rollout", "start", "digits", "4", "--interval", "soon")
    assert bad.returncode == 2 and "duration 'soon'" in bad.stderr
    assert cli(gateway, "rollout", "status", "digits", token=finance).returncode == 0
    assert gateway.proc.poll() is None
