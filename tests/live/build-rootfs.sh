#!/usr/bin/env bash
# Build (once) and cache the Debian rootfs that tests/test_systemd_live.py boots with
# systemd-nspawn: `build-rootfs.sh DIR [MIRROR]`. DIR holds a finished tree only when
# DIR/.captured-live-stamp matches what this script would build; otherwise it is built in
# DIR.build-<pid> beside it and renamed into place, so an interrupted build never leaves a
# half tree behind. A lock (DIR.lock) keeps two runs from building at once.
#
# Exit status: 0 the tree is ready (printed on stdout); 3 it cannot be built here (no
# debootstrap, no mirror reachable, ...: the test skips, with the last lines of the log).
set -euo pipefail

dir=${1:?usage: build-rootfs.sh DIR [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
suite=bookworm
# No procps on purpose: a minimal host has no /bin/kill, and the unit's ExecReload= must not
# need it (it once did: `systemctl reload captured` failed with status=203/EXEC).
include=systemd,systemd-sysv,dbus,libnss-systemd,python3,python3-venv
stamp="captured-live rootfs v2: debootstrap --variant=minbase --include=$include $suite $mirror"

ready() { [ -f "$dir/.captured-live-stamp" ] && [ "$(cat "$dir/.captured-live-stamp")" = "$stamp" ]; }

mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock -w 900 9 || { echo "another build of $dir holds $dir.lock" >&2; exit 3; }

if ready; then
  echo "$dir"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed" >&2; exit 3; }

build="$dir.build-$$"
log="$dir.build.log"
rm -rf "$build"
trap 'rm -rf "$build"' EXIT
echo "building $dir with debootstrap (about 100 s; log: $log)" >&2
if ! timeout 1200 debootstrap --variant=minbase --include="$include" "$suite" "$build" "$mirror" >"$log" 2>&1; then
  echo "debootstrap failed:" >&2
  tail -n 15 "$log" >&2
  exit 3
fi
# Keep the tree small and the boot quiet: no apt caches, a machine id made at each boot, no
# getty on the console (nspawn's console is a pipe here).
rm -rf "$build"/var/cache/apt/archives/*.deb "$build"/var/lib/apt/lists/*
: >"$build/etc/machine-id"
ln -sf /dev/null "$build/etc/systemd/system/console-getty.service"
echo "$stamp" >"$build/.captured-live-stamp"
rm -rf "$dir"
mv "$build" "$dir"
trap - EXIT
echo "$dir"
