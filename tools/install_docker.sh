#!/bin/sh
# Installs, from Debian, what the container deployment needs beyond the venv:
#   sh tools/install_docker.sh           the engine, Compose v1 and debootstrap
#                                        (docker.io, docker-compose, debootstrap), for
#                                        `make demo-docker`: nothing can be pulled here, so
#                                        the base image is built locally with debootstrap
#   sh tools/install_docker.sh compose   docker-compose alone, for the lint in `make test`
#                                        (`docker-compose config -q` needs no engine)
# Idempotent: installs only what is missing. Installing needs root; otherwise it says
# what to run.
set -eu
if [ "${1:-all}" = compose ]; then
    tools="docker-compose"
    packages="docker-compose"
else
    tools="dockerd docker docker-compose debootstrap"
    packages="docker.io docker-compose debootstrap"
fi
missing=""
for tool in $tools; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -z "$missing" ]; then
    echo "install_docker: $tools already installed" \
        "(docker-compose $(docker-compose version --short 2>/dev/null))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_docker: missing:$missing; installing needs root:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $packages" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_docker: missing:$missing and no apt-get here; install $packages" \
        "(a Docker engine, Compose v1, debootstrap) by other means" >&2
    exit 1
fi
echo "install_docker: missing:$missing; apt-get install $packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# --no-install-recommends: docker-compose alone does not pull in the engine. Where systemd
# runs, docker.io starts an engine of its own; make demo-docker starts a private one on
# its own socket either way (deploy/docker/engine.sh).
apt-get install -y --no-install-recommends $packages
docker-compose version --short
