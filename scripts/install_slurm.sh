#!/usr/bin/env bash
# Install a single-node SLURM (slurmctld, slurmd, the client commands) and munge from the distribution's
# packages, for tests/test_slurm.py and scripts/slurm_cluster.sh. Debian/Ubuntu only.
# Idempotent and quiet: returns at once when the commands are already there; when they cannot be installed
# (not root, no apt-get, no network) it says why on one line and exits 0, and the test skips with that reason.
# Packages only: no daemon is started here (scripts/slurm_cluster.sh does that).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

installed() {
    command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged
}

if installed >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "install_slurm: not root; SLURM not installed (apt-get install ${PACKAGES[*]} as root)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get; SLURM not installed"
    exit 0
fi

echo "install_slurm: installing ${PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# an image with emptied package lists needs an update first; a failing update (offline) is not fatal yet
if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
    apt-get update -qq >>"$log" 2>&1 || true
    if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1; then
        echo "install_slurm: apt-get install failed; SLURM not installed (last lines of its output follow)"
        tail -n 5 "$log" | sed 's/^/  /'
        exit 0
    fi
fi
installed >/dev/null 2>&1 || { echo "install_slurm: packages installed but commands missing"; exit 0; }
echo "install_slurm: ok: slurm $(dpkg-query -W -f '${Version}' slurmctld)"
