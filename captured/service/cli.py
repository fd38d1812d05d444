"""`captured serve | check | status`: the command line, the only place that reads flags and files."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from typing import Any

from captured import __version__
from captured.service.config import Config, ConfigError, Overrides, load_config, render_toml
from captured.wire import frames

EXIT_INVALID = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--data-capture-config",
        metavar="FILE.json",
        help="SageMaker DataCaptureConfig JSON (bare, or inside a CreateEndpointConfig request or "
        "DescribeEndpointConfig response); replaces the TOML table as a whole",
    )
    p.add_argument("--socket", metavar="PATH", help="capture socket path")
    p.add_argument("--spool-dir", metavar="DIR", help="spool directory")
    p.add_argument("--destination", metavar="URI", help="DestinationS3Uri: s3://bucket/prefix or file:///dir")
    p.add_argument("--endpoint-name", metavar="NAME")
    p.add_argument("--variant-name", metavar="NAME", help="variant for captures that name none")
    p.add_argument("--sampling-percentage", metavar="N", type=int, help="InitialSamplingPercentage, 0..100")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captured", description="SageMaker-compatible Data Capture daemon")
    parser.add_argument("--version", action="version", version=f"captured {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the capture daemon")
    _config_args(serve)
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    check = sub.add_parser("check", help="validate the configuration and print the effective one")
    _config_args(check)
    status = sub.add_parser("status", help="ask the running daemon what it is doing")
    status.add_argument("--config", metavar="FILE", help="find the socket from this configuration")
    status.add_argument("--socket", metavar="PATH", help="capture socket path")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides = Overrides(
        socket_path=args.socket,
        spool_dir=args.spool_dir,
        destination=args.destination,
        endpoint_name=args.endpoint_name,
        variant_name=args.variant_name,
        sampling_percentage=args.sampling_percentage,
    )
    return load_config(args.config, args.data_capture_config, overrides)


def _report(err: ConfigError) -> int:
    for problem in err.problems:
        print(f"captured: invalid configuration: {problem}", file=sys.stderr)
    return EXIT_INVALID


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as err:
        return _report(err)
    from captured.service import daemon, logs

    logs.configure(args.log_level)

    def reload() -> Config:  # SIGHUP: the same files and flags, read again
        try:
            return _load(args)
        except ConfigError as err:
            for problem in err.problems:
                logging.getLogger("captured.daemon").error("reload refused: %s", problem)
            raise

    return daemon.serve(cfg, reload)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
    except ConfigError as err:
        return _report(err)
    sys.stdout.write(render_toml(cfg))
    print("captured: configuration OK", file=sys.stderr)
    return 0


def query_status(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """One STATUS exchange over the capture socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(frames.encode_frame(frames.Kind.STATUS, ()))
        reader = frames.FrameReader()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the daemon closed the connection without answering")
            for kind, payload in reader.feed(data):
                if kind == frames.Kind.STATUS_REPLY:
                    doc: dict[str, Any] = frames.any_decoder.decode(payload)
                    return doc
                if kind == frames.Kind.ERROR:
                    raise ConnectionError(bytes(payload).decode("utf-8", "replace"))


def _format_status(doc: dict[str, Any]) -> str:
    """`captured status` for people: one line per aspect, the JSON (`--json`) has it all."""
    c = doc["counters"]
    d = doc.get("delivery", {})
    w = doc.get("watermark", {})
    ing = doc["ingest"]

    def pairs(items: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(items.items())) or "none"

    reason = f" ({doc['CaptureStatusReason']})" if doc.get("CaptureStatusReason") else ""
    disk = "unknown"
    if w.get("used_percent") is not None:
        disk = (
            f"{w['used_percent']:.1f}% used, {w['free_bytes'] / 1e9:.1f} GB free "
            f"(stops at {w['high_percent']:g}%, starts again at {w['low_percent']:g}%"
            + (f", or below {w['min_free_bytes']} bytes free" if w.get("min_free_bytes") else "")
            + f"; stopped {w.get('stops', 0)} time(s))"
        )
    lines = [
        f"endpoint            {doc['EndpointName']} (default variant {doc['VariantName']})",
        f"CaptureStatus       {doc['CaptureStatus']}{reason}",
        f"EnableCapture       {str(doc['EnableCapture']).lower()}",
        f"sampling            {doc['CurrentSamplingPercentage']}%",
        f"destination         {doc['DestinationS3Uri']}"
        + (f" (SSE-KMS {doc['KmsKeyId']})" if doc.get("KmsKeyId") else ""),
        f"records             received {c['received']}, written {c['written']}, "
        f"dropped: {pairs(c['dropped'])}; resent (skipped) {c.get('resent', 0)}",
        f"files               open {doc['spool']['open_files']}, sealed {doc['spool']['files_sealed']}, "
        f"delivered {d.get('files_delivered', 0)}, waiting {d.get('files_waiting', 0)} "
        f"({d.get('bytes_waiting', 0)} bytes, oldest {d.get('oldest_waiting_s', 0):.0f}s)",
        f"delivery            {d.get('bytes_delivered', 0)} bytes delivered, {d.get('retries', 0)} retries, "
        f"failures: {pairs(d.get('failures', {}))}",
        f"disk                {disk}",
        f"clients             {ing['connections']} connected, {ing['connections_total']} so far, "
        f"closed by the daemon: {pairs(ing.get('protocol_errors', {}))}",
        f"uptime              {doc['uptime_s']:.0f}s, version {doc['version']}, pid {doc['pid']}"
        + (f", metrics on {doc['metrics']}" if doc.get("metrics") else ""),
    ]
    return "\n".join(lines) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    path = args.socket
    if path is None:
        try:
            path = load_config(args.config).socket_path
        except ConfigError as err:
            return _report(err)
    try:
        doc = query_status(path, args.timeout)
    except OSError as exc:
        print(f"captured: no daemon answering on {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        sys.stdout.write(_format_status(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"serve": cmd_serve, "check": cmd_check, "status": cmd_status}[args.command]
    return handler(args)
