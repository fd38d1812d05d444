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
from captured.service.configcheck import (
    MISSING,
    TABLE_RULE,
    Checker,
    check_tree,
    replace_block,
    table_rows,
    whole,
)
from captured.service.configfile import Draft, Overrides, gather, show, toml_document
from captured.service.datacapture import DataCaptureConfig
from captured.service.settings import (
    DeliveryConfig,
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


#: How an endpoint's sampling decides: one uniform draw per record, or a pure function of the
#: inference id (`captured.daemon.sample`).
SAMPLING_MODES = ("random", "inference_id")
_SamplingMode = Annotated[
    str,
    Meta(
        pattern=r"\A(?:random|inference_id)\Z",
        description="`random` (SageMaker's way: one draw per record) or `inference_id`: kept or not by"
        " a hash of the inference id, the same on every host, variant and restart (see Sampling)",
        extra={"rule": "must be random or inference_id", "default": '`"random"`'},
    ),
]
_ENDPOINT_NAME = "SageMaker's EndpointName, the first component of every object key"
_VARIANT_NAME = "the variant of captures that name none"
#: Most endpoints one daemon serves (each may hold open files; one socket, spool and uploader serve all).
MAX_ENDPOINTS = 64


class EndpointConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One endpoint of the host: an item of `[[endpoints]]`, or the top-level single-endpoint form."""

    endpoint_name: Annotated[_Name, Meta(description=_ENDPOINT_NAME)]
    DataCaptureConfig: DataCaptureConfig
    variant_name: Annotated[_Name, Meta(description=_VARIANT_NAME)] = "AllTraffic"
    sampling_mode: _SamplingMode = "random"


#: The top-level keys of the single-endpoint form; a file with `[[endpoints]]` has none of them.
SINGLE_FORM_KEYS = ("endpoint_name", "variant_name", "sampling_mode", "DataCaptureConfig")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration. Endpoints come in one of two forms: the single-endpoint form at
    the top level (`endpoint_name`, `variant_name`, `sampling_mode`, `[DataCaptureConfig]`), or
    `[[endpoints]]` (then those four are None). Read them through `endpoint_configs`."""

    endpoint_name: Annotated[_Name, Meta(description=_ENDPOINT_NAME + " (single-endpoint form)")] | None = (
        None
    )
    variant_name: Annotated[_Name, Meta(description=_VARIANT_NAME + " (single-endpoint form)")] | None = None
    sampling_mode: _SamplingMode | None = None
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
    DataCaptureConfig: (
        Annotated[
            DataCaptureConfig,
            Meta(
                description="SageMaker's `DataCaptureConfig` of the endpoint (single-endpoint form)",
                extra={"default": "its keys' defaults, below"},
            ),
        ]
        | None
    ) = None
    endpoints: Annotated[
        tuple[EndpointConfig, ...],
        Meta(
            min_length=1,
            max_length=MAX_ENDPOINTS,
            description="several endpoints on one host, each an `[[endpoints]]` table with its own"
            " `endpoint_name`, `variant_name`, `sampling_mode` and `[endpoints.DataCaptureConfig]`;"
            " instead of the single-endpoint keys",
            extra={"items": "endpoint tables"},
        ),
    ] = ()
    default_endpoint: (
        Annotated[
            _Name,
            Meta(
                description="with `[[endpoints]]`: where captures that name no endpoint go (none: they are"
                " refused, counted `unknown_endpoint`)"
            ),
        ]
        | None
    ) = None
    spool: SpoolConfig = SpoolConfig()
    ingest: IngestConfig = IngestConfig()
    s3: S3Config = S3Config()
    watermark: WatermarkConfig = WatermarkConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    metrics: MetricsConfig = MetricsConfig()

    @property
    def endpoint_configs(self) -> tuple[EndpointConfig, ...]:
        """Every endpoint, whichever form the file used."""
        if self.endpoints:
            return self.endpoints
        assert self.endpoint_name is not None and self.DataCaptureConfig is not None
        return (
            EndpointConfig(
                endpoint_name=self.endpoint_name,
                DataCaptureConfig=self.DataCaptureConfig,
                variant_name=self.variant_name or "AllTraffic",
                sampling_mode=self.sampling_mode or "random",
            ),
        )

    @property
    def default_endpoint_name(self) -> str | None:
        """Where a capture naming no endpoint goes: the single endpoint, or `default_endpoint`."""
        return self.default_endpoint if self.endpoints else self.endpoint_name


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
    _one_form(draft, problems)
    values = check_tree(Checker(draft, problems, host=check_host), Config)
    _check_endpoints(draft, values, problems)
    if problems:
        raise ConfigError(problems)
    try:
        return msgspec.convert(values, Config)
    except msgspec.ValidationError as exc:  # a declaration the checks above do not cover: a bug
        raise ConfigError([f"internal error: {exc}"]) from exc


def _one_form(draft: Draft, problems: list[str]) -> None:
    """`[[endpoints]]` replaces the single-endpoint keys: drop their embedded defaults, and refuse
    a configuration that gives both forms (or `default_endpoint` without `[[endpoints]]`)."""
    if "endpoints" not in draft.given:
        ck = Checker(draft, problems)
        for key, rule in (("endpoint_name", _NAME_RULE), ("DataCaptureConfig", TABLE_RULE)):
            if draft.values.get(key) is None:  # required in this form (a JSON file may hold a null)
                ck.bad(key, draft.values.get(key, MISSING), rule)
        if "default_endpoint" in draft.given:
            value = show(draft.values["default_endpoint"])
            problems.append(
                f"{_label(draft, 'default_endpoint')}default_endpoint = {value}:"
                " only with [[endpoints]] (the single endpoint takes every capture)"
            )
        return
    both = [key for key in SINGLE_FORM_KEYS if key in draft.given]
    if both:
        problems.append(
            f"{_label(draft, 'endpoints')}endpoints and {', '.join(both)}: a configuration uses one form or"
            " the other: several endpoints as [[endpoints]] tables, each with its own endpoint_name,"
            " variant_name, sampling_mode and DataCaptureConfig, or one endpoint with those keys at the top"
            " level (the --endpoint-name, --variant-name, --destination and --sampling-percentage flags and"
            " a --data-capture-config file set the top-level keys)"
        )
    for key in SINGLE_FORM_KEYS:
        draft.values.pop(key, None)


def _check_endpoints(draft: Draft, values: dict[str, object], problems: list[str]) -> None:
    """Rules across `[[endpoints]]`: unique names; `default_endpoint` one of them."""
    items = values.get("endpoints")
    if not isinstance(items, list):
        return
    names = [item.get("endpoint_name") for item in items if isinstance(item, dict)]
    for i, name in enumerate(names):
        if name is not None and name in names[:i]:
            problems.append(
                f"{_label(draft, 'endpoints')}endpoints[{i}].endpoint_name = {show(name)}: endpoint names"
                " must be unique (each is the first component of its object keys)"
            )
    default = values.get("default_endpoint")
    if isinstance(default, str) and default not in names:
        problems.append(
            f"{_label(draft, 'default_endpoint')}default_endpoint = {show(default)}: must be the"
            f" endpoint_name of one of the [[endpoints]] ({', '.join(map(str, names))})"
        )


def _label(draft: Draft, key: str) -> str:
    label = draft.source(key).label
    return f"{label}: " if label else ""


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
