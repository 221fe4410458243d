#!/usr/bin/env bash
# System packages the project needs (Debian/Ubuntu, run as root): bubblewrap gives sandboxed
# benchmark programs a network namespace and a read-only filesystem (src/sandbox.py);
# slurm-wlm and munge give the single-node SLURM cluster of scripts/slurm_cluster.sh (tests/test_slurm.py).
# Usage: sudo scripts/install_system_deps.sh
set -euo pipefail

packages=(bubblewrap slurm-wlm munge)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
bwrap --unshare-net --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp true \
    || echo "warning: bwrap is installed but fails here; humaneval and mbpp will refuse to run (benchmark.allow_unconfined=true overrides)" >&2
