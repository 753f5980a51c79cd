"""Moving bytes to and from engines: one pooled HTTP client per process.

Streams are passed through chunk by chunk: the upstream stream is opened before the
response starts (so a connect error or a 5xx can still fail over) and closed when
the generator ends, including when the client goes away (the WSGI server closes the
generator, which closes the upstream request).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx

# Engines may take long for a first token (a queue, a big prompt): generous read
# timeout; connecting must be quick, or we fail over.
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Upstream:
    response: httpx.Response

    @property
    def status_code(self) -> int:
        return self.response.status_code


class Transport:
    def __init__(self, read_timeout_s: float = 600.0, max_connections: int = 512) -> None:
        self.client = httpx.Client(
            timeout=httpx.Timeout(
                connect=CONNECT_TIMEOUT_S, read=read_timeout_s, write=60.0, pool=CONNECT_TIMEOUT_S
            ),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            trust_env=False,
        )

    def open(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Upstream:
        """Send the request and read the status and headers (not the body)."""
        req = self.client.build_request("POST", base_url + path, content=body, headers=headers)
        return Upstream(self.client.send(req, stream=True))

    @staticmethod
    def chunks(up: Upstream) -> Iterator[bytes]:
        """The body as it arrives; always closes the upstream response."""
        try:
            yield from up.response.iter_raw()
        finally:
            up.response.close()

    @staticmethod
    def read(up: Upstream) -> bytes:
        try:
            return up.response.read()
        finally:
            up.response.close()

    def close(self) -> None:
        self.client.close()
