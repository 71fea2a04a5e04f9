"""The units' side of device management (devices.md): each simulated unit on a connection of its own, with a
persistent session, reads its `cmd` topic, carries out each command id at most once and answers on `res`.

A command is acknowledged to the broker only after the unit answered it, so one that was in hand when the unit
was cut off comes again; the unit remembers the ids it carried out (and its answers), answers such a one again
and does not carry it out twice. A command past its `expires` is rejected, not carried out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import Any

import msgspec

from broker_bridge.mqtt import ConnectionRefused, Message, MqttClient, MqttError
from kernel.commands import INTERVALS, CommandError, check_args, cmd_topic, res_topic
from simulators.download import DownloadError, fetch
from simulators.publisher import Endpoint
from simulators.scenario import Send

log = logging.getLogger("smame.simulate")

REMEMBER = 64  # command ids (and answers) a unit keeps
DOWNLOAD_TRIES = 5  # a download request a unit tries again before it fails the update at its download
SESSION_S = 86400  # how long the broker keeps a unit's session while it is away


class _Command(msgspec.Struct, forbid_unknown_fields=False):
    v: int
    id: str
    op: str
    args: dict[str, Any] = {}
    expires: datetime | None = None


_decode = msgspec.json.Decoder(_Command).decode


class FwJob(msgspec.Struct, frozen=True):
    """A firmware update a unit took (`fw` accepted): what it installs and where it fetches it."""

    id: str
    version: str
    url: str
    sha256: str
    size: int


# How a simulated unit's firmware update goes wrong (or is interrupted and still ends well):
FW_FAULTS = (
    "download",  # it cannot fetch the image: failed, stage download
    "image",  # the image it gets is not the one named (a corrupted copy): failed, stage verify
    "install",  # its flash refuses the image: failed, stage install
    "noboot",  # the new firmware does not come up: it boots the old one and says so (done, with the old fw)
    "cut",  # the link drops mid-download: it resumes from the byte it had (a Range request) and ends well
    "reboot",  # it reboots mid-download: back on the broker, it resumes the download and ends well
    "lost",  # its final answer is lost (it rebooted mid-install): smame must judge it by the version it reports
)


class UnitDevice:
    """One unit's command handling (pure: the time and what it resends are handed to it)."""

    def __init__(
        self,
        unit: str,
        fw: str = "2.3.0",
        resend: Callable[[int, int, float], list[Send]] = lambda start, end, at: [],
        cannot_set: Collection[str] = (),
        fw_fault: str = "",
    ) -> None:
        self.unit = unit
        self.cannot_set = frozenset(cannot_set)  # configuration its firmware cannot take: a `set` of it is rejected
        assert fw_fault in ("", *FW_FAULTS)
        self.fw_fault = fw_fault
        self.job: FwJob | None = None  # a firmware update taken and not yet carried out by the fleet
        self.downloads: list[int] = []  # the byte each download request of its updates started from
        self.fw = fw
        self.resend = resend
        self.config: dict[str, Any] = {"interval_min": 30, "brokers": [], "diag_every": 1}
        self.boots = 0
        self.carried_out: Counter[str] = Counter()  # command id -> times carried out (at most 1)
        self._answers: OrderedDict[str, bytes] = OrderedDict()

    def handle(self, payload: bytes, now: float) -> tuple[list[Send], bool]:
        """What the unit publishes for one `cmd` message (its answer last), and whether it reboots."""
        try:
            c = _decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return [], False  # nothing to answer to
        known = self._answers.get(c.id)
        if known is not None:  # carried out before: answered again, not done again
            return [self._send(known, now)], False
        out: list[Send] = []
        reboot = False
        if c.expires is not None and c.expires.timestamp() <= now:
            status, detail, state = "rejected", "expired before it arrived", None
        else:
            self.carried_out[c.id] += 1
            status, detail, state, out, reboot = self._carry_out(c, now)
        answer = msgspec.json.encode({"v": 1, "id": c.id, "status": status, "detail": detail, "state": state})
        self._answers[c.id] = answer
        while len(self._answers) > REMEMBER:
            self._answers.popitem(last=False)
        return [*out, self._send(answer, now)], reboot

    def _carry_out(self, c: _Command, now: float) -> tuple[str, str, dict[str, Any] | None, list[Send], bool]:
        try:
            args = check_args(c.op, dict(c.args))
        except CommandError as exc:
            return "rejected", str(exc), None, [], False
        if c.op == "ping":
            return "done", "", {"fw": self.fw, "boot": self.boots, **self.config}, [], False
        if c.op == "reboot":
            self.boots += 1
            return "accepted", "rebooting", None, [], True
        if c.op == "set":
            if args.get("interval_min") not in (None, *INTERVALS):
                return "rejected", "interval not supported", None, [], False
            refused = sorted(self.cannot_set & set(args))
            if refused:
                return "rejected", f"{', '.join(refused)} not supported by firmware {self.fw}", None, [], False
            self.config.update(args)
            return "done", "", dict(self.config), [], False
        if c.op == "resend":
            start = int(datetime.fromisoformat(args["from"]).timestamp())
            end = int(datetime.fromisoformat(args["to"]).timestamp())
            sends = self.resend(start, end, now)
            return "done", f"{len(sends)} telegrams", {"telegrams": len(sends)}, sends, False
        if c.op == "fw":
            if self.job is not None:
                return "rejected", "busy: an update is under way", None, [], False
            self.job = FwJob(c.id, args["version"], args["url"], args["sha256"], args["size"])
            return "accepted", "downloading", None, [], False
        return "rejected", f"{c.op} is not supported by this unit", None, [], False

    async def _fetch(self, url: str, start: int, cut_after: int | None) -> tuple[int, bytes]:
        """One download request, tried again a few times (a server refusing connections for a moment, as one
        that caps each address's does); the last DownloadError raised."""
        if self.fw_fault == "download":
            raise DownloadError("the image's server cannot be reached")
        for attempt in range(DOWNLOAD_TRIES - 1):
            try:
                got = await fetch(url, start, cut_after)
            except DownloadError:
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            self.downloads.append(start)
            return got
        got = await fetch(url, start, cut_after)
        self.downloads.append(start)
        return got

    def remember(self, command_id: str, answer: bytes) -> None:
        """Keep an answer given later (a firmware update's end) for the command it ends."""
        self._answers[command_id] = answer
        self._answers.move_to_end(command_id)

    async def update(self, job: FwJob, reboot: Callable[[], Awaitable[None]]) -> tuple[str, str] | None:
        """Carry out a firmware update: download (resuming with Range requests after a cut or a reboot), check
        size and SHA-256, install, reboot into it. (status, detail) of its final answer, or None when the answer
        is lost (`lost`)."""
        data = b""
        cut = self.fw_fault == "cut"
        rebooted = self.fw_fault != "reboot"
        while len(data) < job.size:
            half = job.size // 2 if cut or not rebooted else None
            try:
                status, body = await self._fetch(job.url, len(data), half)
            except DownloadError as exc:
                return "failed", f"download: {exc}"
            if status not in (200, 206):
                return "failed", f"download: HTTP {status}"
            data = body if status == 200 else data + body  # 200: the whole image again
            if half is not None and cut:
                cut = False  # the link came back: the rest is asked for from where it stopped
            elif half is not None:
                rebooted = True
                self.boots += 1
                await reboot()  # what it had is kept in its flash; the download resumes after
        if self.fw_fault == "image":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if len(data) != job.size or hashlib.sha256(data).hexdigest() != job.sha256:
            return "failed", "verify: the image is not the one named (size or sha256 differs)"
        if self.fw_fault == "install":
            return "failed", "install: the flash refused the image"
        self.boots += 1
        await reboot()
        if self.fw_fault != "noboot":
            self.fw = job.version
        if self.fw_fault == "lost":
            return None
        return "done", f"running {self.fw}"

    def _send(self, answer: bytes, now: float) -> Send:
        return Send(now, self.unit, res_topic(self.unit), answer)


class DeviceFleet:
    """Simulated units, each on its own connection (client id and user name its unit id), answering commands.
    `online(unit, False)` takes a unit off the broker (its session kept), `True` brings it back."""

    def __init__(self, endpoint: Endpoint, devices: list[UnitDevice], clock: Callable[[], float]) -> None:
        self.endpoint = endpoint
        self.devices = {d.unit: d for d in devices}
        self.clock = clock
        self.clients: dict[str, MqttClient] = {}
        self._queues: dict[str, asyncio.Queue[Message | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect every unit and subscribe it to its commands."""
        await asyncio.gather(*(self.online(u, True) for u in self.devices))

    async def online(self, unit: str, up: bool) -> None:
        """Bring a unit onto the broker (resuming its session) or take it off (its session kept)."""
        if not up:
            client = self.clients.pop(unit, None)
            if client is not None:
                await client.disconnect()
            return
        queue: asyncio.Queue[Message | None] = asyncio.Queue()
        e = self.endpoint
        client = MqttClient(on_messages=lambda messages: _put_all(queue, messages), version=e.version)
        await client.connect(
            *e.nodes[0],
            unit,
            username=unit if e.password_of(unit) is not None else None,
            password=e.password_of(unit),
            tls=e.tls,
            session_expiry=SESSION_S,
            keepalive=60,
        )
        await client.subscribe(cmd_topic(unit), qos=1)
        self.clients[unit] = client
        task = asyncio.create_task(self._serve(unit, client, queue), name=f"unit-{unit}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, unit: str, client: MqttClient, queue: asyncio.Queue[Message | None]) -> None:
        device = self.devices[unit]
        client.closed.add_done_callback(lambda _: queue.put_nowait(None))  # the end of this connection's commands
        while True:
            m = await queue.get()
            if m is None:
                return
            sends, reboot = device.handle(m.payload, self.clock())
            try:
                for s in sends:
                    await client.publish(s.topic, s.payload)
            except (MqttError, ConnectionRefused):
                return  # cut off before answering: the broker delivers the command again
            if m.packet_id is not None:
                client.ack([m.packet_id])
            job, device.job = device.job, None
            if job is not None:
                task = asyncio.create_task(self._update(device, job), name=f"update-{unit}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if reboot:  # off the broker for a moment, its session kept, then back
                await self.online(unit, False)
                await asyncio.sleep(0.2)
                await self.online(unit, True)
                return

    async def _update(self, device: UnitDevice, job: FwJob) -> None:
        """A unit's firmware update, its final answer published on whatever connection it has by then."""

        async def reboot() -> None:
            await self.online(device.unit, False)
            await asyncio.sleep(0.2)
            await self.online(device.unit, True)

        try:
            said = await device.update(job, reboot)
        except (MqttError, ConnectionRefused, OSError) as exc:
            log.warning("unit %s: update %s broke off: %s", device.unit, job.id, exc)
            return
        if said is None:
            return
        status, detail = said
        state = {"fw": device.fw, "boot": device.boots}
        answer = msgspec.json.encode({"v": 1, "id": job.id, "status": status, "detail": detail, "state": state})
        device.remember(job.id, answer)
        client = self.clients.get(device.unit)
        if client is not None:
            try:
                await client.publish(res_topic(device.unit), answer)
            except (MqttError, ConnectionRefused) as exc:
                log.warning("unit %s: the answer to %s was lost: %s", device.unit, job.id, exc)

    async def close(self) -> None:
        """Take every unit off the broker."""
        for unit in list(self.clients):
            await self.online(unit, False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _put_all(queue: asyncio.Queue[Message | None], messages: list[Message]) -> None:
    for m in messages:
        queue.put_nowait(m)
