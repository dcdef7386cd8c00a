#!/usr/bin/env bash
# The test command: installs everything the tests need and runs the suite.
#   bash tests/run.sh                 # the whole suite
#   bash tests/run.sh -k protocol -x  # extra arguments go to pytest
# Works on a fresh Debian machine as root with only python3: Debian packages
# (strace, Slurm, MPI bits, slirp4netns, ...) are apt-installed when missing, and
# the Python packages go into a FRESH virtual environment made for this run
# (no system site-packages), so a package the tests import but the test extras
# do not list fails here, not on a user's machine. The venv is removed at exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1

# --- System packages ---------------------------------------------------------
# What the tests need from Debian (the Slurm test bed installs slurmctld, slurmd,
# munge & co. itself in tests/slurm/up.sh, when a test first asks for it).
SYSTEM_PACKAGES=(python3-venv)   # the fresh venv below (Debian's python3 lacks ensurepip without it)
SYSTEM_PACKAGES+=(chromium)   # opens vinehpc report's HTML as a person would (tests/test_report.py)
SYSTEM_PACKAGES+=(strace curl iproute2)   # strace: vinehpc audit (tests/test_audit.py); curl, iproute2: tests/test_tunnel.py
SYSTEM_PACKAGES+=(openssl)   # Manager(ssl=True) makes its certificate with it (tests/test_tls.py)
SYSTEM_PACKAGES+=(slirp4netns uidmap nftables iptables)   # vinehpc net ns (tests/test_userlevel_net.py)
# CPython's concurrent.futures tests, run against vinehpc.Executor (tests/test_cf_conformance.py)
SYSTEM_PACKAGES+=("libpython$("${PYTHON:-python3}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-testsuite")

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

# --- Python packages: a fresh venv per run --------------------------------------
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "tests/run.sh: $PY cannot make a virtual environment (apt-get install python3-venv, or set PYTHON=)" >&2
    exit 1
fi
VENV_PARENT="$(mktemp -d "${TMPDIR:-/tmp}/vinehpc-test-venv.XXXXXX")"
trap 'rm -rf "$VENV_PARENT"' EXIT
VENV="$VENV_PARENT/venv"
"$PY" -m venv "$VENV"
# (this machine's pip.conf names local index folders that may not exist: drop pip's warning about each)
"$VENV/bin/python" -m pip install -q -e '.[test]' 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
# subprocesses (workers, `vinehpc ...`, Slurm jobs, mpiexec ranks) find this venv's python first
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
echo "tests/run.sh: fresh venv $VENV ($("$VENV/bin/python" --version))"

# --- Tests -------------------------------------------------------------------
rc=0
"$VENV/bin/python" -m pytest -q -ra "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: FAILED: pytest collected no tests (exit code 5)" >&2
    exit 1
fi
exit "$rc"
