"""A lean MQTT client on asyncio (MQTT 5, or 3.1.1 for brokers that speak only that): just what durable ingest
(and the simulated fleet) needs.

Why not a general client: the PUBACK of each QoS 1 message must wait until its batch is
committed, and the broker must let tens of thousands of messages be in flight meanwhile
(Receive Maximum). paho-mqtt's `manual_ack` does the first at about half the rate this
protocol reaches (see docs/performance.md); aiomqtt acknowledges on receipt.
The same connection publishes at QoS 1 with a bounded in-flight window, which is what a simulated
unit needs; 10,000 of these connections fit in one process (see docs/performance.md).
Packets: CONNECT, SUBSCRIBE, PUBLISH both ways, PUBACK both ways, PING, DISCONNECT.
MQTT 3.1.1 (protocol level 4) is the same without properties: no Receive Maximum (the broker's own setting bounds
what is in flight), no session expiry (a session without clean start is kept until the broker drops it), no
retain handling, no reason strings.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import Callable
from typing import cast

import msgspec

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 0x10, 0x20, 0x30, 0x40, 0x82, 0x90
PINGREQ, PINGRESP, DISCONNECT = b"\xc0\x00", 0xD0, 0xE0
PING_EVERY_S = 5.0  # a PINGREQ this often at most (keepalive / 2 when shorter)
SILENT_DEAD_S = 10.0  # a connection from which nothing came for this long is dead (keepalive x 1.5 when shorter)
RECEIVE_MAXIMUM = 65535
# Announced in CONNECT: the broker drops larger messages for us instead of sending them (a telegram is at most
# 16 KiB; up to 64 KiB still arrives, to be quarantined as too large with its reason). Larger packets from a
# broker that ignores it end the connection before they are buffered whole.
MAXIMUM_PACKET_SIZE = 65536
RETAIN_HANDLING_NONE = 2 << 4  # subscription option: never send retained messages on subscribing
MQTT5, MQTT311 = 5, 4  # protocol levels


def version_for(kind: str) -> int:
    """The protocol level smame and its simulated units speak to a broker of this kind (`broker.kind`): 3.1.1
    to RabbitMQ, whose MQTT plugin (3.10) has no MQTT 5, and 5 to Mosquitto."""
    return MQTT311 if kind == "rabbitmq" else MQTT5


# Property id -> wire kind; MQTT 5.0 section 2.2.2.2.
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPS = {
    0x01: _BYTE,
    0x02: _U32,
    0x03: _STR,
    0x08: _STR,
    0x09: _BIN,
    0x0B: _VARINT,
    0x11: _U32,
    0x12: _STR,
    0x13: _U16,
    0x15: _STR,
    0x16: _BIN,
    0x17: _BYTE,
    0x18: _U32,
    0x19: _BYTE,
    0x1A: _STR,
    0x1C: _STR,
    0x1F: _STR,
    0x21: _U16,
    0x22: _U16,
    0x23: _U16,
    0x24: _BYTE,
    0x25: _BYTE,
    0x26: _PAIR,
    0x27: _U32,
    0x28: _BYTE,
    0x29: _BYTE,
    0x2A: _BYTE,
}
SERVER_KEEP_ALIVE, REASON_STRING = 0x13, 0x1F


class MqttError(Exception):
    """The broker refused us, broke the protocol, or the connection was lost."""


class ConnectionRefused(MqttError):
    """The broker answered CONNECT with an error (bad credentials, not authorised, banned...)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Message(msgspec.Struct, frozen=True, gc=False):
    """One PUBLISH received; `packet_id` is None at QoS 0."""

    topic: str
    payload: bytes
    packet_id: int | None
    received: float
    properties: dict[int, object] | None = None  # the message's MQTT 5 properties, when it has any


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    for i in range(pos, min(pos + 4, len(buf))):
        value |= (buf[i] & 0x7F) << shift
        if not buf[i] & 0x80:
            return value, i + 1
        shift += 7
    if len(buf) >= pos + 4:
        raise MqttError("malformed remaining length")
    return None


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def request_properties(response_topic: str, correlation: bytes, expiry_s: int) -> bytes:
    """The properties of a request (MQTT 5 request/response): where to answer, what the answer carries back, and
    how many seconds the broker keeps the message for a subscriber that is away."""
    return (
        b"\x02"
        + struct.pack("!I", max(1, min(expiry_s, 2**32 - 1)))
        + b"\x08"
        + _str(response_topic)
        + b"\x09"
        + struct.pack("!H", len(correlation))
        + correlation
    )


MESSAGE_EXPIRY, RESPONSE_TOPIC, CORRELATION_DATA = 0x02, 0x08, 0x09


def parse_properties(buf: bytes | bytearray, pos: int) -> tuple[dict[int, object], int]:
    """Decode a property block starting at `pos`; return the properties and the position after it."""
    parsed = _read_varint(buf, pos)
    if parsed is None:
        raise MqttError("truncated properties")
    length, pos = parsed
    end, props = pos + length, {}
    while pos < end:
        pid = buf[pos]
        kind = _PROPS.get(pid)
        pos += 1
        value: object
        if kind == _BYTE:
            value, pos = buf[pos], pos + 1
        elif kind == _U16:
            value, pos = struct.unpack_from("!H", buf, pos)[0], pos + 2
        elif kind == _U32:
            value, pos = struct.unpack_from("!I", buf, pos)[0], pos + 4
        elif kind == _VARINT:
            got = _read_varint(buf, pos)
            if got is None:
                raise MqttError("truncated property")
            value, pos = got
        elif kind in (_STR, _BIN):
            n = struct.unpack_from("!H", buf, pos)[0]
            value, pos = bytes(buf[pos + 2 : pos + 2 + n]), pos + 2 + n
        elif kind == _PAIR:
            n = struct.unpack_from("!H", buf, pos)[0]
            m = struct.unpack_from("!H", buf, pos + 2 + n)[0]
            value, pos = None, pos + 4 + n + m
        else:
            raise MqttError(f"unknown property {pid:#x}")
        props[pid] = value
    return props, end


class _Protocol(asyncio.Protocol):
    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.buf = bytearray()
        self.properties = client.version == MQTT5  # whether a PUBLISH carries a properties block

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, size = 0, len(buf)
        messages: list[Message] = []  # handed on together: one call per socket read, not per message
        now = time.time()  # one clock read per socket read: messages of one read arrived together
        self.client._last_heard = time.monotonic()
        try:
            while size - pos >= 2:
                kind = buf[pos]
                if buf[pos + 1] < 0x80:  # one-byte remaining length: acknowledgements
                    length, start = buf[pos + 1], pos + 2
                elif size - pos >= 3 and buf[pos + 2] < 0x80:  # two bytes, 128..16383: a telegram's PUBLISH
                    length, start = (buf[pos + 1] & 0x7F) | (buf[pos + 2] << 7), pos + 3
                else:
                    got = _read_varint(buf, pos + 1)
                    if got is None:
                        break
                    length, start = got
                    if length > MAXIMUM_PACKET_SIZE:
                        raise MqttError(f"a packet of {length} bytes, over the {MAXIMUM_PACKET_SIZE} we announced")
                end = start + length
                if end > size:
                    break
                if kind & 0xF0 == PUBLISH:
                    qos = (kind >> 1) & 3
                    tlen = (buf[start] << 8) | buf[start + 1]
                    p = start + 2 + tlen
                    topic = buf[start + 2 : p].decode()
                    packet_id = None
                    if qos:
                        packet_id = (buf[p] << 8) | buf[p + 1]
                        p += 2
                    if not self.properties:
                        messages.append(Message(topic, bytes(buf[p:end]), packet_id, now))
                    elif buf[p] == 0:  # no properties: a telegram
                        messages.append(Message(topic, bytes(buf[p + 1 : end]), packet_id, now))
                    else:
                        props, p = parse_properties(buf, p)
                        messages.append(Message(topic, bytes(buf[p:end]), packet_id, now, props))
                else:
                    self.client._on_control(kind, bytes(buf[start:end]))
                pos = end
        except (MqttError, IndexError, struct.error, UnicodeDecodeError) as exc:
            self.client._fail(MqttError(f"protocol error from broker: {exc!r}"))
        del buf[:pos]
        if messages:
            self.client.on_messages(messages)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._fail(MqttError(f"connection lost: {exc}" if exc else "connection closed by broker"))


class Nodes:
    """A broker's nodes, tried in turn: the one that worked last first, then the next when it fails. `failed` says
    when a whole round has failed, so that the caller waits before the next round instead of spinning."""

    def __init__(self, nodes: tuple[tuple[str, int], ...]) -> None:
        self.nodes = nodes
        self._at = 0
        self._failures = 0

    @property
    def current(self) -> tuple[str, int]:
        """The node to try now."""
        return self.nodes[self._at]

    def failed(self) -> bool:
        """The current node failed: move to the next; True when every node has failed since the last success."""
        self._at = (self._at + 1) % len(self.nodes)
        self._failures += 1
        return self._failures % len(self.nodes) == 0

    def worked(self) -> None:
        """The current node took us: it is the one tried first next time."""
        self._failures = 0


class MqttClient:
    """One MQTT connection (MQTT 5, or 3.1.1 with `version` MQTT311): receives messages and acknowledges them when
    told to; publishes at QoS 1."""

    def __init__(
        self, on_messages: Callable[[list[Message]], None] = lambda m: None, window: int = 100, version: int = MQTT5
    ) -> None:
        self.on_messages = on_messages  # called with the PUBLISH packets of each socket read, in order
        self.version = version
        self._transport: asyncio.Transport | None = None
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._inflight: dict[int, asyncio.Future[int]] = {}
        self._window = asyncio.Semaphore(window)
        self._next_id = 0
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pinger: asyncio.Task[None] | None = None
        self._last_heard = time.monotonic()  # when the broker last sent anything
        self.session_present = False

    @property
    def closed(self) -> asyncio.Future[None]:
        """Completes (with MqttError) when the connection ends."""
        return self._closed

    @property
    def connected(self) -> bool:
        """True while the connection is open (not once its socket failed: asyncio tells the protocol a loop turn
        later, and what is written meanwhile is lost, each write past the fifth logged)."""
        return not self._closed.done() and not (self._transport is not None and self._transport.is_closing())

    async def connect(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        clean_start: bool = False,
        session_expiry: int = 0,
        keepalive: int = 60,
        timeout: float = 10.0,
        will: tuple[str, bytes, bool] | None = None,
    ) -> bool:
        """Open the connection; return whether the broker still had our session."""
        loop = asyncio.get_running_loop()
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation (SIGTERM) that lands as
        # the connection is made, and a service that ignores its cancellation keeps smame from stopping.
        async with asyncio.timeout(timeout):
            await loop.create_connection(
                lambda: _Protocol(self), host, port, ssl=tls, server_hostname=host if tls else None
            )
        flags = (
            (0x02 if clean_start else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
        )
        if will is not None:
            flags |= 0x04 | (0x20 if will[2] else 0) | (1 << 3)  # will at QoS 1
        v5 = self.version == MQTT5
        props = (
            b"\x11"
            + struct.pack("!I", session_expiry)
            + b"\x21"
            + struct.pack("!H", RECEIVE_MAXIMUM)
            + b"\x27"
            + struct.pack("!I", MAXIMUM_PACKET_SIZE)
        )
        body = _str("MQTT") + bytes([self.version, flags]) + struct.pack("!H", keepalive)
        body += (_varint(len(props)) + props if v5 else b"") + _str(client_id)
        if will is not None:
            body += (b"\x00" if v5 else b"") + _str(will[0]) + struct.pack("!H", len(will[1])) + will[1]
        if username is not None:
            body += _str(username)
        if password is not None:
            body += _str(password)
        reply = await self._request(CONNACK, _packet(CONNECT, body), timeout)
        session_present, code = bool(reply[0] & 1), reply[1]
        props_in = parse_properties(reply, 2)[0] if v5 else {}
        if code >= 0x80 or (code and not v5):
            self.close()
            why = _reason(code, props_in) if v5 else _REFUSED_311.get(code, f"refused ({code})")
            raise ConnectionRefused(f"broker refused the connection: {why}", code)
        keepalive = int(props_in.get(SERVER_KEEP_ALIVE, keepalive))  # type: ignore[call-overload]
        if keepalive:
            self._pinger = asyncio.create_task(self._ping(keepalive), name="mqtt-ping")
        self.session_present = session_present
        return session_present

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0, retained: bool = False) -> None:
        """Subscribe one filter, without the retained messages it matches (one retained telegram would otherwise
        come back at every start) unless `retained`; raise MqttError when the broker refuses it."""
        if self.version == MQTT5:
            handling = 0 if retained else RETAIN_HANDLING_NONE
            body = struct.pack("!H", 1) + b"\x00" + _str(topic) + bytes([qos | handling])
        else:  # no options: a broker of 3.1.1 sends what is retained (a repeated reading is a duplicate, no more)
            body = struct.pack("!H", 1) + _str(topic) + bytes([qos])
        reply = await self._request(SUBACK, _packet(SUBSCRIBE, body), timeout)
        pos = parse_properties(reply, 2)[1] if self.version == MQTT5 else 2
        code = reply[pos]
        if code >= 0x80:
            raise MqttError(f"broker refused the subscription to {topic!r}: {_reason(code, {})}")

    async def publish(self, topic: str, payload: bytes, retain: bool = False, properties: bytes = b"") -> int:
        """Publish at QoS 1 (with `properties`, an encoded block such as `request_properties` makes; MQTT 3.1.1 has
        none and they are left out) and wait for the broker's PUBACK; return its reason code (0, or 0x10: no
        subscriber matched); raise MqttError if refused or disconnected."""
        async with self._window:
            if not self.connected or self._transport is None:
                raise MqttError("not connected")
            self._next_id = self._next_id % 65535 + 1
            while self._next_id in self._inflight:
                self._next_id = self._next_id % 65535 + 1
            pid = self._next_id
            done = asyncio.get_running_loop().create_future()
            self._inflight[pid] = done
            header = 0x32 | (1 if retain else 0)
            props = _varint(len(properties)) + properties if self.version == MQTT5 else b""
            body = _str(topic) + struct.pack("!H", pid) + props + payload
            self._transport.write(bytes([header]) + _varint(len(body)) + body)
            try:
                finished, _ = await asyncio.wait({done, self._closed}, return_when=asyncio.FIRST_COMPLETED)
                if done not in finished:
                    raise MqttError("connection lost before PUBACK")
                code = int(done.result())
                if code >= 0x80:
                    raise MqttError(f"broker refused the message on {topic}: {_reason(code, {})}")
                return code
            finally:
                self._inflight.pop(pid, None)

    def ack(self, packet_ids: list[int]) -> bool:
        """Send PUBACKs in this order; False when the connection is gone (the broker will redeliver)."""
        if not self.connected or self._transport is None:
            return False
        self._transport.write(b"".join(b"\x40\x02" + struct.pack("!H", i) for i in packet_ids))
        return True

    def pause(self) -> None:
        """Stop reading from the socket (enough work in hand, or shutting down)."""
        if self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def resume(self) -> None:
        """Read from the socket again."""
        if self._transport is not None and self.connected and not self._transport.is_reading():
            self._transport.resume_reading()

    async def disconnect(self) -> None:
        """Say goodbye normally (the broker keeps the session) and close."""
        if self.connected and self._transport is not None:
            self._transport.write(b"\xe0\x00")
        self.close()

    def close(self) -> None:
        """Close the socket now."""
        if self._transport is not None:
            self._transport.close()
        self._fail(MqttError("closed by us"))

    async def _request(self, reply_kind: int, packet: bytes, timeout: float) -> bytes:
        assert self._transport is not None
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[reply_kind] = waiter
        self._transport.write(packet)
        done, _ = await asyncio.wait({waiter, self._closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            reply: bytes = waiter.result()
            return reply
        self.close()
        if self._closed.done() and self._closed.exception():
            raise self._closed.exception()  # type: ignore[misc]
        raise MqttError(f"no reply from the broker within {timeout} s")

    def _on_control(self, kind: int, body: bytes) -> None:
        if kind == PINGRESP:  # heard: data_received noted it
            return
        if kind & 0xF0 == PUBACK:
            pid = (body[0] << 8) | body[1]
            waiter = self._inflight.get(pid)
            if waiter is not None and not waiter.done():
                waiter.set_result(body[2] if len(body) > 2 else 0)
            return
        if kind == DISCONNECT:
            code = body[0] if body else 0
            props = parse_properties(body, 1)[0] if len(body) > 1 else {}
            self._fail(MqttError(f"broker disconnected us: {_reason(code, props)}"))
            if self._transport is not None:
                self._transport.close()
            return
        reply = self._waiters.pop(kind & 0xF0, None)
        if reply is not None and not reply.done():
            reply.set_result(body)

    async def _ping(self, keepalive: int) -> None:
        """Ping often and give the connection up when the broker has sent nothing for a while: a link cut without
        a reset (a firewall's dropped state, a dead switch) shows only so, and another node may take over the
        ingest only once this one knows (docs/monitoring.md)."""
        every, dead_after = min(keepalive / 2, PING_EVERY_S), min(keepalive * 1.5, SILENT_DEAD_S)
        while self.connected and self._transport is not None:
            await asyncio.sleep(every)
            if not self._transport.is_reading():  # paused: what the broker sent waits unread, so nothing is judged
                self._last_heard = time.monotonic()
                continue
            if time.monotonic() - self._last_heard > dead_after:
                self._fail(MqttError(f"nothing from the broker for {dead_after:.0f} s, not even a PINGRESP"))
                self._transport.close()
                return
            self._transport.write(PINGREQ)

    def _fail(self, exc: MqttError) -> None:
        if not self._closed.done():
            self._closed.set_exception(exc)
            self._closed.exception()  # retrieved: nobody has to await it
        if self._pinger is not None and self._pinger is not asyncio.current_task():
            self._pinger.cancel()


_REASONS = {
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x97: "quota exceeded",
    0x9E: "shared subscriptions not supported",
}


_REFUSED_311 = {
    1: "unacceptable protocol version (the broker does not speak MQTT 3.1.1)",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def _reason(code: int, props: dict[int, object]) -> str:
    text = _REASONS.get(code, "reason")
    extra = props.get(REASON_STRING)
    return f"{text} ({code:#04x})" + (f": {extra.decode(errors='replace')}" if isinstance(extra, bytes) else "")
