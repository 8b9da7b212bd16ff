#!/bin/sh
# The local base image every Echelon image starts from: Debian bookworm (minbase) with
# its Python 3.11, built with debootstrap and `docker import`, since no registry can be
# pulled from here. Idempotent: an existing image is kept, a cached root file system is
# imported again without debootstrap.
#
#   sh deploy/docker/build-base.sh CACHE_DIR [TAG]
#
# CACHE_DIR keeps the root file system as a tarball (base-bookworm.tar, ~170 MB).
# MIRROR overrides the Debian mirror (default http://deb.debian.org/debian).
set -eu

cache=${1:?usage: build-base.sh CACHE_DIR [TAG]}
tag=${2:-echelon-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
tarball="$cache/base-bookworm.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image: $tag present"
    exit 0
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || {
        echo "debootstrap not found: apt-get install --no-install-recommends debootstrap" >&2
        exit 1
    }
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    echo "base image: debootstrap bookworm from $mirror (about a minute) ..."
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
        echo "debootstrap failed; see $cache/debootstrap.log" >&2
        tail -20 "$cache/debootstrap.log" >&2
        exit 1
    }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/dev/* "$rootfs"/tmp/* "$rootfs"/var/log/*.log
    tar -C "$rootfs" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi
echo "base image: importing $tarball as $tag"
docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm (python3, python3-venv)" \
    "$tarball" "$tag" >/dev/null
echo "base image: $tag built"
