"""uvicorn's httptools protocol with the bounds it lacks on a request's head.

uvicorn puts no limit on the size of a request line and headers, nor on how long they take
to arrive: one 128 MiB header cost 20 s of the worker's event loop (the parser copies a header
as it grows), an unfinished one grew the worker by 500 MiB, and a client sending a byte a
second held its connection for ever. Here a head may take :data:`MAX_HEAD_BYTES` and
:data:`HEAD_TIMEOUT_S`; past either, the connection is answered 431 or 408 and closed. The
body is not counted: once the headers are complete, the rest goes to the parser as it comes.

A chunked body's trailer section is bounded as a head is (closed unanswered past it: its request is
still open), and its fields are dropped: uvicorn added them to the request's headers, so a key sent
only there authenticated the request when it came in the same read as the head (RFC 9110 §6.5.1:
trailer fields are not headers, and a proxy in front authorizing by header would judge another caller).

It also tells a lost connection to every request on it still unanswered: uvicorn tells only the
last one parsed, which for requests pipelined in one write is one queued behind the request
being served, so that one never heard its client leave (logged 200 where it was 499).

And what comes malformed, or past a bound, behind a request still unanswered is not answered:
the 400 (or 431, 408) would reach the client first and be read as that request's answer, while
the request went on upstream. The connection is closed instead, as if the client had left.

An upgrade it does not take (h2c, which curl --http2, Java's HttpClient and Ktor offer) is
ignored and the request served as HTTP/1.1 (RFC 9110 §7.8): uvicorn lost its body, and what came
after it (Kludex/uvicorn#2722). And an HTTP/1.0 client's answer of unknown length ends with the
connection, not in chunks it cannot read (RFC 9112 §6.1).

Each request's task is given a way to reset its connection (:data:`~gateway.drain.CONNECTION_RESET`):
a stream cut for a stalled client otherwise held it for as long as the client did (t193).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.drain import CONNECTION_RESET
from gateway.errors import InvalidRequestError
from gateway.http_paths import in_messages_api, target_path
from gateway.protocols import anthropic_messages
from gateway.settings import DEFAULT_HEAD_TIMEOUT_S, HEAD_TIMEOUT_VARIABLE, head_timeout_s

if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent

__all__ = ["HEAD_TIMEOUT_S", "MAX_HEAD_BYTES", "BoundedHeadProtocol"]

MAX_HEAD_BYTES = 64 * 1024
"""The request line and headers together (nginx's default allows 32 KiB)."""


def _head_timeout_s() -> float:
    try:
        return head_timeout_s(os.environ.get(HEAD_TIMEOUT_VARIABLE))
    except ValueError:  # serve refuses it before any worker starts
        return DEFAULT_HEAD_TIMEOUT_S


HEAD_TIMEOUT_S = _head_timeout_s()
"""From a head's first byte to its last (``GATEWAY_HEAD_TIMEOUT_S``)."""
_LINGER_S = 0.5
_PIECE_BYTES = 16 * 1024
"""While in a head, data goes to the parser this much at a time, so the bound is checked between pieces."""


class BoundedHeadProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_deadline: asyncio.TimerHandle | None = None
        self._refused = False
        self._unanswered: list[RequestResponseCycle] = []
        self._upgrade_ignored = False
        self._chunk_open = False
        """A chunk's size line is read and none of its data yet: what follows is its data or, after the
        last chunk, the trailer section."""
        self._trailer_bytes = 0
        self._lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that sends nothing at all is bounded too (t45: silent ones were held for ever,
        # each a file descriptor of the worker's 20,000): the first head's time runs from here.
        self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client still sends after our answer: read and dropped (see _refuse)
        if not self._in_head:
            self._feed_body(data)
            return
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._head_too_slow)
        while data and self._in_head:
            piece, data = data[:_PIECE_BYTES], data[_PIECE_BYTES:]
            self._head_bytes += len(piece)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "Request Header Fields Too Large", f"request headers exceed {MAX_HEAD_BYTES} bytes")
                self.logger.warning("Request head too large.")  # counted in the ops log, as uvicorn's 400s are
                return
            self._feed(piece)
            if self.transport.is_closing() or self._refused:
                return
        if data:  # the body, or a pipelined request that follows it
            self._feed_body(data)

    def _feed_body(self, data: bytes) -> None:
        """Data once a head is complete; after a chunk's size line, in pieces, so that a trailer section
        (which httptools grows a field of by copying, as it does a header) is held to the head's bound."""
        while data and self._chunk_open:
            piece, data = data[:_PIECE_BYTES], data[_PIECE_BYTES:]
            self._trailer_bytes += len(piece)
            if self._trailer_bytes > MAX_HEAD_BYTES:
                self._hang_up()
                return
            self._feed(piece)
            if self.transport.is_closing() or self._refused:
                return
        if data:
            self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        """uvicorn's data_received, but for an upgrade other than to a websocket (see _parse_as_http11)."""
        self._unset_keepalive_if_required()
        try:
            while True:
                try:
                    self.parser.feed_data(data)
                    return
                except httptools.HttpParserUpgrade as upgrade:
                    if not self._upgrade_ignored:
                        self.handle_websocket_upgrade()
                        return
                    data = memoryview(data)[upgrade.args[0] :]  # the body, and what follows it
                    self._parse_as_http11()
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

    def _parse_as_http11(self) -> None:
        """httptools ends a request that offers an upgrade at its head, its body unread, and its parser
        stops there for good (Kludex/uvicorn#2722): a fresh parser takes over, given a head of the
        request's own framing (not passed on: see on_headers_complete), so that it reads the body
        and the requests after it as HTTP/1.1."""
        framing = [name + b": " + value + b"\r\n" for name, value in self.cycle.scope["headers"]
                   if name in (b"content-length", b"transfer-encoding")]  # fmt: skip
        if not self.cycle.keep_alive:
            framing.append(b"connection: close\r\n")
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        self.parser.feed_data(b"POST / HTTP/1.1\r\n" + b"".join(framing) + b"\r\n")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # else a chunked body's trailer field (or the head _parse_as_http11 made up): dropped
            super().on_header(name, value)

    def on_chunk_header(self) -> None:
        self._chunk_open = True
        self._trailer_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._chunk_open = False
        super().on_body(body)

    def on_headers_complete(self) -> None:
        if self._upgrade_ignored:  # the head _parse_as_http11 made up: its request is already served
            self._upgrade_ignored = False
            return
        self._in_head = False
        self._head_bytes = 0
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a request (an upgrade to a websocket makes none)
            self._unanswered = [cycle for cycle in self._unanswered if not cycle.response_complete]
            self._unanswered.append(self.cycle)
            self._upgrade_ignored = self.parser.should_upgrade()
            if self.cycle.scope["http_version"] == "1.0":
                # uvicorn makes the cycle itself; not yet run, it is given one that frames for HTTP/1.0
                self.cycle.__class__ = _Http10Cycle

    def on_message_complete(self) -> None:
        self._chunk_open = False
        if self._upgrade_ignored:  # ended at its head by httptools: the body is still to come
            return
        super().on_message_complete()
        self._in_head = True  # a keep-alive connection's next request begins with its head

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        token = CONNECTION_RESET.set(self._reset)  # the task's context is copied from this one
        try:
            super()._start_asgi_task(cycle, app)
        finally:
            CONNECTION_RESET.reset(token)

    def _reset(self) -> None:
        """Closed at once, with a reset: what the kernel still holds for the client is dropped (a
        stalled client's, see :meth:`~gateway.drain.Drain.reset_later`)."""
        if self._lost:  # its descriptor may be another connection's by now
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        self._tell_unanswered_gone()
        super().connection_lost(exc)

    def _tell_unanswered_gone(self) -> None:
        for cycle in self._unanswered:  # as uvicorn's connection_lost does for the last request parsed, for each
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._unanswered.clear()

    def send_400_response(self, msg: str) -> None:
        if self._answer_pending():  # the 400 would be read as that request's answer
            self._hang_up()
            return
        super().send_400_response(msg)

    def _answer_pending(self) -> bool:
        """Whether a request on this connection, received whole or already being answered, is unanswered.

        An answer written for what comes after it (a malformed or refused request pipelined
        behind it) would reach the client first, and be read as that request's answer."""
        return any(
            not cycle.response_complete and (not cycle.more_body or cycle.response_started)
            for cycle in self._unanswered
        )

    def _hang_up(self) -> None:
        """Closed with no answer: the requests unanswered hear their client gone (logged 499), as
        for a client that left. They hear it now, not once the loss is reported: a request whose
        body came in the same read would else go upstream, and be logged 200 if answered before
        its disconnect watch began."""
        self._refused = True
        self._tell_unanswered_gone()
        self.transport.close()

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self._in_head or self._refused or self.transport.is_closing():
            return
        if self._head_bytes == 0:  # nothing asked: closed without an answer, as nginx does
            self.transport.close()
            return
        self._refuse(408, "Request Timeout", f"request headers not received within {HEAD_TIMEOUT_S:g}s")
        self.logger.warning("Request head too slow.")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        if self._answer_pending():
            self._hang_up()
            return
        # in the caller's protocol (t45), told by the path as routed, whatever form the target has (t155)
        if in_messages_api(target_path(getattr(self, "url", b""))):
            body = anthropic_messages.encode_error(status, message)
        else:
            body = InvalidRequestError(message).to_body()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        # Closed a moment later, reading (and dropping) what still comes meanwhile: closed at once
        # with the client's data unread, the kernel resets the connection, and the answer is lost.
        self._refused = True
        self.loop.call_later(_LINGER_S, self.transport.close)


class _Http10Cycle(RequestResponseCycle):
    """An HTTP/1.0 client cannot read chunks (RFC 9112 §6.1), which uvicorn frames an answer of
    unknown length in: such an answer ends with the connection instead (uvicorn closes an HTTP/1.0
    one after each answer)."""

    _close_delimited = False

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            framed = any(
                name.lower() in (b"content-length", b"transfer-encoding") for name, _ in message.get("headers", ())
            )
            if not framed:
                self.chunked_encoding = False  # uvicorn chooses chunks where it is None
                self._close_delimited = True
        elif message["type"] == "http.response.body" and self._close_delimited:
            self.expected_content_length = len(message.get("body", b""))  # uvicorn counts it down to 0
        await super().send(message)
