#!/bin/sh
# The Prometheus image of the compose deployment: Debian's prometheus package on the local
# base image (build-base.sh). The package and its dependencies are downloaded once, by a
# throwaway container of the base image (so apt resolves them against the base's own
# packages), into CACHE_DIR/prometheus/debs; the image build then needs no network.
# Idempotent: an existing image is kept, downloaded packages are reused.
#
#   sh deploy/docker/build-prometheus.sh CACHE_DIR [TAG] [BASE_TAG]
set -eu

cache=${1:?usage: build-prometheus.sh CACHE_DIR [TAG] [BASE_TAG]}
tag=${2:-echelon-prometheus:2.42}
base=${3:-echelon-base:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
context="$cache/prometheus"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "prometheus image: $tag present"
    exit 0
fi
if [ ! -f "$context/debs/.complete" ]; then
    echo "prometheus image: downloading Debian's prometheus and its dependencies ..."
    rm -rf "$context/debs"
    mkdir -p "$context/debs"
    docker run --rm --network host --user 0 -v "$(cd "$context/debs" && pwd):/out" "$base" \
        sh -c 'apt-get update -qq \
            && apt-get install -qq --download-only --no-install-recommends prometheus \
            && cp /var/cache/apt/archives/*.deb /out/'
    touch "$context/debs/.complete"
fi
echo "prometheus image: building $tag ($(ls "$context/debs" | wc -l) packages)"
DOCKER_BUILDKIT=0 docker build --quiet --network none --build-arg "BASE_IMAGE=$base" \
    -f "$here/Dockerfile.prometheus" -t "$tag" "$context" >/dev/null
echo "prometheus image: $tag built"
