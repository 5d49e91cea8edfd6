"""Write the RayService's serveConfigV2 from the gpugate config.

    .venv/bin/python deploy/kuberay/render_serve_config.py          # rewrite the manifest
    .venv/bin/python deploy/kuberay/render_serve_config.py --check  # exit 1 if it differs

serveConfigV2 in 02-rayservice.yaml is exactly what

    gpugate config render --config deploy/kuberay/config/gpugate.yaml --state-dir /var/lib/gpugate

prints: this replaces the block under ``serveConfigV2: |`` with that output and leaves
the rest of the file as it is. tests/unit/deploy/test_kuberay_serve_config.py fails
while the two differ.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = HERE / "config" / "gpugate.yaml"
MANIFEST = HERE / "02-rayservice.yaml"
# Where the pods mount the state volume (00-storage.yaml, 02-rayservice.yaml).
STATE_DIR = "/var/lib/gpugate"

_BLOCK_START = re.compile(r"(?P<indent> *)serveConfigV2: \|\n")


def render(config: Path = CONFIG, state_dir: str = STATE_DIR) -> str:
    """What ``gpugate config render`` prints for ``config``."""
    sys.path.insert(0, str(ROOT))
    from serving.cli.main import main

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.yaml"
        argv = ["config", "render", "--config", str(config), "--state-dir", state_dir]
        code = main([*argv, "-o", str(out)])
        if code != 0:
            raise SystemExit(f"gpugate config render failed ({code})")
        return out.read_text()


def splice(manifest: str, rendered: str) -> str:
    """``manifest`` with its ``serveConfigV2: |`` block replaced by ``rendered``."""
    lines = manifest.splitlines(keepends=True)
    found = [(i, m) for i, m in enumerate(map(_BLOCK_START.fullmatch, lines)) if m]
    if len(found) != 1:
        raise ValueError(f"{len(found)} 'serveConfigV2: |' lines, not one")
    ((start, match),) = found
    indent = match.group("indent") + "  "
    end = start + 1
    while end < len(lines) and (lines[end].startswith(indent) or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines belong to what follows
        end -= 1
    block = [indent + line if line.strip() else line for line in rendered.splitlines(True)]
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the manifest differs")
    args = parser.parse_args(argv)
    current = MANIFEST.read_text()
    wanted = splice(current, render())
    if current == wanted:
        return 0
    if args.check:
        print(f"{MANIFEST.name}: serveConfigV2 differs from the rendered config", file=sys.stderr)
        return 1
    MANIFEST.write_text(wanted)
    print(f"{MANIFEST.name}: serveConfigV2 written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
