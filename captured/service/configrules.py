"""The configuration rules `msgspec.Meta` cannot say, each hooked to its field's `Meta.extra`.

A `parse` hook takes the raw value and returns it normalised (a path made absolute, an SDK
spelling mapped to the API's), or records a problem; a `check` hook looks at a value that
passed its type check together with the other fields of its table. See `configcheck`.

With `Checker.host` (`captured check`) the hooks also look at this host for what `serve` would
fail on at start: a socket group that does not exist, a spool directory that is no directory or
not writable, a directory that cannot be created. Nothing is created or changed.
"""

from __future__ import annotations

import grp
import os
import re
import stat
from collections.abc import Mapping

from captured.service.configcheck import Checker
from captured.wire.rules import MAX_SOCKET_PATH

#: SageMaker's limit on `DestinationS3Uri`.
MAX_DESTINATION_CHARS = 512
#: API spellings plus the SageMaker Python SDK's, normalised to the API's.
CAPTURE_MODES = {
    "Input": "Input",
    "Output": "Output",
    "InputAndOutput": "InputAndOutput",
    "REQUEST": "Input",
    "RESPONSE": "Output",
}
_BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_PATTERN = re.compile(r"\d+\.\d+\.\d+\.\d+")
_SCHEME_PATTERN = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")
_GROUP_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")


def path(ck: Checker, key: str, value: object, rule: str) -> str:
    """An absolute, normalised path; relative ones resolve against their source's directory."""
    if not isinstance(value, str) or not value or "\0" in value:
        ck.bad(key, value, rule)
        return ""
    return os.path.normpath(os.path.join(ck.base_dir(key), value))


def socket_path(ck: Checker, key: str, value: object, rule: str) -> str:
    full = path(ck, key, value, rule)
    size = len(os.fsencode(full))
    if size > MAX_SOCKET_PATH:
        why = (
            f"is {size} bytes long, must be at most {MAX_SOCKET_PATH} bytes in UTF-8 once made absolute"
            " (the AF_UNIX sun_path limit): choose a shorter directory"
        )
        ck.bad(key, full, why)
    elif full and ck.host:
        # Whether the directory is writable is not asked: with the socket systemd passes, the
        # daemon binds nothing there.
        directory = os.path.dirname(full)
        if problem := directory_problem(directory, writable=False):
            ck.bad(key, full, f"its directory {directory} {problem}")
        elif _is_not_socket(full):
            ck.bad(key, full, "exists and is not a socket: the daemon refuses to replace it")
    return full


def spool_dir(ck: Checker, key: str, value: object, rule: str) -> str:
    full = path(ck, key, value, rule)
    if full and ck.host and (problem := directory_problem(full, writable=True)):
        ck.bad(key, full, problem)
    return full


def destination(ck: Checker, key: str, value: object, rule: str) -> str:
    """`s3://bucket[/prefix]` as given; a local directory, plain or `file:///`, as `file://` and an
    absolute, normalised path."""
    if not isinstance(value, str) or not value:
        ck.bad(key, value, rule)
        return ""
    stored, problem = _stored_destination(value, ck.base_dir(key))
    if problem is None and len(stored) > MAX_DESTINATION_CHARS:
        problem = f"must be at most {MAX_DESTINATION_CHARS} characters"
    local = stored[len("file://") :] if stored.startswith("file://") else ""
    if problem is None and ck.host and local and (why := directory_problem(local, writable=False)):
        problem = f"the directory {why}"
    if problem is not None:
        ck.bad(key, value, problem)
    return stored


def _stored_destination(text: str, base_dir: str) -> tuple[str, str | None]:
    """The destination as stored, and what is wrong with it (None: nothing)."""
    match = _SCHEME_PATTERN.match(text)
    scheme = match.group() if match else ""
    if scheme == "s3:":
        return text, _s3_problem(text)
    if scheme == "https:":  # SageMaker admits it, but an S3 client needs the bucket and the prefix
        return text, "https:// destinations are not supported: use the s3://bucket/prefix form"
    if scheme == "file:" and not text.startswith("file:///"):
        return text, "a file:// destination must be file:///absolute/path"
    if scheme not in ("", "file:"):
        return text, "unsupported scheme: use s3://bucket[/prefix], file:///absolute/path or a directory"
    local = text[len("file://") :] if scheme else os.path.join(base_dir, text)
    if "\0" in local:
        return text, "must not contain a NUL character"
    return "file://" + os.path.normpath(local), None


def _s3_problem(uri: str) -> str | None:
    if not uri.startswith("s3://"):
        return "must be s3://bucket[/prefix]"
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_PATTERN.fullmatch(bucket) or ".." in bucket or _IPV4_PATTERN.fullmatch(bucket):
        return (
            "the bucket name must be 3 to 63 lowercase letters, digits, dots or hyphens, start and end"
            " with a letter or digit, have no '..' and not be an IP address"
        )
    # An empty segment would put "//" into every object key (a SageMaker pitfall that breaks Model
    # Monitor); one trailing "/" is fine, it is dropped when keys are built.
    if "//" in "/" + prefix:
        return "the key prefix must not contain '//' (one trailing '/' is fine)"
    return None


def capture_mode(ck: Checker, key: str, value: object, rule: str) -> str:
    if isinstance(value, str) and value in CAPTURE_MODES:
        return CAPTURE_MODES[value]
    ck.bad(key, value, rule)
    return ""


def socket_mode(ck: Checker, key: str, value: object, rule: str) -> int:
    # TOML has octal integers (0o660); a string of octal digits ("0660") is taken too.
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    ck.bad(key, value, rule)
    return 0


def socket_group(ck: Checker, key: str, value: object, rule: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return str(value)
    if not isinstance(value, str) or not _GROUP_PATTERN.fullmatch(value):
        ck.bad(key, value, rule)
        return ""
    if ck.host and not value.isdigit():
        try:
            grp.getgrnam(value)
        except KeyError:
            ck.bad(key, value, "no such group on this host")
    return value


def metrics_address(ck: Checker, key: str, value: object, rule: str) -> str:
    if isinstance(value, str) and value.startswith("/"):
        ok = len(os.fsencode(value)) <= MAX_SOCKET_PATH
    elif isinstance(value, str):
        host, sep, port = value.rpartition(":")
        ok = bool(sep and host and port.isdigit() and int(port) <= 65535)
    else:
        ok = False
    if not ok:
        ck.bad(key, value, rule)
    return value if isinstance(value, str) else ""


def below_high_percent(ck: Checker, key: str, value: object, table: Mapping[str, object]) -> None:
    """`watermark.low_percent` must be below `high_percent` (absent when refused: that was said)."""
    high = table.get("high_percent")
    if isinstance(high, int | float) and isinstance(value, int | float) and not value < high:
        ck.bad(key, value, f"must be a percentage from 0 to below high_percent ({high:g})")


# --- this host -------------------------------------------------------------------------------------------


def directory_problem(directory: str, *, writable: bool) -> str | None:
    """What keeps `serve` from using (`writable`: and writing in) `directory`, creating it if
    missing as `os.makedirs` does; None: nothing."""
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            return "exists and is not a directory"
        if writable and not os.access(directory, os.W_OK | os.X_OK):
            return f"is not writable by this user (uid {os.geteuid()})"
        return None
    if os.path.lexists(directory):
        return "is a dangling symbolic link"
    parent = os.path.dirname(directory)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable by this user (uid {os.geteuid()})"
    return None


def _is_not_socket(full: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.lstat(full).st_mode)
    except OSError:
        return False
