"""The ``gpugate`` command line: conventions every command follows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from serving.cli.costs import when
from serving.cli.main import build_parser, main
from serving.cli.rollout import duration, steps

# The commands that open the database directly; every other one but the server's own
# (serve, deploy, config render: they run or describe the gateway) asks a gateway.
LOCAL = {("users", "bootstrap"), ("db", "upgrade")}
SERVER = {("serve",), ("deploy",), ("config", "render")}
# The commands that ask a gateway's data plane with a tenant's API key, not a user token.
TENANT_KEY = {("tenant", "status")}


def _commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command, however deep its group (e.g. ``tenants keys create``)."""
    found: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = []

    def walk(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found.append((path, parser))
            return
        for name, sub in subs[0].choices.items():
            walk((*path, name), sub)

    walk((), build_parser())
    return found


def test_every_command_but_the_servers_prints_json_on_request() -> None:
    for path, parser in _commands():
        options = {o for a in parser._actions for o in a.option_strings}
        if path in SERVER:
            assert "--url" not in options and "--token" not in options, path
            continue
        assert "--json" in options, path
        if path in TENANT_KEY:
            assert {"--url", "--key"} <= options and "--token" not in options, path
        elif path in LOCAL:
            assert "--url" not in options and "--database-url" in options, path
            assert "Admin only" in (parser.description or ""), path
        else:
            assert {"--url", "--token"} <= options, path
            assert "--config" not in options, path  # no client reads a policy


def test_help_documents_the_exit_codes() -> None:
    text = build_parser().format_help()
    assert "exit codes: 0 done; 1 refused or failed" in text
    assert "2 usage error" in text


def test_rollout_values_are_checked_as_usage() -> None:
    assert steps("5,25, 50") == [5, 25, 50]
    assert [duration(t) for t in ("500ms", "30s", "2m", "1h", "1.5")] == [
        0.5,
        30.0,
        120.0,
        3600.0,
        1.5,
    ]
    assert when("2026-11-01") == "2026-11-01"
    assert when("2026-11-01T10:00") == "2026-11-01T10:00:00+00:00"  # no zone: UTC
    assert when("2026-11-01T10:00:00+01:00") == "2026-11-01T10:00:00+01:00"
    for bad, call in (("10,x", steps), ("soon", duration), ("yesterday", when)):
        with pytest.raises(argparse.ArgumentTypeError):
            call(bad)


def test_options_that_do_not_go_together_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifact = tmp_path / "m.pt2"
    artifact.write_bytes(b"not read: the options are checked first")
    unreachable = ["--url", "http://127.0.0.1:9", "--token", "t"]
    cases = (
        (["audit", "verify", "--database-url", "sqlite://", *unreachable], "--offline"),
        (
            [
                "models",
                "register",
                "m",
                "--artifact",
                str(artifact),
                "--format",
                "export",
                "--input",
                "x:FP32:4",
                *unreachable,
            ],
            "both --input and --output",
        ),
    )
    for argv, says in cases:
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err
    # A gateway that cannot be reached is a failed action, not a usage error.
    assert main(["audit", "verify", *unreachable]) == 1
    assert "127.0.0.1:9" in capsys.readouterr().err
