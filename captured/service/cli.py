"""`captured serve | check | status | read`: the command line, the only place that reads flags and files."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from captured import __version__
from captured.errors import ConfigError
from captured.reader import cli as read_cli
from captured.service.config import Config, load_config, render_toml
from captured.service.configfile import Overrides
from captured.wire import frames

if TYPE_CHECKING:
    from captured.service.status import Status

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
    read_cli.add_parser(sub)
    return parser


def _load(args: argparse.Namespace, *, check_host: bool = False) -> Config:
    overrides = Overrides(
        socket_path=args.socket,
        spool_dir=args.spool_dir,
        destination=args.destination,
        endpoint_name=args.endpoint_name,
        variant_name=args.variant_name,
        sampling_percentage=args.sampling_percentage,
    )
    return load_config(args.config, args.data_capture_config, overrides, check_host=check_host)


def _report(err: ConfigError) -> int:
    for problem in err.problems:
        print(f"captured: invalid configuration: {problem}", file=sys.stderr)
    return EXIT_INVALID


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # what would stop the start (a spool that is a file, an unknown group) said as `check` says it
        cfg = _load(args, check_host=True)
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
    """Validate as `serve` does, and also look at this host for what would stop `serve` at start
    (an unknown socket group, a spool directory that is no writable directory, ...); nothing is
    created. Every problem is one line, exit 2; else the effective configuration, exit 0."""
    try:
        cfg = _load(args, check_host=True)
    except ConfigError as err:
        return _report(err)
    sys.stdout.write(render_toml(cfg))
    print("captured: configuration OK", file=sys.stderr)
    return 0


def fetch_status(socket_path: str, timeout: float = 5.0) -> Status:
    from captured.service import status  # the daemon's status types: only for this command

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
                    return status.decode(payload)
                if kind == frames.Kind.ERROR:
                    raise ConnectionError(bytes(payload).decode("utf-8", "replace"))


def query_status(socket_path: str, timeout: float = 5.0) -> dict[str, Any]:
    """The status as the JSON document `captured status --json` prints (plain dicts)."""
    doc: dict[str, Any] = msgspec.to_builtins(fetch_status(socket_path, timeout))
    return doc


def cmd_status(args: argparse.Namespace) -> int:
    from captured.service import status

    path = args.socket
    if path is None:
        try:
            path = load_config(args.config).socket_path
        except ConfigError as err:
            return _report(err)
    try:
        st = fetch_status(path, args.timeout)
    except (OSError, msgspec.ValidationError) as exc:
        print(f"captured: no daemon answering on {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(status.to_json(st))
    else:
        sys.stdout.write(status.format_status(st))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"serve": cmd_serve, "check": cmd_check, "status": cmd_status, "read": read_cli.cmd_read}[
        args.command
    ]
    return handler(args)
