"""The optional compiled part of gpugate: ``router._grpcdoor``, the native gRPC door.

Metadata, dependencies and packages live in pyproject.toml; this file only adds the
extension, compiled from router/native/grpcdoor.cc against the system's gRPC C++ as
``pkg-config grpc++`` describes it (docs/grpc.md).

``GPUGATE_NATIVE`` chooses:

* unset or ``auto``: build the door when pkg-config, gRPC C++ and a C++ compiler are
  present; otherwise warn and leave it out, so the package installs as pure Python
  (a ``py3-none-any`` wheel) and the gRPC port is served by grpcio.
* ``1``: the door is required; the build fails when it cannot be compiled.
* ``0``: never build it.

``GPUGATE_NATIVE_FLAGS`` adds flags to both the compile and the link (the sanitizer
build of ``make fuzz-native``, for one); they come last, so they win over the defaults.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

SOURCE = "router/native/grpcdoor.cc"
COMPILE_ARGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
MODE = os.environ.get("GPUGATE_NATIVE", "auto").strip().lower() or "auto"
if MODE not in ("auto", "0", "1"):
    sys.exit(f"GPUGATE_NATIVE must be auto, 0 or 1, not {MODE!r}")


def _pkg_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pkg-config", *args, "grpc++"], capture_output=True, text=True, check=False
    )


def _compiler() -> str:
    """The C++ compiler setuptools will call (CXX, else the one Python was built with)."""
    return os.environ.get("CXX") or str(sysconfig.get_config_var("CXX") or "c++")


def why_not_native() -> str | None:
    """None when the door can be built here, else what is missing."""
    if MODE == "0":
        return "GPUGATE_NATIVE=0"
    if shutil.which("pkg-config") is None:
        return "pkg-config is not installed"
    if _pkg_config("--exists").returncode != 0:
        return "pkg-config finds no grpc++ (gRPC C++'s development files are not installed)"
    compiler = shlex.split(_compiler())[0]
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not installed)"
    return None


def _skip(reason: str) -> None:
    message = f"native gRPC door (router._grpcdoor) not built: {reason}"
    if MODE == "1":
        sys.exit(f"error: {message} (GPUGATE_NATIVE=1 requires it; see docs/grpc.md)")
    print(
        f"WARNING: {message}. gpugate installs without it and serves gRPC on grpcio; "
        "docs/grpc.md lists the system packages that enable it.",
        file=sys.stderr,
    )


class OptionalBuildExt(build_ext):  # type: ignore[misc]  # setuptools: untyped here
    """Adds gRPC C++'s flags to the door; a failed compile leaves it out with a warning
    (or fails the build under GPUGATE_NATIVE=1)."""

    skipped = False

    def build_extension(self, ext: Extension) -> None:
        if OptionalBuildExt.skipped:  # a second pass of the same build (bdist_wheel's install)
            return
        cflags = _pkg_config("--cflags")
        libs = _pkg_config("--libs")
        if cflags.returncode != 0 or libs.returncode != 0:
            self._leave_out(ext, (cflags.stderr or libs.stderr).strip())
            return
        extra = shlex.split(os.environ.get("GPUGATE_NATIVE_FLAGS", ""))
        ext.extra_compile_args = [*COMPILE_ARGS, *shlex.split(cflags.stdout), *extra]
        ext.extra_link_args = [*shlex.split(libs.stdout), *extra]
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, a compiler that cannot start
            self._leave_out(ext, f"compiling {SOURCE} failed ({type(exc).__name__}; see above)")

    def copy_file(
        self, infile: str, outfile: str, *args: object, **kwargs: object
    ) -> tuple[str, bool]:
        """Put a door built in place by renaming over the old one, not writing into it:
        a process that has the old one loaded (a running gateway, a test run) would crash
        on the file changing under it."""
        partial = f"{outfile}.partial"
        _, copied = super().copy_file(infile, partial, *args, **kwargs)
        os.replace(partial, outfile)
        return outfile, copied

    def _leave_out(self, ext: Extension, reason: str) -> None:
        OptionalBuildExt.skipped = True
        _skip(reason)
        # A door left over from an earlier build must not ship in place of this one.
        stale = self.get_ext_fullpath(ext.name)
        if os.path.exists(stale):
            os.remove(stale)


class Wheel(bdist_wheel):  # type: ignore[misc]
    """A wheel whose tag says what it holds: pure when the door was left out."""

    def run(self) -> None:
        # The build runs first so that its outcome can decide the tag; the base class
        # chooses purelib or platlib before building.
        if not self.skip_build:
            self.run_command("build")
        if OptionalBuildExt.skipped:
            self.root_is_pure = True
        super().run()


why_not = why_not_native()
if why_not is not None:
    _skip(why_not)
extensions = (
    []
    if why_not is not None
    else [
        Extension(
            "router._grpcdoor",
            sources=[SOURCE],
            language="c++",
            optional=True,  # a door that failed to build is not copied in place
        )
    ]
)

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt, "bdist_wheel": Wheel})
