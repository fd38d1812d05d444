"""The daemon's own settings: the `[spool]`, `[ingest]`, `[watermark]`, `[delivery]`, `[s3]` and
`[metrics]` tables.

Each setting is declared once, on its field: type, default, range (`msgspec.Meta` constraints),
description, and in `Meta.extra` what Meta cannot say (see `configcheck`). Validation, the error
messages and the README's configuration table all come from these declarations.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from captured.service import configrules as rules
from captured.wire.rules import MAX_BODY_BYTES

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
DAY_S = 86400

#: One record carrying a maximum-size request and response plus room for metadata.
MIN_FRAME_BYTES = 2 * MAX_BODY_BYTES + 64 * KIB
MAX_FRAME_BYTES = 256 * MIB
_Id = Annotated[int, Meta(ge=0, le=2**32 - 1)]


class SpoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_file_age_s: Annotated[
        float,
        Meta(
            gt=0,
            le=3600,
            description="a file is sealed at least this often (SageMaker writes about one a minute)",
        ),
    ] = 60.0
    max_file_bytes: Annotated[
        int,
        Meta(
            ge=1024,
            le=5 * GIB,
            description="a file is sealed before a write would take it past this size (a single line larger"
            " than this gets a file of its own); each file is named after its own first record, also when one"
            ' write is split across files. With `delivery.compression = "zstd"` it bounds the delivered'
            " (compressed) object: a plain file may grow by the ratio recent files compressed at",
        ),
    ] = 64 * MIB
    fsync_interval_s: Annotated[
        float,
        Meta(
            ge=0,
            le=3600,
            description="open spool files are flushed to the disk (fdatasync, on a background thread) this"
            " often; every file is flushed before it is sealed. A power loss can cost the records written"
            " since the last flush; a crash of the daemon alone costs nothing.",
            extra={"notes": {"ge": "only when a file is sealed"}},
        ),
    ] = 1.0
    max_open_files: Annotated[
        int,
        Meta(
            ge=1,
            le=4096,
            description="spool files open at once over all variants and hours; opening one more first seals"
            " the least recently written (counted in status `spool.sealed_for_room`). Disk is reserved ahead"
            " only for a file past its first 64 KiB.",
        ),
    ] = 64


class IngestConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_frame_bytes: Annotated[
        int,
        Meta(
            ge=MIN_FRAME_BYTES,
            le=MAX_FRAME_BYTES,
            description="the largest frame the daemon accepts; a larger header closes the connection",
            extra={
                "notes": {
                    "ge": "two 6 MiB bodies plus 64 KiB, so that one record with a maximum-size request and"
                    " response fits",
                    "le": "256 MiB",
                }
            },
        ),
    ] = 16 * MIB
    drain_timeout_s: Annotated[
        float,
        Meta(ge=0, le=600, description="how long shutdown keeps reading what connected clients already sent"),
    ] = 2.0
    socket_mode: Annotated[
        int,
        Meta(
            description="permission bits of the socket file the daemon binds (TOML octal `0o660`, or a"
            ' string `"0660"`)',
            extra={"parse": rules.socket_mode, "rule": 'must be permission bits such as 0o660 or "0660"'},
        ),
    ] = 0o660
    socket_group: Annotated[
        str | None,
        Meta(
            description="group of the socket file the daemon binds; `captured check` and the start refuse a"
            " group this host does not have",
            extra={
                "parse": rules.socket_group,
                "rule": "must be a group name or a gid",
                "default": "the daemon's group",
            },
        ),
    ] = None
    allowed_uids: Annotated[
        tuple[_Id, ...],
        Meta(
            max_length=1024,
            description="when this list or `allowed_gids` is non-empty, a connecting process must have a"
            " listed uid, or a listed group among its primary and supplementary groups (SO_PEERCRED and"
            " SO_PEERGROUPS: the kernel says, no /proc is read, so the shipped unit keeps"
            " `ProtectProc=invisible`; /proc only on kernels older than 4.13); root and the daemon's own user"
            " always pass. Others are refused (`peer_refused`).",
            extra={"items": "numeric ids"},
        ),
    ] = ()
    allowed_gids: Annotated[
        tuple[_Id, ...],
        Meta(
            max_length=1024,
            description="the groups `allowed_uids` speaks of; `[]` with an empty `allowed_uids`: no check",
            extra={"items": "numeric ids"},
        ),
    ] = ()
    max_connections: Annotated[
        int,
        Meta(
            ge=1,
            le=65536,
            description="connections served at once (`captured status` counts as one while it runs); past"
            " it, the connection idle the longest (for a second at least) is closed to make room"
            " (`idle_evicted`), else the newcomer is refused (`too_many_connections`). The daemon raises its"
            " open-files limit to fit.",
        ),
    ] = 1024
    max_buffered_bytes: Annotated[
        int,
        Meta(
            ge=MIN_FRAME_BYTES,
            le=16 * GIB,
            description="unfinished frames all connections together may hold (taken as `max_frame_bytes` when"
            " smaller); the connection that crosses it is closed (`memory_limit`)",
        ),
    ] = 64 * MIB
    frame_timeout_s: Annotated[
        float,
        Meta(
            ge=0.1,
            le=3600,
            description="a frame must arrive whole within this long of its first byte, or the connection is"
            " closed (`stalled_frame`): a client stalled mid-frame, or trickling bytes, holds a buffer",
        ),
    ] = 30.0
    max_future_s: Annotated[
        float,
        Meta(
            ge=0,
            le=366 * DAY_S,
            description="a record whose `inferenceTime` is further ahead of the daemon's clock is refused one"
            " by one (`future_time`); any past time is taken. Each distinct hour would open a spool file.",
            extra={"notes": {"le": "a year"}},
        ),
    ] = 300.0


class WatermarkConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Capture stops while the spool's filesystem is this full, and starts again below `low`."""

    high_percent: Annotated[
        float,
        Meta(
            gt=0,
            le=100,
            description="capture stops when the spool's filesystem is this full (AWS advises 75)",
        ),
    ] = 75.0
    low_percent: Annotated[
        float,
        Meta(
            ge=0,
            lt=100,
            description="capture starts again once usage is down to this; below `high_percent`",
            extra={
                "check": rules.below_high_percent,
                "rule": "must be a percentage from 0 to below high_percent",
            },
        ),
    ] = 70.0
    min_free_bytes: Annotated[
        int,
        Meta(
            ge=0,
            le=2**62,
            description="capture also stops below this many free bytes (0: off), and starts again with this"
            " plus (high - low) % of the filesystem free",
        ),
    ] = 0


class DeliveryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    compression: Annotated[
        str,
        Meta(
            pattern=r"\A(?:none|zstd)\Z",
            description="`none` (plain `.jsonl`, what Model Monitor reads) or `zstd`: every file is"
            " delivered as `.jsonl.zst`, one zstd frame of exactly the plain file's lines (`zstd -d`,"
            " DuckDB's `read_json` read it), compressed on a worker thread at delivery. With `zstd`,"
            " `spool.max_file_bytes` bounds the compressed size (see Behaviour)",
            extra={"rule": "must be none or zstd"},
        ),
    ] = "none"
    compression_level: Annotated[
        int, Meta(ge=1, le=19, description="zstd's level: higher is smaller and slower (see bench/README.md)")
    ] = 3


class S3Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Delivery to `s3://` destinations; credentials come from the standard AWS chain."""

    endpoint_url: (
        Annotated[
            str,
            Meta(
                max_length=2048,
                pattern=r"\Ahttps?://[^ ]*\Z",
                description="an S3-compatible store (MinIO, Ceph, a local test server)",
                extra={"rule": "must be an http:// or https:// URL", "default": "none (AWS S3)"},
            ),
        ]
        | None
    ) = None
    region: (
        Annotated[
            str,
            Meta(
                pattern=r"\A[a-z0-9-]{1,32}\Z",
                description="the AWS region of the bucket",
                extra={
                    "rule": "must be an AWS region name such as us-east-1",
                    "default": "from the AWS configuration chain (`AWS_REGION`, `~/.aws/config`, instance"
                    " metadata)",
                },
            ),
        ]
        | None
    ) = None
    multipart_threshold_bytes: Annotated[
        int,
        Meta(
            ge=5 * MIB,
            le=5 * GIB,
            description="files at or above go up as multipart uploads, smaller ones with PutObject",
            extra={"binary": True, "notes": {"ge": "S3's smallest part", "le": "the largest PutObject"}},
        ),
    ] = 16 * MIB
    part_size_bytes: Annotated[
        int,
        Meta(
            ge=5 * MIB,
            le=5 * GIB,
            description="raised when a file would need more than 10,000 parts",
            extra={"binary": True, "notes": {"le": "S3's part size limits"}},
        ),
    ] = 8 * MIB
    max_concurrent_uploads: Annotated[int, Meta(ge=1, le=64, description="files uploading at once")] = 4
    max_concurrent_parts: Annotated[
        int, Meta(ge=1, le=256, description="parts in flight at once, across all uploads")
    ] = 8
    shutdown_timeout_s: Annotated[
        float,
        Meta(
            ge=0,
            le=3600,
            description="on SIGTERM, how long sealed files keep being delivered (any destination); the rest"
            " waits for the next start",
        ),
    ] = 30.0
    fatal_retry_s: Annotated[
        float,
        Meta(
            ge=1,
            le=3600,
            description="retry pace after a failure no retry mends by itself (access denied, no such bucket,"
            " bad KMS key), so a fixed permission resumes delivery without a restart; retryable failures"
            " (network, timeouts, throttling, 5xx) back off exponentially with jitter, from 0.5 s to 30 s,"
            " without a time limit",
        ),
    ] = 60.0
    request_timeout_s: Annotated[
        float,
        Meta(
            ge=1,
            le=3600,
            description="the longest one S3 request may take before it counts as a (retryable) timeout (a"
            " stalled connection otherwise hangs an upload)",
        ),
    ] = 120.0
    uploader_nice: Annotated[
        int,
        Meta(
            ge=0,
            le=19,
            description="the `nice` increment of the uploader process, so that on a busy host inference and"
            " capture get the CPU first; 19 is the most yielding (uploads may then lag far behind a saturated"
            " host)",
        ),
    ] = 10
    abort_unknown_uploads_after_s: Annotated[
        float,
        Meta(
            ge=0,
            le=30 * DAY_S,
            description="at start, open multipart uploads of capture files under this daemon's `{endpoint}/`"
            " prefix that no spool file explains are aborted once S3 says they are this old (younger ones may"
            " be another host's, in flight to the same prefix); 0 aborts them all, for a destination only"
            " this host writes",
            extra={"notes": {"le": "30 days"}},
        ),
    ] = 3600.0


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    address: Annotated[
        str | None,
        Meta(
            description="where `GET /metrics` answers in Prometheus' text format: `127.0.0.1:9464`-style"
            " `host:port` (port 0: any free port, shown in status) or an absolute Unix socket path in a"
            " directory the daemon may write (under systemd: its StateDirectory)",
            extra={
                "parse": rules.metrics_address,
                "rule": "must be host:port (e.g. 127.0.0.1:9464) or an absolute socket path",
                "default": "none (off)",
            },
        ),
    ] = None
