"""The systemd files under systemd/: systemd's own tools accept them, and they fit each other."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"


def captured_executable() -> str:
    found = shutil.which("captured") or str(Path(sys.executable).parent / "captured")
    assert Path(found).exists(), "the captured console script is not installed"
    return found


def unit_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this environment's `captured` (verify checks it)."""
    out = []
    for name in ("captured.service", "captured.socket"):
        text = (SYSTEMD / name).read_text().replace("/usr/local/bin/captured", captured_executable())
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian: systemd)")
def test_systemd_analyze_verify_accepts_the_units_without_a_warning(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", *map(str, unit_copies(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "captured." in line]
    assert ours == []  # verify only warns about unknown keys; none may concern our files


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian: systemd)")
def test_the_service_is_hardened(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the unit's exposure from 0 (locked down) to 10."""
    service = unit_copies(tmp_path)[0]
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for captured\.service: (\d+\.\d+)", proc.stdout)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit offline: {proc.stderr.strip()[:200]}")
    assert float(m.group(1)) <= 2.5, proc.stdout


def test_the_socket_the_sample_config_and_the_service_agree() -> None:
    socket_unit = (SYSTEMD / "captured.socket").read_text()
    service = (SYSTEMD / "captured.service").read_text()
    config = tomllib.loads((SYSTEMD / "captured.toml").read_text())
    (listen,) = re.findall(r"^ListenStream=(.+)$", socket_unit, re.M)
    assert config["socket_path"] == listen
    assert "--config /etc/captured/captured.toml" in service
    assert config["spool_dir"].startswith("/var/lib/captured/")  # StateDirectory=captured: writable
    assert re.search(r"^StateDirectory=captured$", service, re.M)
    assert re.search(r"^Type=notify$", service, re.M) and re.search(r"^WatchdogSec=\d+", service, re.M)
    stop = int(re.findall(r"^TimeoutStopSec=(\d+)$", service, re.M)[0])
    assert stop > 2 + 30 + 10 + 20  # drain + s3.shutdown_timeout_s + aborts + closing the uploader
    assert "SocketMode=0660" in socket_unit and "SocketGroup=captured" in socket_unit


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="needs systemd-sysusers")
def test_sysusers_and_tmpfiles_snippets_apply_to_an_empty_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (tmp_path / "etc" / name).write_text("")
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD / "captured.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert re.search(r"^captured:x:\d+:\d+:", (tmp_path / "etc" / "passwd").read_text(), re.M)
    assert re.search(r"^captured:x:\d+:", (tmp_path / "etc" / "group").read_text(), re.M)
    if shutil.which("systemd-tmpfiles") is None:
        return
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(SYSTEMD / "captured.tmpfiles")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for d in ("var/lib/captured", "var/lib/captured/spool", "var/lib/captured/out"):
        assert (tmp_path / d).is_dir()
