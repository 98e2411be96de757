#!/usr/bin/env bash
# Installs what tests/slurm.py starts: Debian's slurm-wlm and munge, and libpmix-dev
# (Slurm's mpi_pmix_v4.so loads the unversioned libpmix.so, which only the -dev package
# has). Best effort, called by `make test`: where it cannot install (not root, no apt, no
# mirror) it says why, and the Slurm tests skip with the reason. Nothing is started here.
set -u
packages="slurm-wlm munge libpmix-dev"
installed() {
  command -v dpkg-query >/dev/null 2>&1 || return 1
  for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || return 1
  done
}
if installed; then
  exit 0
elif [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-slurm: not root or no apt-get: the Slurm tests will skip (install $packages to run them)"
  exit 0
fi
echo "install-slurm: apt-get install $packages"
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq >/tmp/install-slurm.log 2>&1 &&
   apt-get install -y -qq $packages >>/tmp/install-slurm.log 2>&1; then
  echo "install-slurm: done"
else
  echo "install-slurm: apt-get failed (the Slurm tests will skip): $(tail -n 2 /tmp/install-slurm.log | tr '\n' ' ')"
fi
exit 0
