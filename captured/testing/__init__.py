"""Helpers for testing with a real captured daemon and a real S3-compatible server.

captured's own tests and benchmarks use them, and so can an application's tests:

* `captured.testing.daemon`: `DaemonProcess` (a `captured serve` subprocess with its own
  socket, spool and `file://` destination), `wait_for`, `read_error`;
* `captured.testing.s3`: `MotoServer` (moto's S3 server in a child process on loopback),
  `S3Sandbox`, `client_config`, `unique_bucket`, dummy credentials;
* `captured.testing.proxy`: `FaultProxy` (a TCP proxy that passes, refuses or stalls) and
  `S3FaultProxy` (an HTTP proxy that fails, cuts or resets chosen S3 operations);
* `captured.testing.s3sink`: `SinkServer`, a minimal in-memory S3 server (a cheap stand-in for
  a remote S3 in benchmarks);
* `captured.testing.data`: seeded request/response pairs and a `DataCaptureConfig` builder.

Import from the module. Every module imports with captured's runtime dependencies alone;
`MotoServer` needs `moto[server]` and `boto3_client` needs `boto3` (both in the `test`
extra), imported only when used.
"""
