#!/usr/bin/env bash
# Builds router/_grpcdoor (the native gRPC door, server.grpc_server: native) from
# grpcdoor.cc against the system's gRPC C++ (Debian/Ubuntu: libgrpc++-dev).
#
# Without gRPC C++ it installs Debian's package when it can (root with apt-get);
# otherwise it says what to install and exits 0: the gateway then serves gRPC on
# grpcio (server.grpc_server: auto). PYTHON names the interpreter to build for.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

have_grpc() { command -v pkg-config >/dev/null && pkg-config --exists grpc++; }

if ! have_grpc; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's libgrpc++-dev for the native gRPC door" >&2
    pkgs=(g++ pkg-config libgrpc++-dev)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; }
  fi
  if ! have_grpc; then
    echo "native gRPC door not built: install g++, pkg-config and libgrpc++-dev, then run" \
      "'make native'; until then the gRPC port is served by grpcio" >&2
    exit 0
  fi
fi

suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
out="router/_grpcdoor$suffix"
# shellcheck disable=SC2046  # pkg-config prints several words on purpose
g++ -O2 -std=c++17 -shared -fPIC -Wall -Wextra -Wno-missing-field-initializers \
  -I"$include" $(pkg-config --cflags grpc++) \
  -o "$out.tmp" router/native/grpcdoor.cc $(pkg-config --libs grpc++)
mv "$out.tmp" "$out"
echo "built $out (gRPC C++ $(pkg-config --modversion grpc++))" >&2
