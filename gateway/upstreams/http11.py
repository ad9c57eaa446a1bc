"""The upstream HTTP client: pooled keep-alive HTTP/1.1 connections on asyncio protocols,
responses parsed by httptools (llhttp, the parser of Node.js and uvicorn).

Why not httpx or aiohttp: a loopback call through httpx over aiohttp's pool cost the
gateway about as much CPU as the rest of its pipeline together (request and response
models built per call, aiohttp's tracing, timers and stream readers). An upstream call
here is one write of the request and one parse of the answer into a
:class:`Http11Response`; ``make bench`` reports the difference. What the gateway needs
of a client, it keeps: a bounded pool per origin, connect and first-byte timeouts,
TLS, streamed bodies with back-pressure, gzip/deflate answers, and one retry of a
request that met a keep-alive connection the server had just closed. Failures raise
httpx's exceptions, so the providers map them to upstream errors as before. Proxies
are not spoken: :func:`~gateway.upstreams.registry.make_transport` uses httpx's own
transport when the environment names a proxy for an upstream.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import httptools
import httpx

from gateway.upstreams.sending import note_sent, note_waiting

__all__ = ["Http11Response", "Http11Transport"]

_PAUSE_BYTES = 1 << 20
"""A streamed answer's unread bytes past which the socket stops being read (resumed below a quarter)."""


class _StaleConnection(Exception):
    """A kept-alive connection closed before any byte of the answer: the request may be sent again."""


class BodyFailed(httpx.TransportError):
    """The answer's body failed after its status and headers came (the connection closed mid-body,
    a coding that does not decode); ``status_code`` is the status it came with (t70: logged as
    ``upstream_status`` null, as if nothing had answered)."""

    def __init__(self, status_code: int, cause: httpx.HTTPError) -> None:
        super().__init__(str(cause))
        self.status_code = status_code


class Http11Response:
    """An upstream's answer: status and headers at once, the body as it arrives.

    The part of ``httpx.Response`` the providers use: ``status_code``, ``headers`` (names in
    lower case, a repeated header's values joined by ``", "``), ``aread``/``content``,
    ``aiter_bytes`` and ``aclose``.
    """

    __slots__ = (
        "_chunks",
        "_connection",
        "_content",
        "_decoder",
        "_done",
        "_error",
        "_unread",
        "_waiter",
        "headers",
        "status_code",
    )

    def __init__(self, connection: _Connection, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.headers = headers
        self._connection: _Connection | None = connection
        self._chunks: deque[bytes] = deque()
        self._unread = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._content: bytes | None = None
        self._decoder: Any = None
        encoding = headers.get("content-encoding")
        if encoding and (coding := encoding.strip().lower()) != "identity":
            self._decoder = _decoder_for(coding)
            if self._decoder is None:  # asked for identity; a proxy may still encode
                self._error = httpx.DecodingError(
                    f"the answer is encoded as {encoding!r}, which the gateway does not read"
                )

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise httpx.ResponseNotRead()
        return self._content

    async def aread(self) -> bytes:
        if self._content is None:
            self._content = b"".join([chunk async for chunk in self.aiter_bytes()])
        return self._content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._unread -= len(chunk)
                connection = self._connection
                if connection is not None and connection.paused and self._unread < _PAUSE_BYTES // 4:
                    connection.resume()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self._done:
                if self._decoder is not None:
                    tail = self._decoder.flush()
                    self._decoder = None
                    if tail:
                        yield tail
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    async def aclose(self) -> None:
        """Give the connection back when the answer was read to its end; otherwise close it."""
        connection, self._connection = self._connection, None
        if connection is not None and not self._done:
            self._error = self._error or httpx.StreamClosed()
            connection.close()

    # -- fed by the connection ------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                self._fail(httpx.DecodingError(f"cannot decode the answer: {exc}"))
                return
            if not data:
                return
        self._chunks.append(data)
        self._unread += len(data)
        if self._unread > _PAUSE_BYTES and self._connection is not None:
            self._connection.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._connection = None
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    __slots__ = (
        "_began",
        "_header_list",
        "_headers_waiter",
        "_parser",
        "_until_close",
        "closed",
        "idle_since",
        "paused",
        "pool",
        "response",
        "transport",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: Http11Response | None = None
        self._headers_waiter: asyncio.Future[Http11Response] | None = None
        self._header_list: list[tuple[bytes, bytes]] = []
        self._began = False
        self._until_close = False
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        if self._headers_waiter is None and self.response is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lose(httpx.RemoteProtocolError(f"malformed answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and self._until_close and exc is None:
            self.response = None
            response._finish()  # the body ran to the end of the connection, as the server said it would
        elif not self._began and self._headers_waiter is not None:
            self._lose(_StaleConnection())
        else:
            self._lose(httpx.RemoteProtocolError("server disconnected before the answer was complete"))
        self.pool.discard(self)

    # -- httptools callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self._headers_waiter is None and self.response is None:
            self.close()  # an answer to no request (bytes after the last one): not to be reused
        self._began = True
        self._header_list = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_list.append((name, value))

    def on_headers_complete(self) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in self._header_list:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (no body): the real one follows
            return
        self._until_close = "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")
        self.response = response = Http11Response(self, status, headers)
        waiter, self._headers_waiter = self._headers_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None:
            return  # the end of an interim answer
        self.response, self._began = None, False
        response._finish()
        if self._parser.should_keep_alive() and not self._until_close and not self.closed:
            # The answer is whole (what its reader has not taken stays with it): a connection
            # paused for it would go back to the pool deaf, and the next request would hang.
            self.resume()
            self.pool.release(self)
        else:
            self.close()

    # -- used by the pool and the response --------------------------------------

    def send(self, data: Iterable[bytes]) -> asyncio.Future[Http11Response]:
        assert self.transport is not None
        waiter: asyncio.Future[Http11Response] = asyncio.get_running_loop().create_future()
        self._headers_waiter = waiter
        self._began = False
        self.transport.writelines(data)
        return waiter

    def usable(self, now: float, expiry_s: float) -> bool:
        transport = self.transport
        return (
            not self.closed
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < expiry_s
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _lose(self, error: BaseException) -> None:
        waiter, self._headers_waiter = self._headers_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        response, self.response = self.response, None
        if response is not None:
            response._fail(error)


class _Pool:
    """The connections to one origin: at most ``limit``, idle ones reused newest first."""

    __slots__ = ("_count", "_expiry_s", "_host", "_idle", "_limit", "_port", "_ssl", "_waiters")

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, limit: int, expiry_s: float) -> None:
        self._host, self._port, self._ssl = host, port, ssl_context
        self._limit, self._expiry_s = limit, expiry_s
        self._idle: list[_Connection] = []
        self._count = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()

    async def acquire(self, timeout_s: float) -> tuple[_Connection, bool]:
        """A connection and whether it was kept alive from an earlier request."""
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(now, self._expiry_s):
                return connection, True
            connection.close()
        if self._count >= self._limit:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout_s):
                    handed = await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled() and (given := waiter.result()) is not None:
                    self.release(given)  # handed over just as this request gave up
                if isinstance(exc, TimeoutError):
                    message = f"no free connection to {self._host}:{self._port} within {timeout_s:g}s"
                    raise httpx.PoolTimeout(message) from None
                raise
            if handed is not None:
                return handed, True
        self._count += 1  # a slot: reserved before connecting, so waiters count it
        try:
            return await self._connect(timeout_s), False
        except BaseException:
            self._count -= 1
            self._wake_one(None)
            raise

    async def _connect(self, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"cannot connect to {self._host}:{self._port} within {timeout_s:g}s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return connection

    def release(self, connection: _Connection) -> None:
        """A connection whose answer was read: to the next waiter, or idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def discard(self, connection: _Connection) -> None:
        """A connection that closed (called once, from ``connection_lost``)."""
        if connection in self._idle:
            self._idle.remove(connection)
        self._count -= 1
        self._wake_one(None)

    def _wake_one(self, handed: _Connection | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(handed)
                return

    def close(self) -> None:
        """Close the idle connections: at shutdown, and when one turned out closed by the server
        (it was the newest; those idle longer are likely closed too, as servers time them out alike)."""
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class Http11Transport(httpx.AsyncBaseTransport):
    """One pool per origin. :meth:`send` is the providers' fast path; httpx callers go
    through :meth:`handle_async_request`."""

    def __init__(self, *, max_connections: int, keepalive_expiry: float = 60.0) -> None:
        self._limit = max_connections
        self._expiry_s = keepalive_expiry
        self._pools: dict[tuple[bytes, bytes, int], _Pool] = {}
        self._ssl: ssl.SSLContext | None = None

    async def send(
        self,
        method: bytes,
        url: httpx.URL,
        headers: Iterable[tuple[str, str]],
        content: bytes | None,
        *,
        connect_timeout_s: float,
        first_byte_timeout_s: float,
        stream: bool,
        total_timeout_s: float | None = None,
    ) -> Http11Response:
        """Send one request; return at the answer's headers (``stream``) or once its body is read.

        ``total_timeout_s`` bounds all of that (TimeoutError), with one timer: a caller's own
        ``asyncio.timeout`` around the call cost more than the rest of the call's bookkeeping.
        """
        loop = asyncio.get_running_loop()
        deadline = None if total_timeout_s is None else loop.time() + total_timeout_s
        pool = self._pool(url)
        head = _head(method, url, headers, content)
        data = (head,) if not content else (head, content)
        note_waiting()
        for attempt in (1, 2):
            left = _left(deadline, loop)
            connection, kept_alive = await pool.acquire(
                connect_timeout_s if left is None else min(connect_timeout_s, left)
            )
            note_sent()  # written at once (_answer): what follows is the upstream's to bill
            left = _left(deadline, loop)
            try:
                response = await _answer(connection, data, first_byte_timeout_s, left)
            except _StaleConnection:
                if kept_alive and attempt == 1:  # the server closed it as it sat idle: nothing was answered
                    pool.close()  # so the request goes again on a new connection, not another stale one
                    continue
                raise httpx.RemoteProtocolError("server disconnected without sending an answer") from None
            except BaseException:
                connection.close()
                raise
            if not stream and response._content is None:
                try:
                    if response._done or deadline is None:
                        await response.aread()
                    else:
                        async with asyncio.timeout_at(deadline):
                            await response.aread()
                except httpx.HTTPError as exc:
                    await response.aclose()
                    raise BodyFailed(response.status_code, exc) from exc
                except BaseException:
                    await response.aclose()
                    raise
            return response
        raise AssertionError("unreachable")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        response = await self.send(
            request.method.encode(),
            request.url,
            [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in request.headers.raw
                if name.lower() not in _OWN
            ],
            await request.aread(),
            connect_timeout_s=timeouts.get("connect") or 30.0,
            first_byte_timeout_s=timeouts.get("read") or 300.0,
            stream=True,
        )
        return httpx.Response(
            response.status_code,
            headers=list(response.headers.items()),
            stream=_ByteStream(response),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _pool(self, url: httpx.URL) -> _Pool:
        key = (url.raw_scheme, url.raw_host, url.port or 0)
        pool = self._pools.get(key)
        if pool is None:
            secure = url.scheme == "https"
            if secure and self._ssl is None:
                self._ssl = _ssl_context()
            port = url.port or (443 if secure else 80)
            host = url.host
            pool = self._pools[key] = _Pool(host, port, self._ssl if secure else None, self._limit, self._expiry_s)
        return pool


async def _answer(
    connection: _Connection, data: tuple[bytes, ...], first_byte_s: float, total_left_s: float | None
) -> Http11Response:
    waiter = connection.send(data)
    error: BaseException
    if total_left_s is not None and total_left_s < first_byte_s:
        wait_s, error = total_left_s, TimeoutError()
    else:
        wait_s, error = first_byte_s, httpx.ReadTimeout(f"no answer within {first_byte_s:g}s")
    timer = asyncio.get_running_loop().call_later(wait_s, _time_out, connection, waiter, error)
    try:
        return await waiter
    finally:
        timer.cancel()


def _time_out(connection: _Connection, waiter: asyncio.Future[Http11Response], error: BaseException) -> None:
    if not waiter.done():
        waiter.set_exception(error)
        connection.close()


def _left(deadline: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    """Seconds to ``deadline``; TimeoutError when it has passed."""
    if deadline is None:
        return None
    left = deadline - loop.time()
    if left <= 0:
        raise TimeoutError
    return left


_OWN = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
"""Headers the client writes itself."""


def _decoder_for(encoding: str) -> Any:
    """A decompressor for a content coding (lower case); None for one the gateway does not read."""
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    return _Deflate() if encoding == "deflate" else None


class _Deflate:
    """deflate: zlib-wrapped as the standard says, or raw as some servers send; the first two bytes tell."""

    __slots__ = ("_head", "_inner")

    def __init__(self) -> None:
        self._head = b""
        self._inner: Any = None

    def decompress(self, data: bytes) -> bytes:
        if self._inner is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return bytes(self._inner.decompress(data))

    def flush(self) -> bytes:
        return bytes(self._inner.flush()) if self._inner is not None else b""


def _head(method: bytes, url: httpx.URL, headers: Iterable[tuple[str, str]], content: bytes | None) -> bytes:
    # identity: with no accept-encoding any coding is acceptable (RFC 9110 12.5.3), a proxy's br included
    lines = [method, b" ", url.raw_path, b" HTTP/1.1\r\nhost: ", url.netloc, b"\r\naccept-encoding: identity\r\n"]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise httpx.LocalProtocolError(f"header {name!r} holds a character HTTP forbids there")
        lines += (
            name.encode("latin-1"),
            b": ",
            value.encode("latin-1") if value.isascii() else value.encode(),
            b"\r\n",
        )
    if content is not None:
        lines += (b"content-length: ", str(len(content)).encode(), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _ssl_context() -> ssl.SSLContext:
    """Verified TLS with the CA bundle httpx would use (``SSL_CERT_FILE`` or certifi's)."""
    cafile = os.environ.get("SSL_CERT_FILE")
    if not cafile:
        import certifi

        cafile = certifi.where()
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    return context


class _ByteStream(httpx.AsyncByteStream):
    def __init__(self, response: Http11Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_bytes():
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()
