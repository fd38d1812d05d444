"""The units of systemd/ under a live systemd: systemd booted as PID 1 of a throw-away container.

Marked `systemd_live` and left out of the default run: `python -m pytest -m systemd_live`
(.ci/run does). Needs root, `systemd-nspawn` (Debian: systemd-container) and `debootstrap`;
skipped, saying why, where one is missing or the rootfs cannot be built (no Debian mirror).

How (the helpers are in tests/live/):
- `build-rootfs.sh`: a minimal Debian bookworm rootfs with systemd and python3 (debootstrap
  minbase, about 100 s; no procps, so no /bin/kill: the units must not need it), cached at
  $CAPTURED_LIVE_ROOTFS (default /var/lib/machines/captured-live-bookworm) and never written
  afterwards; the wheels of the project's dependencies and build requirements
  are downloaded on the host (`pip download`, for the container's CPython 3.11) and cached under
  $CAPTURED_LIVE_CACHE (default /var/cache/captured-live): the container has no network.
- `boot.sh`: `systemd-nspawn -b --register=no --keep-unit --private-network` on an overlay of
  that rootfs (upper layer on a tmpfs) in a private mount namespace and its own cgroup subtree,
  so every run starts clean and leaves nothing behind (the module fixture powers the container
  off, kills what is left in its cgroups, removes them and its temporary directory).
- Commands run inside with `nsenter` into the container's namespaces; files are read from the
  host through /proc/<container's PID 1>/root.
- The README's "Install as a service" block runs as written, from a copy of this checkout,
  adapted only where a test must: `pip install` from the wheelhouse (`--no-index
  --find-links`), and the model server's user is the test user `modelserver`.

The checks, in order, share the one container (module-scoped fixture): each test builds on
the state the previous one left, so run them together (`-x` stops at the first failure).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytestmark = [pytest.mark.systemd_live, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
LIVE = Path(__file__).resolve().parent / "live"
ROOTFS = Path(os.environ.get("CAPTURED_LIVE_ROOTFS", "/var/lib/machines/captured-live-bookworm"))
CACHE = Path(os.environ.get("CAPTURED_LIVE_CACHE", "/var/cache/captured-live"))
MIRROR = os.environ.get("CAPTURED_LIVE_MIRROR", "http://deb.debian.org/debian")

CONFIG = "/etc/captured/captured.toml"
SOCKET = "/run/captured/capture.sock"
SPOOL = "/var/lib/captured/spool"
OUT = "/var/lib/captured/out"
ENDPOINT = "churn-endpoint"  # systemd/captured.toml's
MODEL_USER = "modelserver"  # the model server's user: added to group captured by the README block
OUTSIDER = "outsider"  # a user outside the group
#: The drop-in that keeps the watchdog check quick (the unit's own WatchdogSec is 30 s).
WATCHDOG_S = 4
#: `systemd-analyze security` of the loaded unit: README says 1.7; this is that rounded up.
SECURITY_BOUND = 2.0
#: LimitNOFILE= of systemd/captured.service.
LIMIT_NOFILE = 65536

CONTAINER_ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "HOME=/root",
    "SYSTEMD_COLORS=0",
    "SYSTEMD_PAGER=",
]
CGROUP_BASES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/systemd"))

#: What the checks learn and report (printed by the last one).
FACTS: dict[str, Any] = {}

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
    """`probe()` until it returns something true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {value!r})")
        time.sleep(every)


def satisfied(value: T, condition: Callable[[T], bool]) -> T | None:
    """`value` if it meets `condition`, else None (for `wait_until`)."""
    return value if condition(value) else None


class Machine:
    """The booted container, seen from the host."""

    def __init__(self, name: str, work: Path, nspawn: subprocess.Popen[bytes], pid1: int) -> None:
        self.name, self.work, self.nspawn, self.pid1 = name, work, nspawn, pid1
        self.share = work / "share"  # /live inside

    def path(self, inside: str) -> Path:
        """A path of the container, from the host."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def argv(self, cmd: str | list[str], user: str | None = None) -> list[str]:
        argv = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "--"]
        argv += ["env", "-i", *CONTAINER_ENV]
        if user is not None:
            argv += ["runuser", "-u", user, "--"]
        return argv + (["/bin/sh", "-c", cmd] if isinstance(cmd, str) else cmd)

    def run(
        self, cmd: str | list[str], *, user: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(cmd, user), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the container: {cmd!r} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("captured.service", "MainPID")["MainPID"])

    def active(self, unit: str = "captured.service") -> bool:
        return self.show(unit, "ActiveState")["ActiveState"] == "active"

    def restarted(self, old_pid: int) -> int:
        """The service's new main PID once it is active again under one other than `old_pid`."""
        p = self.show("captured.service", "ActiveState", "SubState", "MainPID")
        pid = int(p["MainPID"])
        return (
            pid
            if p["ActiveState"] == "active" and p["SubState"] == "running" and pid not in (0, old_pid)
            else 0
        )

    def status(self) -> dict[str, Any]:
        out = self.run(["captured", "status", "--config", CONFIG, "--json"], timeout=30).stdout
        return dict(json.loads(out))

    def journal(self, *units: str) -> str:
        args = [a for u in units for a in ("-u", u)]
        return self.run(["journalctl", "--no-pager", "-o", "short-monotonic", *args], check=False).stdout

    def client(self, *args: str, timeout: float = 90) -> dict[str, Any]:
        """tests/live/client.py as the model server's user (a member of group captured)."""
        out = self.run(
            ["/opt/captured/bin/python", "/live/client.py", *args], user=MODEL_USER, timeout=timeout
        )
        return dict(json.loads(out.stdout))

    def delivered(self, endpoint: str, dest: str = OUT) -> Counter[str]:
        """How often each inferenceId is in the files delivered under `dest`/`endpoint`."""
        ids: Counter[str] = Counter()
        base = self.path(dest) / endpoint
        if base.is_dir():
            for p in base.rglob("*.jsonl"):
                if not p.name.startswith("."):
                    for line in p.read_text().splitlines():
                        ids[json.loads(line)["eventMetadata"]["inferenceId"]] += 1
        return ids

    def spool_files(self) -> list[Path]:
        """The spool's data files (not its hidden `.lock` and `.journal`)."""
        return sorted(p for p in self.path(SPOOL).rglob("*") if p.is_file() and not p.name.startswith("."))

    def edit_config(self, *changes: tuple[str, str]) -> None:
        path = self.path(CONFIG)
        text = path.read_text()
        for old, new in changes:
            assert re.search(old, text, re.M), f"{old!r} is not in {CONFIG}:\n{text}"
            text = re.sub(old, new, text, flags=re.M)
        path.write_text(text)  # the same file: its mode 0640 and group captured stay


# --- building, booting, cleaning up -----------------------------------------------------------


def build_rootfs() -> Path:
    """The cached rootfs (built on first use); skip when it cannot be built here."""
    proc = subprocess.run(
        [str(LIVE / "build-rootfs.sh"), str(ROOTFS), MIRROR],
        capture_output=True,
        text=True,
        timeout=1500,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode == 3:
        pytest.skip(f"cannot build the container's rootfs here: {proc.stderr.strip()[-600:]}")
    assert proc.returncode == 0, proc.stderr
    return ROOTFS


def requirements() -> list[str]:
    """The project's runtime dependencies and its build requirements (pyproject.toml)."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(doc["build-system"]["requires"] + doc["project"]["dependencies"])


def wheelhouse() -> Path:
    """Wheels of `requirements()` for the container's CPython 3.11 on x86-64 glibc, downloaded on
    the host and cached per requirement list for a week; skip when no index is reachable."""
    reqs = requirements()
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:16]
    dest = CACHE / f"wheels-{key}"
    if (dest / ".complete").exists() and time.time() - (dest / ".complete").stat().st_mtime < 7 * 86400:
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
    try:
        # The container's glibc is 2.36: any manylinux tag up to it (pip adds abi3, none and any).
        platforms = ["manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64"]
        platforms += ["manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64"]
        platforms += ["manylinux_2_5_x86_64", "manylinux1_x86_64"]
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(tmp), "--only-binary=:all:"]
        cmd += ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
        cmd += [a for p in platforms for a in ("--platform", p)] + reqs
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            pytest.skip(
                f"cannot download the wheels the container installs from: {proc.stderr.strip()[-600:]}"
            )
        (tmp / ".complete").write_text("\n".join(reqs) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:  # another run put it there meanwhile
            assert (dest / ".complete").exists(), dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def container_pid1(name: str) -> int:
    """The host PID of the container's PID 1: the process of our cgroup that is 1 in its own
    PID namespace (0 while there is none)."""
    for top in cgroup_dirs(name):
        for procs in top.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                m = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if m and len(m.group(1).split()) == 2 and m.group(1).split()[-1] == "1":
                    return int(pid)
    return 0


def cgroup_dirs(name: str) -> list[Path]:
    return [base / name for base in CGROUP_BASES if (base / name / "cgroup.procs").exists()]


def remove_cgroups(name: str) -> None:
    """Kill whatever is still in the container's cgroups, then remove them, deepest first."""
    for top in cgroup_dirs(name):
        if (top / "cgroup.kill").exists():
            (top / "cgroup.kill").write_text("1")

        def pids(top: Path = top) -> list[int]:
            return [int(p) for f in top.rglob("cgroup.procs") for p in f.read_text().split()]

        deadline = time.monotonic() + 15
        while (left := pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            d.rmdir()
        top.rmdir()


def power_off(nspawn: subprocess.Popen[bytes]) -> None:
    """SIGTERM to systemd-nspawn asks the container's systemd to power off; SIGKILL if it has
    not within 30 s."""
    if nspawn.poll() is None:
        nspawn.terminate()
        try:
            nspawn.wait(30)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(10)


def copy_checkout(dest: Path) -> None:
    """The checkout the README block installs from: this one, without its environments and
    build litter."""
    shutil.copytree(
        ROOT,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv*",
            "__pycache__",
            "*.egg-info",
            "build",
            "dist",
            "captured-data",
            ".*_cache",
            ".hypothesis",
        ),
    )


def readme_install_block() -> str:
    """The fenced ```sh block under README.md's "Install as a service", as written."""
    text = (ROOT / "README.md").read_text()
    _, found, section = text.partition("\n## Install as a service\n")
    assert found, "README.md has no '## Install as a service' section"
    m = re.search(r"^```sh\n(.*?)^```$", section.split("\n## ", 1)[0], re.S | re.M)
    assert m, "no ```sh block under README.md's 'Install as a service'"
    return m.group(1)


def adapted_install_block() -> str:
    """The README block with what a test must change, and nothing else: pip installs from the
    wheelhouse (the container has no network), the model server's user is MODEL_USER."""
    block = readme_install_block()
    block, n = re.subn(
        r"(/opt/captured/bin/pip install) \.$",
        r"\1 --no-index --find-links /live/wheels .",
        block,
        flags=re.M,
    )
    assert n == 1, f"the README block no longer runs `/opt/captured/bin/pip install .`:\n{block}"
    assert "<the model server's user>" in block, block
    return block.replace("<the model server's user>", MODEL_USER)


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    """A booted container with the README's install block run in it (its outcome in
    FACTS["install"]); powered off and cleaned away at the end, also after a failure."""
    if os.geteuid() != 0:
        pytest.skip("boots a container with systemd-nspawn: needs root")
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap")):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (Debian: apt-get install {package})")
    for tool in ("unshare", "nsenter", "flock"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (Debian: util-linux)")
    started = time.monotonic()
    rootfs = build_rootfs()
    FACTS["rootfs_s"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    wheels = wheelhouse()
    FACTS["wheelhouse_s"] = round(time.monotonic() - started, 1)

    name = f"captured-live-{os.getpid()}-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="captured-live-", dir="/var/tmp"))
    nspawn: subprocess.Popen[bytes] | None = None
    machine: Machine | None = None
    try:
        share = work / "share"
        share.mkdir()
        (share / "wheels").mkdir()
        (share / "run").mkdir(mode=0o1777)
        (share / "run").chmod(0o1777)
        copy_checkout(share / "src")
        shutil.copy(LIVE / "client.py", share / "client.py")
        (share / "install.sh").write_text(adapted_install_block())
        binds = [f"--bind={share}:/live", f"--bind-ro={wheels}:/live/wheels"]
        started = time.monotonic()
        with open(work / "console.log", "wb") as console:
            nspawn = subprocess.Popen(
                [str(LIVE / "boot.sh"), str(rootfs), str(work), name, name, *binds],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )

        def pid1() -> int:
            assert nspawn is not None
            if nspawn.poll() is not None:
                raise AssertionError(
                    f"the container exited {nspawn.returncode}: {(work / 'console.log').read_text()}"
                )
            return container_pid1(name)

        machine = Machine(name, work, nspawn, wait_until(pid1, 30, "the container's PID 1"))
        wait_until(
            lambda: machine.path("/run/systemd/private").exists(), 30, "the container's systemd to listen"
        )
        running = machine.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=90)
        state = running.stdout.strip()
        failed = machine.run(["systemctl", "--failed", "--no-pager", "--plain"], check=False).stdout
        assert state in ("running", "degraded"), (
            f"the container's systemd is {state!r}: {running.stderr}\n{failed}"
        )
        FACTS["boot_s"] = round(time.monotonic() - started, 1)
        FACTS["boot_state"] = state if state == "running" else f"{state}: {failed}"

        started = time.monotonic()
        machine.run(f"useradd --no-create-home {MODEL_USER} && useradd --no-create-home {OUTSIDER}")
        FACTS["install"] = machine.run(
            "cd /live/src && /bin/sh -ex /live/install.sh", timeout=600, check=False
        )
        FACTS["install_s"] = round(time.monotonic() - started, 1)
        yield machine
    finally:
        if machine is not None and machine.nspawn.poll() is None:
            # Shown by pytest when a test failed.
            print(
                "--- journal of the units:\n", machine.journal("captured.service", "captured.socket")[-20000:]
            )
        if nspawn is not None:
            power_off(nspawn)
        remove_cgroups(name)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / name, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


# --- the checks, in order ---------------------------------------------------------------------


def test_0_the_readme_install_block_runs_as_written(machine: Machine) -> None:
    """The README's block (pip from the wheelhouse, the test user) exits 0 and leaves both units
    enabled and running (`enable --now`)."""
    done: subprocess.CompletedProcess[str] = FACTS["install"]
    block = (machine.share / "install.sh").read_text()
    print(f"--- the README block as run:\n{block}--- its output:\n{done.stdout}{done.stderr}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    for unit in ("captured.socket", "captured.service"):
        p = machine.show(unit, "ActiveState", "UnitFileState")
        assert p == {"ActiveState": "active", "UnitFileState": "enabled"}, (unit, p)
    assert re.search(r"^captured:x:\d+:.*\bmodelserver\b", machine.path("/etc/group").read_text(), re.M)


def test_1_the_socket_alone_has_the_documented_mode_and_group_and_keeps_others_out(machine: Machine) -> None:
    """captured.socket started alone: /run/captured/capture.sock exists, a socket, mode 0660,
    owner and group captured; the service does not run; a user outside the group gets EACCES
    (and starts nothing)."""
    # From the state the README leaves: both stopped; the watchdog drop-in; the sample config
    # edited ("then edit it"): every record kept, files sealed every 2 s so deliveries show fast.
    machine.run(["systemctl", "stop", "captured.service", "captured.socket"])
    dropin = machine.path("/etc/systemd/system/captured.service.d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "live-test.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}\n")
    machine.edit_config((r"^InitialSamplingPercentage = 20$", "InitialSamplingPercentage = 100"))
    machine.edit_config((r"^max_file_age_s = 60$", "max_file_age_s = 2"))
    machine.run(["captured", "check", "--config", CONFIG])
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "start", "captured.socket"])

    assert machine.show("captured.socket", "ActiveState", "SubState") == {
        "ActiveState": "active",
        "SubState": "listening",
    }
    assert machine.show("captured.service", "ActiveState")["ActiveState"] == "inactive"
    st = machine.path(SOCKET).lstat()
    groups = {
        int(f[2]): f[0]
        for f in (line.split(":") for line in machine.path("/etc/group").read_text().splitlines())
    }
    users = {
        int(f[2]): f[0]
        for f in (line.split(":") for line in machine.path("/etc/passwd").read_text().splitlines())
    }
    assert stat.S_ISSOCK(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), users[st.st_uid], groups[st.st_gid]) == (0o660, "captured", "captured")
    assert stat.S_IMODE(machine.path("/run/captured").stat().st_mode) == 0o755  # DirectoryMode=

    refused = machine.run(["python3", "/live/client.py", "connect"], user=OUTSIDER)
    assert json.loads(refused.stdout)["errno"] == errno.EACCES, refused.stdout
    assert machine.show("captured.service", "ActiveState")["ActiveState"] == "inactive"


def test_2_a_group_member_starts_the_service_by_socket_activation(machine: Machine) -> None:
    """A CaptureClient run as the model server's user (group captured, added by the README's
    `usermod`) finds the socket by itself; its first connection starts the service, which adopts
    systemd's socket; every record arrives in the destination, once."""
    doc = machine.client("send", "a", "200")
    assert doc["flushed"] and doc["stats"]["dropped"] == {} and len(doc["ids"]) == 200, doc
    assert machine.active()
    assert "listening on the socket systemd passed: /run/captured/capture.sock" in machine.journal(
        "captured.service"
    )
    want = Counter(doc["ids"])
    wait_until(lambda: want <= machine.delivered(ENDPOINT), 30, "the records in the destination")
    got = machine.delivered(ENDPOINT)
    assert {k: v for k, v in got.items() if k.startswith("a-")} == want  # each once
    FACTS["sent_a"] = doc["ids"]


def test_3_systemctl_status_shows_active_with_the_status_text(machine: Machine) -> None:
    """`systemctl status captured`: active (running), its STATUS= line; the main process runs
    as captured with LimitNOFILE= as systemd could grant it (clamped to PID 1's hard limit
    where nothing holds CAP_SYS_RESOURCE)."""
    out = machine.run(["systemctl", "status", "captured", "--no-pager", "--lines=0"]).stdout
    assert re.search(r"^\s*Active: active \(running\)", out, re.M), out
    m = re.search(
        r'^\s*Status: "(capture Started, sampling 100%, \d+ records/s, \d+ files waiting)"', out, re.M
    )
    assert m, out
    FACTS["status_line"] = m.group(1)

    pid = machine.main_pid()
    proc_status = machine.run(["cat", f"/proc/{pid}/status"]).stdout
    uid = int(re.findall(r"^Uid:\s+(\d+)", proc_status, re.M)[0])
    assert machine.run(["id", "-un", str(uid)]).stdout.strip() == "captured"

    def nofile(pid: int) -> tuple[int, int]:
        limits = machine.run(["cat", f"/proc/{pid}/limits"]).stdout
        soft, hard = re.findall(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)[0]
        return int(soft), int(hard)

    pid1_hard = nofile(1)[1]
    soft, hard = nofile(pid)
    assert hard == min(LIMIT_NOFILE, pid1_hard), (soft, hard, pid1_hard)
    assert soft == hard  # LimitNOFILE= sets both; the daemon raises its soft limit to the hard one anyway
    FACTS["nofile"] = f"{soft}:{hard} (unit {LIMIT_NOFILE}, container PID 1's hard limit {pid1_hard})"


def test_4_reload_changes_the_sampling_percentage_under_the_same_pid(machine: Machine) -> None:
    """`systemctl reload captured` after editing the percentage: `captured status --json`
    shows the new one, served by the same process; then back to 100 %."""
    pid = machine.main_pid()
    assert machine.status()["CurrentSamplingPercentage"] == 100
    for pct in (25, 100):
        machine.edit_config((r"^InitialSamplingPercentage = \d+$", f"InitialSamplingPercentage = {pct}"))
        machine.run(["systemctl", "reload", "captured"])
        st = wait_until(
            lambda pct=pct: satisfied(machine.status(), lambda s: s["CurrentSamplingPercentage"] == pct),
            15,
            f"sampling {pct}% in captured status",
        )
        assert st["pid"] == pid and machine.main_pid() == pid and machine.active()
    assert machine.journal("captured.service").count("reload: applied") >= 2


def test_5_the_watchdog_restarts_a_stopped_main_process(machine: Machine) -> None:
    """SIGSTOP to the main process: no WATCHDOG=1 for WatchdogSec (the drop-in's 4 s), so
    systemd aborts it and Restart= starts a new one."""
    assert machine.show("captured.service", "WatchdogUSec")["WatchdogUSec"] == f"{WATCHDOG_S}s"
    restarts = int(machine.show("captured.service", "NRestarts")["NRestarts"])
    pid = machine.main_pid()
    machine.run(["sh", "-c", f"kill -STOP {pid}"])  # the shell's kill: no procps in the container
    started = time.monotonic()
    new = wait_until(lambda: machine.restarted(pid), 40, "a new main process after the watchdog")
    FACTS["watchdog_restart_s"] = round(time.monotonic() - started, 1)
    assert int(machine.show("captured.service", "NRestarts")["NRestarts"]) == restarts + 1
    log = machine.journal("captured.service")
    assert f"captured.service: Watchdog timeout (limit {WATCHDOG_S}s)!" in log, log[-3000:]
    assert machine.run(["sh", "-c", f"kill -0 {pid}"], check=False).returncode != 0  # the old one is gone
    assert machine.status()["pid"] == new


def test_6_kill_9_restarts_the_service_and_recovers_the_spool(machine: Machine) -> None:
    """`kill -9` of the main process while a client streams: Restart=on-failure brings it back,
    the spool files the dead process left are recovered and delivered (every record it had
    acknowledged), and the client's other records follow."""
    # Files sealed only at stop from now on, so what the killed process acknowledged is
    # certainly still in the spool when it dies.
    machine.edit_config((r"^max_file_age_s = \d+$", "max_file_age_s = 3600"))
    machine.run(["systemctl", "restart", "captured"])
    rundir = machine.share / "run" / "stream"
    rundir.mkdir(mode=0o777)
    rundir.chmod(0o777)
    stream = subprocess.Popen(
        machine.argv(
            ["/opt/captured/bin/python", "/live/client.py", "stream", "s", "300", "/live/run/stream"],
            MODEL_USER,
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: nsenter, runuser and the client
    )
    try:
        wait_until(
            lambda: (rundir / "acked").exists() or stream.poll() is not None, 60, "the client's first flush"
        )
        acked = json.loads((rundir / "acked").read_text())
        assert acked["flushed"] and len(acked["ids"]) == 300, acked
        in_spool = Counter(
            json.loads(line)["eventMetadata"]["inferenceId"]
            for p in machine.spool_files()
            if p.name.endswith(".part")
            for line in p.read_text().splitlines()
        )
        assert set(acked["ids"]) <= set(in_spool)  # acknowledged, in an open spool file
        assert not set(acked["ids"]) & set(machine.delivered(ENDPOINT))  # and not delivered

        restarts = int(machine.show("captured.service", "NRestarts")["NRestarts"])
        pid = machine.main_pid()
        time.sleep(0.5)  # the client streams on
        machine.run(["sh", "-c", f"kill -9 {pid}"])
        started = time.monotonic()
        new = wait_until(lambda: machine.restarted(pid), 30, "a new main process after kill -9")
        FACTS["kill9_restart_s"] = round(time.monotonic() - started, 1)
        assert int(machine.show("captured.service", "NRestarts")["NRestarts"]) == restarts + 1
        want = set(acked["ids"])
        wait_until(
            lambda: want <= set(machine.delivered(ENDPOINT)), 30, "the recovered records in the destination"
        )
        log = machine.journal("captured.service")
        assert "captured.service: Main process exited, code=killed, status=9/KILL" in log, log[-3000:]
        own = machine.run(["journalctl", "--no-pager", "-o", "cat", f"_PID={new}"]).stdout
        assert re.search(r" recovered /var/lib/captured/spool/\S+ \(\d+ bytes of whole lines\)", own, re.M), (
            own
        )

        time.sleep(0.5)  # records to the new process too
        (rundir / "stop").touch()
        out, err = stream.communicate(timeout=90)
    finally:
        if stream.poll() is None:  # a check failed: end the client, and what nsenter started
            (rundir / "stop").touch()
            try:
                stream.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(stream.pid, signal.SIGKILL)
                stream.communicate(timeout=10)
    assert stream.returncode == 0, err
    doc = json.loads(out)
    assert doc["flushed"] and doc["stats"]["dropped"] == {}, doc
    assert len(doc["ids"]) > len(acked["ids"])
    FACTS["sent_s"] = doc["ids"]
    FACTS["resent_s"] = doc["stats"]["resent"]


def test_7_stop_exits_0_empties_the_spool_and_the_socket_stays(machine: Machine) -> None:
    """`systemctl stop captured`: the daemon exits 0 after sealing and delivering everything
    (the spool holds no data file), captured.socket still listens; every record of the checks
    so far is in the destination exactly once."""
    machine.run(["systemctl", "stop", "captured"], timeout=120)
    p = machine.show("captured.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert p == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",
        "ExecMainStatus": "0",
    }, p
    assert machine.spool_files() == []
    assert machine.show("captured.socket", "ActiveState", "SubState") == {
        "ActiveState": "active",
        "SubState": "listening",
    }
    assert stat.S_ISSOCK(machine.path(SOCKET).lstat().st_mode)
    unix = machine.run(["cat", "/proc/net/unix"]).stdout.splitlines()
    # Flags 00010000 (__SO_ACCEPTCON), state 01 (unconnected): a listening socket at the path.
    assert any(
        line.split()[3:6] == ["00010000", "0001", "01"] and line.endswith(f" {SOCKET}") for line in unix
    )

    got = machine.delivered(ENDPOINT)
    for key in ("sent_a", "sent_s"):
        want = Counter(FACTS[key])
        assert {k: got[k] for k in want} == dict(want), key  # each delivered, and only once
    assert sum(got.values()) == len(FACTS["sent_a"]) + len(FACTS["sent_s"])


MULTI = """socket_path = "/run/captured/capture.sock"
spool_dir = "/var/lib/captured/spool"
default_endpoint = "churn-endpoint"
{endpoints}
[spool]
max_file_age_s = 2
"""

ENDPOINT_TABLE = """[[endpoints]]
endpoint_name = "{name}"
[endpoints.DataCaptureConfig]
InitialSamplingPercentage = 100
DestinationS3Uri = "file://{dest}"
CaptureOptions = [{{ CaptureMode = "Input" }}, {{ CaptureMode = "Output" }}]
"""


def multi_config(*endpoints: tuple[str, str]) -> str:
    return MULTI.format(endpoints="".join(ENDPOINT_TABLE.format(name=n, dest=d) for n, d in endpoints))


def test_8_a_reload_adds_an_endpoint_and_the_security_score(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    """With two endpoints configured (`[[endpoints]]`), the socket starts the service again
    after the stop; a reload adds a third under the same PID, and its records arrive in its own
    destination. `systemd-analyze security` of the loaded unit is at most SECURITY_BOUND."""
    endpoints = [(ENDPOINT, OUT), ("fraud", "/var/lib/captured/fraud")]
    machine.path(CONFIG).write_text(multi_config(*endpoints))
    machine.run(["captured", "check", "--config", CONFIG])
    doc = machine.client("send", "f", "50", "fraud")  # the socket still listens: this starts it
    assert doc["flushed"] and doc["stats"]["dropped"] == {}, doc
    pid = machine.main_pid()
    assert [e["EndpointName"] for e in machine.status()["endpoints"]] == [ENDPOINT, "fraud"]

    endpoints.append(("triage", "/var/lib/captured/triage"))
    machine.path(CONFIG).write_text(multi_config(*endpoints))
    machine.run(["systemctl", "reload", "captured"])
    st = wait_until(
        lambda: satisfied(machine.status(), lambda s: len(s["endpoints"]) == 3),
        15,
        "three endpoints in status",
    )
    assert [e["EndpointName"] for e in st["endpoints"]] == [ENDPOINT, "fraud", "triage"]
    assert st["pid"] == pid and machine.main_pid() == pid
    doc_t = machine.client("send", "t", "50", "triage")
    assert doc_t["flushed"] and doc_t["stats"]["dropped"] == {}, doc_t
    for ids, (name, dest) in ((doc["ids"], endpoints[1]), (doc_t["ids"], endpoints[2])):
        want = Counter(ids)
        wait_until(
            lambda want=want, name=name, dest=dest: machine.delivered(name, dest) == want,
            30,
            f"{name}'s records",
        )
    assert machine.main_pid() == pid

    out = machine.run(["systemd-analyze", "security", "captured.service", "--no-pager"], check=False).stdout
    m = re.search(r"Overall exposure level for captured\.service: (\d+\.\d+)", out)
    assert m, out
    score = float(m.group(1))
    print(out)  # the whole table: shown with -rP, or when the bound is exceeded
    FACTS["security"] = score
    with capsys.disabled():
        report = {k: v for k, v in FACTS.items() if k not in ("install", "sent_a", "sent_s")}
        print(f"\nsystemd live facts: {json.dumps(report)}")
        print(f"systemd-analyze security captured.service (loaded, live): {score} (bound {SECURITY_BOUND})")
    assert score <= SECURITY_BOUND, out
