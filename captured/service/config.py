"""The frozen configuration tree, its loading and its validation, done once at the edge (CLI).

The `DataCaptureConfig` table is SageMaker's own structure with SageMaker's own rules (see the spec,
section 2). Everything else is `captured`'s: where the socket and the spool live, how often spool files are
sealed and how large a frame may be.

`load_config` layers its sources, lowest first: embedded defaults, a TOML file, a SageMaker JSON file holding
a `DataCaptureConfig`, then command-line `Overrides` (read and merged
by `captured.service.configfile`).
Only the merged result is validated, so an override can mend a bad file value. Every problem is collected
and reported together (`ConfigError`), one line each:

    [<file>: ]<dotted.key> = <value>: <rule>

Names are rejected, never cleaned: they become path components. `render_toml` writes the effective
configuration back as TOML that `load_config` reads to an equal `Config`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping

import msgspec

from captured.service.configfile import SDK_CSV_CONTENT_TYPES as SDK_CSV_CONTENT_TYPES
from captured.service.configfile import SDK_JSON_CONTENT_TYPES as SDK_JSON_CONTENT_TYPES
from captured.service.configfile import Draft, gather, show, toml_document, unknown_key
from captured.service.configfile import Overrides as Overrides

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
SIX_MIB = 6 * MIB

#: Endpoint and variant names (API `EndpointName` / `VariantName`); use with `fullmatch`.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
#: Items of `CsvContentTypes` / `JsonContentTypes` (API); use with `fullmatch`.
CONTENT_TYPE_PATTERN = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*/[a-zA-Z0-9](-*[a-zA-Z0-9.])*")
_KMS_KEY_PATTERN = re.compile(r"[a-zA-Z0-9:/_-]*")
_BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4_PATTERN = re.compile(r"\d+\.\d+\.\d+\.\d+")
_SCHEME_PATTERN = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")

#: API spellings plus the SageMaker Python SDK's, normalised to the API's.
CAPTURE_MODES = {
    "Input": "Input",
    "Output": "Output",
    "InputAndOutput": "InputAndOutput",
    "REQUEST": "Input",
    "RESPONSE": "Output",
}
#: AF_UNIX `sun_path` is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
#: One record carrying a maximum-size request and response (6 MiB each) plus room for metadata.
MIN_FRAME_BYTES = 2 * SIX_MIB + 64 * KIB
MAX_FRAME_BYTES = 256 * MIB


class CaptureContentTypeHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    CsvContentTypes: tuple[str, ...] | None = None
    JsonContentTypes: tuple[str, ...] | None = None


class CaptureOption(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Normalised to "Input", "Output" or "InputAndOutput".
    CaptureMode: str


class DataCaptureConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    InitialSamplingPercentage: int
    #: `s3://bucket[/prefix]` as given (a trailing "/" kept), or `file://` + an absolute, normalised path.
    DestinationS3Uri: str
    CaptureOptions: tuple[CaptureOption, ...]
    EnableCapture: bool = True
    KmsKeyId: str | None = None
    CaptureContentTypeHeader: CaptureContentTypeHeader | None = None

    @property
    def capture_input(self) -> bool:
        return any(o.CaptureMode in ("Input", "InputAndOutput") for o in self.CaptureOptions)

    @property
    def capture_output(self) -> bool:
        return any(o.CaptureMode in ("Output", "InputAndOutput") for o in self.CaptureOptions)


class SpoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Seal an open file at least this often (SageMaker writes about one file a minute).
    max_file_age_s: float = 60.0
    #: Seal a file before a write would take it past this size.
    max_file_bytes: int = 64 * 1024 * 1024
    #: fdatasync open spool files this often (0: only when a file is sealed). A power loss can
    #: cost the records written since the last sync; a crash of the daemon alone costs nothing.
    fsync_interval_s: float = 1.0
    #: Spool files open at once, over all variants and hours; past it, the least recently written
    #: is sealed first (a client cannot hold descriptors and reserved disk with many hours).
    max_open_files: int = 64


class IngestConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Largest frame the daemon accepts; a larger header closes the connection.
    max_frame_bytes: int = 16 * 1024 * 1024
    #: How long shutdown keeps reading what connected clients already sent.
    drain_timeout_s: float = 2.0
    #: Permission bits of the socket file the daemon creates.
    socket_mode: int = 0o660
    #: Group of the socket file (a name or a number); None: the daemon's own group.
    socket_group: str | None = None
    #: When either list is non-empty, only peers whose uid (SO_PEERCRED) is in `allowed_uids`
    #: or whose gid is in `allowed_gids` are served; others are refused (`peer_refused`).
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    #: Client connections served at once; more are refused (`too_many_connections`).
    max_connections: int = 1024
    #: Unfinished frames all connections together may hold; the connection that crosses it is
    #: closed (`memory_limit`). At least `max_frame_bytes`.
    max_buffered_bytes: int = 64 * 1024 * 1024
    #: A frame must arrive whole this long after its first byte, or the connection is closed
    #: (`stalled_frame`): a client stalled mid-frame, or trickling bytes, holds a buffer.
    frame_timeout_s: float = 30.0
    #: Records whose inferenceTime is further ahead of the daemon's clock are refused one by one
    #: (`future_time`): each distinct hour opens a file; any past time is taken.
    max_future_s: float = 300.0


class WatermarkConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Capture stops while the spool's filesystem is this full, and starts again below `low`."""

    #: Stop at or above this much of the filesystem used (AWS advises 75 %).
    high_percent: float = 75.0
    #: Start again once usage is at or below this.
    low_percent: float = 70.0
    #: Stop also when fewer bytes than this are free (0: off); start again once this plus
    #: (high_percent - low_percent) % of the filesystem is free.
    min_free_bytes: int = 0


class S3Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Delivery to `s3://` destinations; credentials come from the standard AWS chain."""

    #: For S3-compatible stores (MinIO, Ceph, a local test server); None: AWS S3.
    endpoint_url: str | None = None
    #: None: from the AWS configuration chain (AWS_REGION, ~/.aws/config, instance metadata).
    region: str | None = None
    #: Files at or above this size go up as multipart uploads; smaller ones with PutObject.
    multipart_threshold_bytes: int = 16 * MIB
    #: Part size; raised when a file would need more than 10,000 parts.
    part_size_bytes: int = 8 * MIB
    #: Files uploading at the same time.
    max_concurrent_uploads: int = 4
    #: Parts in flight at the same time, across all multipart uploads.
    max_concurrent_parts: int = 8
    #: On SIGTERM, how long sealed files keep uploading before the rest waits for the next start.
    shutdown_timeout_s: float = 30.0
    #: After a failure no retry can mend by itself (access denied, no such bucket, bad KMS key):
    #: how long until the next try, so a fixed permission resumes delivery without a restart.
    fatal_retry_s: float = 60.0
    #: No single S3 request may take longer (a stalled connection otherwise hangs an upload).
    request_timeout_s: float = 120.0
    #: Uploads run in a child process at this `nice` value (0..19) above the daemon's, so that
    #: on a busy host the CPU goes to inference and capture first and uploads take what is left.
    uploader_nice: int = 10
    #: At start, open multipart uploads of capture files under this daemon's `{endpoint}/`
    #: prefix that no spool file explains are aborted once S3 says they are this old; younger
    #: ones may be another host's, in flight to the same prefix. 0: abort them all (a
    #: destination only this host writes).
    abort_unknown_uploads_after_s: float = 3600.0


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    #: Where Prometheus metrics are served: `127.0.0.1:9464` (TCP) or an absolute Unix socket
    #: path in a directory the daemon may write (under systemd: its StateDirectory); None: off.
    address: str | None = None


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    endpoint_name: str
    variant_name: str
    #: Absolute.
    socket_path: str
    #: Absolute.
    spool_dir: str
    DataCaptureConfig: DataCaptureConfig
    spool: SpoolConfig = SpoolConfig()
    ingest: IngestConfig = IngestConfig()
    s3: S3Config = S3Config()
    watermark: WatermarkConfig = WatermarkConfig()
    metrics: MetricsConfig = MetricsConfig()


class ConfigError(Exception):
    """The configuration was refused; `problems` holds one line per problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def valid_name(s: object) -> bool:
    """Whether `s` is a valid endpoint or variant name; cheap enough for names coming from clients."""
    # The length test first: a client could send a long string, and it bounds the regex's work.
    return isinstance(s, str) and len(s) <= 63 and NAME_PATTERN.fullmatch(s) is not None


_NO_OVERRIDES = Overrides()


def load_config(
    config_path: str | None = None,
    data_capture_path: str | None = None,
    overrides: Overrides = _NO_OVERRIDES,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> Config:
    """Build the frozen `Config` from defaults, a TOML file, a SageMaker JSON file and overrides.

    `environ` (default `os.environ`) and `cwd` (default the working directory) are only read here.
    Raises `ConfigError` listing every problem found.
    """
    cwd = os.path.abspath(os.getcwd() if cwd is None else cwd)
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    draft = gather(config_path, data_capture_path, overrides, environ=environ, cwd=cwd, problems=problems)
    config = _build(_Checker(draft, problems))
    if problems:
        raise ConfigError(problems)
    return config


def render_toml(cfg: Config) -> str:
    """The effective configuration as TOML text that `load_config` reads back to an equal `Config`."""
    return toml_document(cfg, "effective configuration")


# --- validation ------------------------------------------------------------------------------------------

_MISSING = object()  # stands for a required key that is absent


class _Checker:
    """Validates raw values; each check records a problem and returns a placeholder when it fails.

    The placeholders only let the build go on to find further problems: `load_config` raises if any.
    """

    def __init__(self, draft: Draft, problems: list[str]) -> None:
        self.draft = draft
        self.problems = problems

    def prefix(self, key: str) -> str:
        label = self.draft.source(key).label
        return f"{label}: " if label else ""

    def bad(self, key: str, value: object, rule: str) -> None:
        prefix = self.prefix(key)
        if value is _MISSING:
            self.problems.append(f"{prefix}{key}: missing, required: {rule}")
        else:
            self.problems.append(f"{prefix}{key} = {show(value)}: {rule}")

    def base_dir(self, key: str) -> str:
        return self.draft.source(key).base_dir

    def table(self, key: str, value: object, known: Collection[str]) -> dict[str, object] | None:
        if not isinstance(value, dict):
            self.bad(key, value, "must be a table (an object)")
            return None
        for name, item in value.items():
            if name not in known:
                self.problems.append(self.prefix(key) + unknown_key(name, item, key, known))
        return value

    def integer(self, key: str, value: object, lo: int, hi: int, rule: str = "") -> int:
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        self.bad(key, value, rule or f"must be an integer from {lo} to {hi}")
        return lo

    def number(self, key: str, value: object, ok: Callable[[float], bool], rule: str) -> float:
        # Range tests run before float(): a huge int would overflow; NaN fails every comparison.
        if isinstance(value, int | float) and not isinstance(value, bool) and ok(value):
            return float(value)
        self.bad(key, value, rule)
        return 0.0

    def boolean(self, key: str, value: object) -> bool:
        if isinstance(value, bool):
            return value
        self.bad(key, value, "must be a boolean (true or false)")
        return False

    def string(self, key: str, value: object, ok: Callable[[str], bool], rule: str) -> str:
        if isinstance(value, str) and ok(value):
            return value
        self.bad(key, value, rule)
        return ""

    def path(self, key: str, value: object) -> str:
        """An absolute, normalised path; relative ones resolve against their source's directory."""
        text = self.string(
            key, value, lambda s: s != "" and "\0" not in s, "must be a non-empty path without NUL characters"
        )
        return os.path.normpath(os.path.join(self.base_dir(key), text)) if text else ""


_NAME_RULE = (
    "must be 1 to 63 letters, digits or hyphens, starting and ending with a letter or digit"
    " (it becomes a path component)"
)


def _build(ck: _Checker) -> Config:
    values = ck.draft.values
    return Config(
        endpoint_name=ck.string("endpoint_name", values["endpoint_name"], valid_name, _NAME_RULE),
        variant_name=ck.string("variant_name", values["variant_name"], valid_name, _NAME_RULE),
        socket_path=_socket_path(ck, values["socket_path"]),
        spool_dir=ck.path("spool_dir", values["spool_dir"]),
        DataCaptureConfig=_data_capture(ck, values["DataCaptureConfig"]),
        spool=_spool(ck, values["spool"]),
        ingest=_ingest(ck, values["ingest"]),
        s3=_s3(ck, values["s3"]),
        watermark=_watermark(ck, values["watermark"]),
        metrics=_metrics(ck, values["metrics"]),
    )


def _socket_path(ck: _Checker, value: object) -> str:
    path = ck.path("socket_path", value)
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        rule = (
            f"is {size} bytes long, must be at most {MAX_SOCKET_PATH_BYTES} bytes in UTF-8 once made absolute"
            " (the AF_UNIX sun_path limit): choose a shorter directory"
        )
        ck.bad("socket_path", path, rule)
    return path


def _spool(ck: _Checker, value: object) -> SpoolConfig:
    table = ck.table("spool", value, SpoolConfig.__struct_fields__) or {}
    default = SpoolConfig()
    return SpoolConfig(
        max_file_age_s=ck.number(
            "spool.max_file_age_s",
            table.get("max_file_age_s", default.max_file_age_s),
            lambda x: 0 < x <= 3600,
            "must be a number of seconds greater than 0 and at most 3600",
        ),
        max_file_bytes=ck.integer(
            "spool.max_file_bytes", table.get("max_file_bytes", default.max_file_bytes), 1024, 5 * GIB
        ),
        fsync_interval_s=ck.number(
            "spool.fsync_interval_s",
            table.get("fsync_interval_s", default.fsync_interval_s),
            lambda x: 0 <= x <= 3600,
            "must be a number of seconds from 0 (only when a file is sealed) to 3600",
        ),
        max_open_files=ck.integer(
            "spool.max_open_files", table.get("max_open_files", default.max_open_files), 1, 4096
        ),
    )


def _metrics(ck: _Checker, value: object) -> MetricsConfig:
    table = ck.table("metrics", value, MetricsConfig.__struct_fields__) or {}
    address = table.get("address")
    if address is None:
        return MetricsConfig()

    def ok(s: str) -> bool:
        if s.startswith("/"):
            return len(s.encode()) <= 107
        host, sep, port = s.rpartition(":")
        return bool(sep and host and port.isdigit() and int(port) <= 65535)

    return MetricsConfig(
        address=ck.string(
            "metrics.address",
            address,
            ok,
            "must be host:port (e.g. 127.0.0.1:9464) or an absolute socket path",
        )
    )


def _watermark(ck: _Checker, value: object) -> WatermarkConfig:
    table = ck.table("watermark", value, WatermarkConfig.__struct_fields__) or {}
    d = WatermarkConfig()
    high = ck.number(
        "watermark.high_percent",
        table.get("high_percent", d.high_percent),
        lambda x: 0 < x <= 100,
        "must be a percentage greater than 0 and at most 100",
    )
    bound = high if high > 0 else 100.0  # a refused high_percent already said so
    low = ck.number(
        "watermark.low_percent",
        table.get("low_percent", d.low_percent),
        lambda x: 0 <= x < bound,
        f"must be a percentage from 0 to below high_percent ({bound:g})",
    )
    return WatermarkConfig(
        high_percent=high,
        low_percent=low,
        min_free_bytes=ck.integer(
            "watermark.min_free_bytes", table.get("min_free_bytes", d.min_free_bytes), 0, 2**62
        ),
    )


def _ingest(ck: _Checker, value: object) -> IngestConfig:
    table = ck.table("ingest", value, IngestConfig.__struct_fields__) or {}
    default = IngestConfig()
    frame_rule = (
        f"must be an integer from {MIN_FRAME_BYTES} (two 6 MiB bodies plus 64 KiB, so that one record"
        f" with a maximum-size request and response fits) to {MAX_FRAME_BYTES} (256 MiB)"
    )
    return IngestConfig(
        max_frame_bytes=ck.integer(
            "ingest.max_frame_bytes",
            table.get("max_frame_bytes", default.max_frame_bytes),
            MIN_FRAME_BYTES,
            MAX_FRAME_BYTES,
            frame_rule,
        ),
        drain_timeout_s=ck.number(
            "ingest.drain_timeout_s",
            table.get("drain_timeout_s", default.drain_timeout_s),
            lambda x: 0 <= x <= 600,
            "must be a number of seconds from 0 to 600",
        ),
        socket_mode=_socket_mode(ck, table.get("socket_mode", default.socket_mode)),
        socket_group=_socket_group(ck, table.get("socket_group")),
        allowed_uids=_id_list(ck, "ingest.allowed_uids", table.get("allowed_uids", [])),
        allowed_gids=_id_list(ck, "ingest.allowed_gids", table.get("allowed_gids", [])),
        max_connections=ck.integer(
            "ingest.max_connections", table.get("max_connections", default.max_connections), 1, 65536
        ),
        max_buffered_bytes=ck.integer(
            "ingest.max_buffered_bytes",
            table.get("max_buffered_bytes", default.max_buffered_bytes),
            MIN_FRAME_BYTES,
            16 * GIB,
        ),
        frame_timeout_s=ck.number(
            "ingest.frame_timeout_s",
            table.get("frame_timeout_s", default.frame_timeout_s),
            lambda x: 0.1 <= x <= 3600,
            "must be a number of seconds from 0.1 to 3600",
        ),
        max_future_s=ck.number(
            "ingest.max_future_s",
            table.get("max_future_s", default.max_future_s),
            lambda x: 0 <= x <= 366 * 86400,
            "must be a number of seconds from 0 to 31622400 (a year)",
        ),
    )


def _socket_mode(ck: _Checker, value: object) -> int:
    # TOML has octal integers (0o660); a string of octal digits ("0660") is taken too.
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    ck.bad("ingest.socket_mode", value, 'must be permission bits such as 0o660 or "0660"')
    return 0o660


def _socket_group(ck: _Checker, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return str(value)
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?", value):
        return value
    ck.bad("ingest.socket_group", value, "must be a group name or a gid")
    return None


def _id_list(ck: _Checker, key: str, value: object) -> tuple[int, ...]:
    items = value if isinstance(value, list) and len(value) <= 1024 else None
    if items is not None and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in items
    ):
        return tuple(items)
    ck.bad(key, value, "must be a list of at most 1024 numeric ids (0 to 4294967295)")
    return ()


def _s3(ck: _Checker, value: object) -> S3Config:
    table = ck.table("s3", value, S3Config.__struct_fields__) or {}
    d = S3Config()

    def url_ok(s: str) -> bool:
        return s.startswith(("http://", "https://")) and len(s) <= 2048 and " " not in s

    endpoint = table.get("endpoint_url")
    region = table.get("region")
    return S3Config(
        endpoint_url=None
        if endpoint is None
        else ck.string("s3.endpoint_url", endpoint, url_ok, "must be an http:// or https:// URL"),
        region=None
        if region is None
        else ck.string(
            "s3.region",
            region,
            lambda s: re.fullmatch(r"[a-z0-9-]{1,32}", s) is not None,
            "must be an AWS region name such as us-east-1",
        ),
        multipart_threshold_bytes=ck.integer(
            "s3.multipart_threshold_bytes",
            table.get("multipart_threshold_bytes", d.multipart_threshold_bytes),
            5 * MIB,
            5 * GIB,
            "must be an integer from 5 MiB (S3's smallest part) to 5 GiB (the largest PutObject)",
        ),
        part_size_bytes=ck.integer(
            "s3.part_size_bytes",
            table.get("part_size_bytes", d.part_size_bytes),
            5 * MIB,
            5 * GIB,
            "must be an integer from 5 MiB to 5 GiB (S3's part size limits)",
        ),
        max_concurrent_uploads=ck.integer(
            "s3.max_concurrent_uploads", table.get("max_concurrent_uploads", d.max_concurrent_uploads), 1, 64
        ),
        max_concurrent_parts=ck.integer(
            "s3.max_concurrent_parts", table.get("max_concurrent_parts", d.max_concurrent_parts), 1, 256
        ),
        shutdown_timeout_s=ck.number(
            "s3.shutdown_timeout_s",
            table.get("shutdown_timeout_s", d.shutdown_timeout_s),
            lambda x: 0 <= x <= 3600,
            "must be a number of seconds from 0 to 3600",
        ),
        fatal_retry_s=ck.number(
            "s3.fatal_retry_s",
            table.get("fatal_retry_s", d.fatal_retry_s),
            lambda x: 1 <= x <= 3600,
            "must be a number of seconds from 1 to 3600",
        ),
        request_timeout_s=ck.number(
            "s3.request_timeout_s",
            table.get("request_timeout_s", d.request_timeout_s),
            lambda x: 1 <= x <= 3600,
            "must be a number of seconds from 1 to 3600",
        ),
        uploader_nice=ck.integer("s3.uploader_nice", table.get("uploader_nice", d.uploader_nice), 0, 19),
        abort_unknown_uploads_after_s=ck.number(
            "s3.abort_unknown_uploads_after_s",
            table.get("abort_unknown_uploads_after_s", d.abort_unknown_uploads_after_s),
            lambda x: 0 <= x <= 30 * 86400,
            "must be a number of seconds from 0 to 2592000 (30 days)",
        ),
    )


def _data_capture(ck: _Checker, value: object) -> DataCaptureConfig:
    key = "DataCaptureConfig"
    table = ck.table(key, value, DataCaptureConfig.__struct_fields__)
    if table is None:
        return DataCaptureConfig(0, "", ())
    kms_key = table.get("KmsKeyId")
    header = table.get("CaptureContentTypeHeader")
    return DataCaptureConfig(
        InitialSamplingPercentage=ck.integer(
            f"{key}.InitialSamplingPercentage", table.get("InitialSamplingPercentage", _MISSING), 0, 100
        ),
        DestinationS3Uri=_destination(ck, f"{key}.DestinationS3Uri", table.get("DestinationS3Uri", _MISSING)),
        CaptureOptions=_capture_options(ck, f"{key}.CaptureOptions", table.get("CaptureOptions", _MISSING)),
        EnableCapture=ck.boolean(f"{key}.EnableCapture", table.get("EnableCapture", True)),
        KmsKeyId=None if kms_key is None else _kms_key(ck, f"{key}.KmsKeyId", kms_key),
        CaptureContentTypeHeader=None if header is None else _content_types(ck, header),
    )


def _kms_key(ck: _Checker, key: str, value: object) -> str:
    def ok(s: str) -> bool:
        return len(s) <= 2048 and _KMS_KEY_PATTERN.fullmatch(s) is not None

    rule = "must be a KMS key id, key ARN, alias name or alias ARN: at most 2048 of [a-zA-Z0-9:/_-]"
    return ck.string(key, value, ok, rule)


def _capture_options(ck: _Checker, key: str, value: object) -> tuple[CaptureOption, ...]:
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= 32:
        ck.bad(key, value, 'must be a list of 1 to 32 capture options such as {CaptureMode = "Input"}')
        return ()
    options = []
    for i, item in enumerate(value):
        table = ck.table(f"{key}[{i}]", item, ("CaptureMode",))
        if table is None:
            continue
        mode = table.get("CaptureMode", _MISSING)
        if isinstance(mode, str) and mode in CAPTURE_MODES:
            options.append(CaptureOption(CAPTURE_MODES[mode]))
        else:
            rule = "must be one of Input, Output, InputAndOutput (or the SDK's REQUEST, RESPONSE)"
            ck.bad(f"{key}[{i}].CaptureMode", mode, rule)
    return tuple(options)


def _content_types(ck: _Checker, value: object) -> CaptureContentTypeHeader | None:
    key = "DataCaptureConfig.CaptureContentTypeHeader"
    table = ck.table(key, value, CaptureContentTypeHeader.__struct_fields__)
    if table is None:
        return None
    return CaptureContentTypeHeader(
        CsvContentTypes=_type_list(ck, f"{key}.CsvContentTypes", table.get("CsvContentTypes")),
        JsonContentTypes=_type_list(ck, f"{key}.JsonContentTypes", table.get("JsonContentTypes")),
    )


def _type_list(ck: _Checker, key: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= 10:
        ck.bad(key, value, "must be a list of 1 to 10 content types")
        return None

    def ok(s: str) -> bool:
        return len(s) <= 256 and CONTENT_TYPE_PATTERN.fullmatch(s) is not None

    rule = "must be a media type such as text/csv: 1 to 256 letters, digits, hyphens, a '/' and dots after it"
    return tuple(ck.string(f"{key}[{i}]", item, ok, rule) for i, item in enumerate(value))


def _destination(ck: _Checker, key: str, value: object) -> str:
    text = ck.string(key, value, lambda s: s != "", "must be s3://bucket[/prefix] or a local directory")
    if not text:
        return ""
    result, rule = _stored_destination(text, ck.base_dir(key))
    if rule is None and len(result) > 512:
        rule = "must be at most 512 characters"
    if rule is not None:
        ck.bad(key, value, rule)
    return result


def _stored_destination(text: str, base_dir: str) -> tuple[str, str | None]:
    """The destination as stored, and what is wrong with it (None: nothing).

    `s3://bucket[/prefix]` is kept as given; a local directory, plain or `file:///`, becomes `file://` and
    an absolute, normalised path.
    """
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
    path = text[len("file://") :] if scheme else os.path.join(base_dir, text)
    if "\0" in path:
        return text, "must not contain a NUL character"
    return "file://" + os.path.normpath(path), None


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
