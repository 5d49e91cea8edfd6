"""``python -m serving.cli``: the ``gpugate`` command."""

from serving.cli import main

raise SystemExit(main())
