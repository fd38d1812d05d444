"""Configuration sources in and out: defaults, files and overrides gathered into a raw `Draft`, and TOML.

`captured.service.config` validates the draft into the frozen `Config` tree; this module knows
nothing of the rules, only where each raw value came from, so that a problem can name its file and a
relative path can resolve against the directory of whoever wrote it:

- embedded defaults and `Overrides`: the working directory;
- the TOML file and the JSON file holding SageMaker's `DataCaptureConfig`: the file's directory.

Nothing here imports `captured.service.config`, which imports this module.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

import msgspec

#: SageMaker Python SDK defaults (`sagemaker.model_monitor.DataCaptureConfig`).
SDK_CSV_CONTENT_TYPES = ("text/csv",)
SDK_JSON_CONTENT_TYPES = ("application/json",)

_BARE_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
#: The last component of a key: `.name`, `[index]`, or the whole key when it is one name.
_PARENT_PATTERN = re.compile(r"(?:\.[^.\[]*|\[\d+\]|^[^.\[]*)$")


class Overrides(msgspec.Struct, frozen=True):
    """Values from the command line; they win over every file. Relative paths resolve against cwd.

    Each replaces the top-level key of its name, or the `DataCaptureConfig` key `INNER` names.
    """

    socket_path: str | None = None
    spool_dir: str | None = None
    destination: str | None = None
    endpoint_name: str | None = None
    variant_name: str | None = None
    sampling_percentage: int | None = None


#: The `Overrides` that replace a key of `DataCaptureConfig`, and which.
INNER = {"destination": "DestinationS3Uri", "sampling_percentage": "InitialSamplingPercentage"}


class Source(NamedTuple):
    label: str  # prefixed to problems: the file name, or "" for defaults and overrides
    base_dir: str  # relative paths given by this source resolve against it


class Draft:
    """Raw values merged from every source, before validation, and where each one came from."""

    def __init__(self, values: dict[str, object], source: Source) -> None:
        self.values = values
        self.sources = {"": source}
        #: Top-level keys some file or override gave (not only the embedded defaults).
        self.given: set[str] = set()

    def put(self, key: str, value: object, source: Source) -> None:
        self.values[key] = value
        self.sources[key] = source
        self.given.add(key.partition(".")[0])

    def source(self, key: str) -> Source:
        """The source of a key (`a.b`, `a[2].b`): the one recorded for it or for its nearest parent."""
        while key not in self.sources:
            key = _PARENT_PATTERN.sub("", key, count=1) if key else ""
        return self.sources[key]


def gather(
    config_path: str | None,
    data_capture_path: str | None,
    overrides: Overrides,
    *,
    environ: Mapping[str, str],
    cwd: str,
    problems: list[str],
    data_capture_keys: Collection[str],
) -> Draft:
    """Defaults, then the TOML file, the JSON file and the overrides, each replacing what came before.

    Unreadable and unparsable files are recorded in `problems`; `cwd` must be absolute. Keys are
    not checked here, not even unknown ones: validation reports them with the rest.
    `data_capture_keys` tell a bare `DataCaptureConfig` object in the JSON file.
    """
    draft = _defaults(environ, cwd)
    if config_path is not None:
        _merge_toml(draft, config_path, cwd, problems)
    if data_capture_path is not None:
        _merge_json(draft, data_capture_path, cwd, problems, data_capture_keys)
    _merge_overrides(draft, overrides, cwd)
    return draft


def _defaults(environ: Mapping[str, str], cwd: str) -> Draft:
    """The embedded defaults: systemd's RuntimeDirectory= / StateDirectory= when set, else ./captured-data."""
    runtime = _first_dir(environ.get("RUNTIME_DIRECTORY", ""), cwd)
    state = _first_dir(environ.get("STATE_DIRECTORY", ""), cwd)
    data_capture = {
        "EnableCapture": True,
        "InitialSamplingPercentage": 100,
        "DestinationS3Uri": "file://" + os.path.join(state, "out"),
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {
            "CsvContentTypes": list(SDK_CSV_CONTENT_TYPES),
            "JsonContentTypes": list(SDK_JSON_CONTENT_TYPES),
        },
    }
    values: dict[str, object] = {
        "endpoint_name": "local-endpoint",
        "variant_name": "AllTraffic",
        "socket_path": os.path.join(runtime, "capture.sock"),
        "spool_dir": os.path.join(state, "spool"),
        "DataCaptureConfig": data_capture,
    }  # every other default is the Struct's
    return Draft(values, Source("", cwd))


def _first_dir(value: str, cwd: str) -> str:
    # systemd joins the directories of one setting with ':'; the first is ours.
    first = value.split(":")[0]
    return os.path.normpath(os.path.join(cwd, first)) if first else os.path.join(cwd, "captured-data")


def _merge_toml(draft: Draft, path: str, cwd: str, problems: list[str]) -> None:
    full = os.path.join(cwd, path)
    data = _read(path, full, problems, tomllib.loads, "TOML")
    if not isinstance(data, dict):
        return
    source = Source(path, os.path.dirname(full))
    for key, value in data.items():
        draft.put(key, value, source)


def _merge_json(
    draft: Draft, path: str, cwd: str, problems: list[str], data_capture_keys: Collection[str]
) -> None:
    full = os.path.join(cwd, path)
    data = _read(path, full, problems, json.loads, "JSON")
    if data is None:
        return
    if not isinstance(data, dict):
        problems.append(f"{path}: must hold a JSON object")
        return
    # A whole CreateEndpointConfig request or saved DescribeEndpointConfig response: only its
    # DataCaptureConfig matters, the keys around it are none of our business.
    wrapped = "DataCaptureConfig" in data
    if not wrapped and not data.keys() & set(data_capture_keys):
        problems.append(
            f"{path}: no DataCaptureConfig found: expected the bare object"
            ' or an object holding it under a "DataCaptureConfig" key'
        )
        return
    source = Source(path, os.path.dirname(full))
    draft.put("DataCaptureConfig", data["DataCaptureConfig"] if wrapped else data, source)


def _read(
    path: str, full: str, problems: list[str], parse: Callable[[str], object], kind: str
) -> object | None:
    """The parsed file, or None after recording one problem line."""
    try:
        with open(full, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problems.append(f"{path}: cannot read: {reason}")
        return None
    try:
        return parse(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError
        problems.append(f"{path}: invalid {kind}: {exc}")
        return None


def _merge_overrides(draft: Draft, overrides: Overrides, cwd: str) -> None:
    source = Source("", cwd)
    for name in overrides.__struct_fields__:
        value = getattr(overrides, name)
        if value is None:
            continue
        if name not in INNER:
            draft.put(name, value, source)
            continue
        data_capture = draft.values["DataCaptureConfig"]
        # Not a table: validation reports that, and there is nothing inside to override.
        if isinstance(data_capture, dict):
            # A copy: the dict may be the one a file was parsed into.
            draft.values["DataCaptureConfig"] = {**data_capture, INNER[name]: value}
            draft.sources[f"DataCaptureConfig.{INNER[name]}"] = source
        draft.given.add("DataCaptureConfig")


def show(value: object, limit: int = 80) -> str:
    """A value as a problem line shows it: repr (one line, newlines escaped), truncated."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_key(key: object, value: object, parent: str, known: Collection[str]) -> str:
    """The problem line (without file prefix) for a key no table of ours has."""
    name = key if isinstance(key, str) and _BARE_KEY_PATTERN.fullmatch(key) else show(key, 40)
    dotted = f"{parent}.{name}" if parent else name
    return f"{dotted} = {show(value)}: unknown key (known: {', '.join(known)})"


# --- writing TOML ----------------------------------------------------------------------------------------

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_TOML_SPECIAL = re.compile(r'["\\\x00-\x1f\x7f]')


def toml_document(root: msgspec.Struct, comment: str) -> str:
    """A tree of Structs as TOML: scalars and lists as `key = value`, nested Structs as `[tables]`.

    Only what our config tree holds is supported: bool, int, finite float, str, tuples, Structs; a
    None field is left out (every optional field defaults to None), and so is an empty list (every
    list that may be empty defaults to empty).
    """
    lines = [f"# {comment}"]
    _table(lines, "", root)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], name: str, struct: msgspec.Struct, header: str = "[{}]") -> None:
    if name:
        lines += ["", header.format(name)]
    nested: list[tuple[str, msgspec.Struct, str]] = []
    for field in struct.__struct_fields__:
        value = getattr(struct, field)
        if isinstance(value, msgspec.Struct):
            nested.append((field, value, "[{}]"))  # TOML wants a table's plain keys before its sub-tables
        elif value and isinstance(value, tuple) and all(_has_tables(item) for item in value):
            nested += [(field, item, "[[{}]]") for item in value]  # [[endpoints]]: an array of tables
        elif value is not None and value != ():
            lines.append(f"{field} = {toml_value(field, value)}")
    for field, value, kind in nested:
        _table(lines, f"{name}.{field}" if name else field, value, kind)


def _has_tables(value: object) -> bool:
    """A Struct holding a Struct: written as a table of its own, never inline."""
    return isinstance(value, msgspec.Struct) and any(
        isinstance(getattr(value, f), msgspec.Struct) for f in value.__struct_fields__
    )


def toml_value(field: str, value: object) -> str:
    """The TOML literal of field `field`'s `value` (permission bits in octal)."""
    return f"0o{value:03o}" if field == "socket_mode" and isinstance(value, int) else _value(value)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr of a finite float is valid TOML and reads back exactly
    if isinstance(value, str):
        return '"' + _TOML_SPECIAL.sub(lambda m: _TOML_ESCAPES.get(m[0], f"\\u{ord(m[0]):04x}"), value) + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, msgspec.Struct):  # inside a list: an inline table
        fields = [(f, getattr(value, f)) for f in value.__struct_fields__]
        return "{ " + ", ".join(f"{f} = {_value(v)}" for f, v in fields if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
