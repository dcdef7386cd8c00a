#!/usr/bin/env bash
# The test command: installs vinehpc (editable, with test extras) into this
# machine's python3 and runs the test suite. Extra arguments go to pytest:
#   bash tests/run.sh -k protocol -x
# Works on a fresh Debian machine as root with only python3 + pip.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# No venv on purpose: we test against the machine's python. Debian marks its
# python "externally managed" (PEP 668); opt out, and silence root warnings.
# Older pips ignore variables for options they do not know.
export PIP_BREAK_SYSTEM_PACKAGES=1
export PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1

# --- System packages ---------------------------------------------------------
# Later issues add what their tests need here (e.g. strace, slurmctld slurmd
# slurm-client munge libpmix-dev, openmpi-bin). Nothing is installed while the
# list is empty.
SYSTEM_PACKAGES=(strace curl iproute2)   # strace: vinehpc audit (tests/test_audit.py); curl, iproute2: tests/test_tunnel.py
SYSTEM_PACKAGES+=(slirp4netns uidmap nftables iptables)   # vinehpc net ns (tests/test_userlevel_net.py)

install_system_packages() {
    # only what is missing: no apt-get (nor network) when everything is already installed
    local missing=() pkg
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_system_packages

# --- Python packages ---------------------------------------------------------
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "tests/run.sh: 'python3 -m pip' is not available; install pip (apt-get install python3-pip)" >&2
    exit 1
fi
python3 -m pip install -q -e '.[test]'

# --- Tests -------------------------------------------------------------------
rc=0
python3 -m pytest -q -ra "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: FAILED: pytest collected no tests (exit code 5)" >&2
    exit 1
fi
exit "$rc"
