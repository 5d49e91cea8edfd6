"""The ``gpugate`` command."""

from serving.cli.main import main

__all__ = ["main"]
