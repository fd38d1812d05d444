#!/usr/bin/env bash
# Boot a throw-away systemd container on an overlay of a cached rootfs:
#   boot.sh ROOTFS WORKDIR CGROUP NAME [systemd-nspawn options...]
# Run in the background by tests/test_systemd_live.py; it does not return until the
# container is gone.
#
# - its own cgroup subtree: this shell moves itself into CGROUP (a new directory name) in the
#   cgroup2 hierarchy and, on a hybrid host, in the name=systemd one, before starting anything;
#   the test kills what is left in it and removes it at the end;
# - a private mount namespace (unshare) holding a tmpfs with the overlay's upper and work
#   directories and the overlay itself at WORKDIR/root: all of it vanishes with the namespace,
#   and ROOTFS is never written;
# - systemd-nspawn -b with --register=no --keep-unit (no machined, no system bus needed on a
#   host whose PID 1 is not systemd) and no network; its console goes to this script's stdout.
set -euo pipefail

rootfs=${1:?usage: boot.sh ROOTFS WORKDIR CGROUP NAME [nspawn options]}
work=${2:?}
cgroup=${3:?}
name=${4:?}
shift 4

# Hosts with cgroup2 alone have it at /sys/fs/cgroup; hybrid ones at /sys/fs/cgroup/unified
# beside the name=systemd v1 hierarchy.
for base in /sys/fs/cgroup/unified /sys/fs/cgroup /sys/fs/cgroup/systemd; do
  if [ -e "$base/cgroup.procs" ] && { [ "$base" != /sys/fs/cgroup ] || [ -e "$base/cgroup.controllers" ]; }; then
    mkdir "$base/$cgroup"
    echo $$ >"$base/$cgroup/cgroup.procs"
  fi
done

mkdir -p "$work/layers" "$work/root"
exec unshare --mount --propagation private -- /bin/sh -euc '
  rootfs=$1 work=$2 name=$3
  shift 3
  mount -t tmpfs -o mode=0755,size=4g captured-live "$work/layers"
  mkdir "$work/layers/upper" "$work/layers/work"
  mount -t overlay -o "lowerdir=$rootfs,upperdir=$work/layers/upper,workdir=$work/layers/work" \
    captured-live "$work/root"
  exec systemd-nspawn --quiet -D "$work/root" -M "$name" --register=no --keep-unit -b \
    --private-network --console=pipe --link-journal=no --resolv-conf=off --timezone=off "$@"
' boot "$rootfs" "$work" "$name" "$@"
