#!/bin/sh
# Fills a wheelhouse with every wheel of one variant's hashed locks, for image builds
# without network access and for air-gapped sites (docs/installing.md). pip checks every
# file against the lock's hashes while it downloads. Idempotent: a stamp names the locks'
# digest, and a wheelhouse that has it is not downloaded again.
#
#   sh deploy/docker/wheelhouse.sh VARIANT DIR [PIP_OPTION ...]
#
# Run from the repository root; PYTHON (default python3) runs pip, with pip's own
# configuration (indexes, find-links: where torch's CPU build is found on these machines).
set -eu

variant=${1:?usage: wheelhouse.sh VARIANT DIR [PIP_OPTION ...]}
dir=${2:?usage: wheelhouse.sh VARIANT DIR [PIP_OPTION ...]}
shift 2
python=${PYTHON:-python3}
torch_lock="requirements/torch-$variant.txt"
lock="requirements/lock-$variant.txt"
for f in "$torch_lock" "$lock"; do
    [ -f "$f" ] || { echo "no lock for VARIANT=$variant: $f" >&2; exit 1; }
done
digest=$(cat "$torch_lock" "$lock" | sha256sum | cut -c1-12)
stamp="$dir/.complete-$variant-$digest"
if [ -f "$stamp" ]; then
    echo "wheelhouse: $dir holds the $variant locks ($digest)"
    exit 0
fi
mkdir -p "$dir"
echo "wheelhouse: downloading the $variant locks into $dir ..."
"$python" -m pip --disable-pip-version-check download --quiet \
    --require-hashes --no-deps --only-binary=:all: -d "$dir" "$@" \
    -r "$torch_lock" -r "$lock"
rm -f "$dir"/.complete-"$variant"-*
touch "$stamp"
echo "wheelhouse: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
