"""Several endpoints, one delivery stage: each sealed file to its endpoint's destination.

A sealed file's object key starts with its endpoint (`{endpoint}/{variant}/yyyy/...`, see
`daemon.spool.object_key`), so `Router`, itself a `queue.Destination`, hands each file to the
destination of that endpoint: a `LocalDestination` for `file://`, or a target of the one
`S3Uploader` process for `s3://` (every S3 destination and KMS key goes through that process).

A reload may add endpoints (`route`); an endpoint removed by a reload keeps its destination in the
router, so the files it sealed are still delivered where its configuration said. A file whose
endpoint has no destination at all (a bug: recovery takes only configured endpoints' files)
fails as `no_destination` and waits in the spool.
"""

from __future__ import annotations

from collections.abc import Callable

from captured.delivery.local import LocalDestination
from captured.delivery.queue import Destination
from captured.delivery.uploader import S3Uploader
from captured.errors import DeliveryError
from captured.service.settings import S3Config


class Router:
    """A `Destination` delivering each file to its endpoint's destination."""

    uri = "(one destination per endpoint)"

    def __init__(self, s3: S3Config) -> None:
        self.s3 = s3
        self.routes: dict[str, Destination] = {}
        #: The S3 uploader process, made with the first `s3://` destination.
        self.uploader: S3Uploader | None = None
        self._started = False

    @property
    def has_s3(self) -> bool:
        return self.uploader is not None

    def route(self, endpoint: str, uri: str, kms_key_id: str | None) -> None:
        """Deliver `endpoint`'s files to `uri` (with SSE-KMS `kms_key_id` on S3)."""
        current = self.routes.get(endpoint)
        if current is not None and current.uri == uri and getattr(current, "kms_key_id", None) == kms_key_id:
            return
        if not uri.startswith("s3://"):
            self.routes[endpoint] = LocalDestination(uri)
        elif self.uploader is None:
            self.uploader = S3Uploader(uri, self.s3, kms_key_id=kms_key_id)
            self.routes[endpoint] = self.uploader
        else:
            self.routes[endpoint] = self.uploader.target(uri, kms_key_id)

    def destination_of(self, key: str) -> Destination:
        endpoint = key.partition("/")[0]
        dest = self.routes.get(endpoint)
        if dest is None:
            raise DeliveryError(
                cause="no_destination",
                retryable=False,
                message=f"no destination is configured for endpoint {endpoint!r}",
            )
        return dest

    async def start(self) -> None:
        """Start the S3 uploader process (if any destination is S3): a destination that cannot
        work stops the start-up."""
        if self.uploader is not None:
            await self.uploader.start()

    async def put(self, path: str, key: str, *, retry: bool = False) -> None:
        await self.destination_of(key).put(path, key, retry=retry)

    async def tidy(self, own_prefix: str, waiting: Callable[[], set[str]]) -> None:
        """Tidy under `own_prefix` (`{endpoint}/`) at that endpoint's destination."""
        dest = self.routes.get(own_prefix.partition("/")[0])
        if dest is not None:
            await dest.tidy(own_prefix, waiting)

    async def close(self) -> None:
        if self.uploader is not None:
            await self.uploader.close()
