#!/bin/sh
# Installs Debian's prometheus package (the server and promtool) for the deploy checks in
# tests/deploy/. Idempotent: does nothing when promtool and prometheus are on PATH.
set -eu
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "install_prometheus: $(promtool --version 2>&1 | head -n 1) already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_prometheus: promtool/prometheus are missing and installing them needs root:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_prometheus: no apt-get here; install Prometheus 2.x (prometheus and promtool) on PATH" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends prometheus
# The package starts a system service on boot where systemd runs; the checks start their own.
promtool --version 2>&1 | head -n 1
