"""The error family: one root, keyword-only fields, nothing lost when an error is copied, no import circle."""

from __future__ import annotations

import ast
import copy
import errno
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from captured import errors
from captured.errors import (
    CapturedError,
    ConfigError,
    DeliveryError,
    LocalDeliveryError,
    ProtocolError,
    SpoolWriteError,
    UploadError,
)
from captured.wire import frames


def test_every_error_derives_from_the_root() -> None:
    for cls in (ConfigError, ProtocolError, DeliveryError, UploadError, LocalDeliveryError, SpoolWriteError):
        assert issubclass(cls, CapturedError)
    assert issubclass(UploadError, DeliveryError) and issubclass(LocalDeliveryError, DeliveryError)
    assert not issubclass(UploadError, LocalDeliveryError) and not issubclass(LocalDeliveryError, UploadError)
    assert issubclass(SpoolWriteError, OSError)  # an `except OSError` around a spool write still holds
    assert not issubclass(DeliveryError, OSError)
    assert frames.ProtocolError is ProtocolError  # the wire contract's name for the same class


def test_the_module_imports_only_the_standard_library() -> None:
    """errors.py sits below every other module: importing it never closes an import circle."""
    assert errors.__file__ is not None
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and all(
        name.split(".")[0] in sys.stdlib_module_names for name in imported - {"__future__"}
    )


def _imports(path: Path) -> set[str]:
    """The `captured` modules a file imports, anywhere in it (lazy imports in functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captured"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("captured")}
    return found


def test_no_import_circles() -> None:
    """No module of the package imports, directly or through others, one that imports it back
    (the errors live in errors.py so that, e.g., s3body need not import s3)."""
    package = Path(errors.__file__).parent
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {name: (_imports(path) & modules.keys()) - {name} for name, path in modules.items()}

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            if (mod := todo.pop()) not in seen:
                seen.add(mod)
                todo.extend(graph[mod])
        return seen

    circles = sorted(name for name in graph if name in reaches(name))
    assert not circles, f"modules in an import circle: {circles}"


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (DeliveryError, ("timeout", True, "read timed out")),
        (UploadError, ("timeout", True, "read timed out")),
        (LocalDeliveryError, ("disk_full", True, "No space left on device")),
        (ProtocolError, ("bad_header", "bad magic")),
        (SpoolWriteError, (OSError(errno.ENOSPC, "No space left on device"), 10)),
        (SpoolWriteError, (errno.ENOSPC, "No space left on device")),
    ],
)
def test_fields_are_keyword_only(cls: type[Exception], args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError):
        cls(*args)


def test_a_delivery_error_carries_cause_retryable_and_message() -> None:
    err = UploadError(cause="access_denied", retryable=False, message="AccessDenied: no")
    assert (err.cause, err.retryable, str(err)) == ("access_denied", False, "AccessDenied: no")
    with pytest.raises(TypeError):
        UploadError(cause="access_denied", message="AccessDenied: no")  # type: ignore[call-arg]


def test_a_spool_write_error_is_the_os_error_plus_what_was_written() -> None:
    cause = OSError(errno.ENOSPC, "No space left on device", "ep.AllTraffic.part")
    err = SpoolWriteError(error=cause, written=1020)
    assert (err.errno, err.strerror, err.filename) == (errno.ENOSPC, cause.strerror, cause.filename)
    assert err.written == 1020 and err.error is cause and str(err) == str(cause)
    bare = SpoolWriteError(error=OSError("EIO"), written=0)
    assert bare.errno is None and str(bare) == "EIO"


@pytest.mark.parametrize(
    "err",
    [
        UploadError(cause="timeout", retryable=True, message="read timed out"),
        LocalDeliveryError(cause="disk_full", retryable=True, message="No space left on device"),
        ProtocolError(reason="bad_header", message="bad magic"),
        SpoolWriteError(error=OSError(errno.ENOSPC, "No space left on device"), written=7),
        ConfigError(["a.toml: spool.max_file_bytes = 1: must be from 1024", "b.json: bad JSON"]),
    ],
)
def test_errors_survive_pickle_and_copy(err: CapturedError) -> None:
    for again in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert type(again) is type(err) and str(again) == str(err)
        for name in ("cause", "retryable", "reason", "written", "errno"):
            assert getattr(again, name, None) == getattr(err, name, None)
