"""The frozen configuration tree, built once at the edge (the CLI), and its loading.

Every setting is declared once, on its field: type, default, range (`msgspec.Meta` constraints),
description and, where Meta cannot say it, a hand-written rule hooked in `Meta.extra`
(`configrules`). The top-level keys are declared here, captured's own tables in `settings`,
SageMaker's `DataCaptureConfig` table, with SageMaker's own rules (see the spec, section 2), in
`datacapture`; everything is importable from here. One generic walk (`configcheck`) checks raw
values against these declarations, and renders the README's configuration table from them
(`readme_table`; a test keeps the README equal to it).

`load_config` layers its sources, lowest first: embedded defaults, a TOML file, a SageMaker JSON file holding
a `DataCaptureConfig`, then command-line `Overrides` (read and merged by `captured.service.configfile`).
Only the merged result is validated, so an override can mend a bad file value. Every problem is collected
and reported together (`ConfigError`), one line each:

    [<file>: ]<dotted.key> = <value>: <rule>

Names are rejected, never cleaned: they become path components. `render_toml` writes the effective
configuration back as TOML that `load_config` reads to an equal `Config`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Annotated

import msgspec
from msgspec import Meta

from captured.errors import ConfigError
from captured.service import configrules as rules
from captured.service.configcheck import Checker, check_tree, replace_block, table_rows, whole
from captured.service.configfile import Overrides, gather, toml_document
from captured.service.datacapture import DataCaptureConfig
from captured.service.settings import (
    IngestConfig,
    MetricsConfig,
    S3Config,
    SpoolConfig,
    WatermarkConfig,
)
from captured.wire.rules import NAME_PATTERN

_NAME_RULE = (
    "must be 1 to 63 letters, digits or hyphens, starting and ending with a letter or digit"
    " (it becomes a path component)"
)
_PATH_RULE = "must be a non-empty path without NUL characters"
_Name = Annotated[
    str, Meta(min_length=1, max_length=63, pattern=whole(NAME_PATTERN), extra={"rule": _NAME_RULE})
]


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    endpoint_name: Annotated[
        _Name, Meta(description="SageMaker's EndpointName, the first component of every object key")
    ]
    variant_name: Annotated[_Name, Meta(description="the variant of captures that name none")]
    #: Absolute.
    socket_path: Annotated[
        str,
        Meta(
            description="where clients connect; at most"
            f" {rules.MAX_SOCKET_PATH} bytes once made absolute (the AF_UNIX limit). Relative paths"
            " resolve against the TOML file's directory (flags: the working directory).",
            extra={
                "parse": rules.socket_path,
                "rule": _PATH_RULE,
                "default": "`$RUNTIME_DIRECTORY/capture.sock`, else `./captured-data/capture.sock`",
            },
        ),
    ]
    #: Absolute.
    spool_dir: Annotated[
        str,
        Meta(
            description="where open (`.part`) and sealed files wait; created when missing",
            extra={
                "parse": rules.spool_dir,
                "rule": _PATH_RULE,
                "default": "`$STATE_DIRECTORY/spool`, else `./captured-data/spool`",
            },
        ),
    ]
    DataCaptureConfig: DataCaptureConfig
    spool: SpoolConfig = SpoolConfig()
    ingest: IngestConfig = IngestConfig()
    s3: S3Config = S3Config()
    watermark: WatermarkConfig = WatermarkConfig()
    metrics: MetricsConfig = MetricsConfig()


_NO_OVERRIDES = Overrides()


def load_config(
    config_path: str | None = None,
    data_capture_path: str | None = None,
    overrides: Overrides = _NO_OVERRIDES,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
    *,
    check_host: bool = False,
) -> Config:
    """Build the frozen `Config` from defaults, a TOML file, a SageMaker JSON file and overrides.

    `environ` (default `os.environ`) and `cwd` (default the working directory) are only read here.
    `check_host`: also report what `serve` would fail on at start on this host (an unknown socket
    group, a spool directory that is not a writable directory, a directory that cannot be
    created); nothing is created. Raises `ConfigError` listing every problem found.
    """
    cwd = os.path.abspath(os.getcwd() if cwd is None else cwd)
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    keys = DataCaptureConfig.__struct_fields__
    draft = gather(
        config_path,
        data_capture_path,
        overrides,
        environ=environ,
        cwd=cwd,
        problems=problems,
        data_capture_keys=keys,
    )
    values = check_tree(Checker(draft, problems, host=check_host), Config)
    if problems:
        raise ConfigError(problems)
    try:
        return msgspec.convert(values, Config)
    except msgspec.ValidationError as exc:  # a declaration the checks above do not cover: a bug
        raise ConfigError([f"internal error: {exc}"]) from exc


def render_toml(cfg: Config) -> str:
    """The effective configuration as TOML text that `load_config` reads back to an equal `Config`."""
    return toml_document(cfg, "effective configuration")


# --- the README's table ----------------------------------------------------------------------------------


def readme_table() -> list[str]:
    """The README's configuration table (lines), rendered from the declarations above.

    The default column shows the embedded defaults (`DataCaptureConfig`'s are replaced as a whole by
    a table or a JSON file); paths computed at start say so in words (`Meta.extra["default"]`).
    """
    return table_rows(Config, load_config(environ={}, cwd="/"))


if __name__ == "__main__":  # python -m captured.service.config README.md: regenerate the table in place
    for name in sys.argv[1:]:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        with open(name, "w", encoding="utf-8") as f:
            f.write(replace_block(text, readme_table()))
