#!/bin/sh
# Starts a private Docker engine on its own socket unless one already answers there
# (idempotent), with the flags this kind of machine needs (deploy/compose/README.md):
# no iptables, no default bridge, explicit ulimits.
#
#   sh deploy/docker/engine.sh [STATE_DIR] [SOCKET]        start (if not running)
#   sh deploy/docker/engine.sh STATE_DIR SOCKET stop        stop the one it started
#
# STATE_DIR (default /var/lib/echelon-docker) holds the images, containers and volumes
# (data/), the engine's runtime files (exec/), its pid file and its log (dockerd.log).
# Then: export DOCKER_HOST=unix://SOCKET (default /run/echelon-docker.sock).
set -eu

state=${1:-/var/lib/echelon-docker}
socket=${2:-/run/echelon-docker.sock}
export DOCKER_HOST="unix://$socket"
pidfile="$state/dockerd.pid"

if [ "${3:-start}" = stop ]; then
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        pid=$(cat "$pidfile")
        kill "$pid"
        tries=0
        while kill -0 "$pid" 2>/dev/null; do
            tries=$((tries + 1))
            [ "$tries" -le 30 ] || { echo "docker engine: dockerd $pid still runs after 30 s" >&2; exit 1; }
            sleep 1
        done
        echo "docker engine: stopped dockerd $pid"
    else
        echo "docker engine: no dockerd of ours runs ($pidfile)"
    fi
    exit 0
fi

if docker info >/dev/null 2>&1; then
    echo "docker engine: running at $DOCKER_HOST"
    exit 0
fi
command -v dockerd >/dev/null || {
    echo "dockerd not found: apt-get install --no-install-recommends docker.io docker-compose" >&2
    exit 1
}
if [ "$(id -u)" != 0 ]; then
    echo "starting dockerd needs root; or point DOCKER_HOST at a running engine" >&2
    exit 1
fi
mkdir -p "$state/data" "$state/exec" "$(dirname "$socket")"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "docker engine: dockerd $(cat "$pidfile") runs but does not answer at $DOCKER_HOST;" \
        "see $state/dockerd.log" >&2
    exit 1
fi
rm -f "$pidfile" "$socket"
# setsid: the engine outlives the make that started it; its log goes to the state dir.
setsid dockerd \
    --data-root "$state/data" --exec-root "$state/exec" \
    -H "unix://$socket" --pidfile "$pidfile" \
    --iptables=false --ip-masq=false --bridge=none \
    --default-ulimit nofile=1024:1024 --default-ulimit nproc=4096:4096 \
    </dev/null >>"$state/dockerd.log" 2>&1 &
tries=0
until docker info >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ]; then
        echo "docker engine: no answer at $DOCKER_HOST after 60 s; last lines of" \
            "$state/dockerd.log:" >&2
        tail -20 "$state/dockerd.log" >&2
        exit 1
    fi
    sleep 1
done
echo "docker engine: started dockerd $(cat "$pidfile") at $DOCKER_HOST (state in $state)"
