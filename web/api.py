"""The JSON API v1 (`../shared/design/api.md`): a customer's machine reads its own units, their slots and its
daily CSV files with a bearer token; an operator logged in to the console reads every customer's with the
console's session cookie.

A unit or customer that is not the caller's answers 404 exactly as one that does not exist. kWh are decimal
strings formatted by the same function as the CSV files (`kernel.meter.format_kwh`), so the API and the files
agree to the digit; times are ISO 8601 with the configured zone's offset. Every error is `{"error": "..."}`.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, which name `Caller`, a
# dependency made inside `build_api`, as objects.
import asyncio
import functools
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from operator import attrgetter
from typing import Annotated, Any, BinaryIO, Literal

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from aggregator.store import CommandRow, SlotRow
from csv_export.co2 import month_summary, summary_rows
from csv_export.files import path_of
from kernel.commands import STATES, CommandError, check_args, targets
from kernel.emissions import fiscal_year
from kernel.meter import flag_names, format_kwh
from kernel.timegrid import SLOT, Grid
from monitoring.at_risk import Standing
from web.access import SCOPES, SESSION_COOKIE, TOKEN, Sessions, Tokens, may
from web.context import NO_FILES, WebContext, client_of
from web.fleet_health import fleet_health, unit_health

log = logging.getLogger("smame.web")

_RANK = {"M": 0, "E": 1, "A": 2}
MAX_BODY = 512 * 1024  # bytes of a request's body that are read: a longer one is refused
MAX_COMMAND_UNITS = 10_000  # units one request may list (a customer's whole fleet: name the customer)
CSRF_HEADER = "X-CSRF-Token"  # what a console session's unsafe request carries: its session's CSRF token
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2999, 12, 31)  # the days the API can address
_CHARSET = {"utf-8": "utf-8", "cp932": "windows-31j"}  # the IANA name of what Python calls cp932


class ApiError(HTTPException):
    """An answer with a status and a reason, sent as `{"error": reason}`."""


@dataclass(frozen=True, slots=True)
class Reader:
    """Who calls: a customer's token (`customer`) or an operator's console session (`customer` None: all)."""

    customer: str | None
    who: str
    csrf: str = ""  # an operator's session's CSRF token, which its requests that change anything must carry
    role: str = "viewer"  # an operator's role (web.access.ROLES)
    scope: frozenset[str] = frozenset(SCOPES)  # what a customer's token reads (an operator: everything)

    def needs(self, scope: str) -> None:
        """Refuse (403) a call outside the token's scope."""
        if scope not in self.scope:
            raise ApiError(403, f"this token reads {', '.join(sorted(self.scope))}, not {scope}")

    def sees(self, customer: str) -> bool:
        """Whether this caller may read `customer`'s units and files."""
        return self.customer is None or self.customer == customer


class Error(BaseModel):
    """What every refusal carries."""

    error: str


class Unit(BaseModel):
    unit_id: str
    customer_id: str
    meter_id: str | None
    label: str | None
    last_reading_at: datetime | None


class Units(BaseModel):
    units: list[Unit]


class Slot(BaseModel):
    date: date
    slot: int
    start: datetime
    end: datetime
    import_kwh: str | None
    export_kwh: str | None
    quality: Literal["A", "E", "M"]
    flags: list[str]


class Slots(BaseModel):
    unit_id: str
    slots: list[Slot]


class TotalEmissions(BaseModel):
    import_kwh: str
    co2_location_kg: str | None
    co2_market_kg: str | None
    slots: int
    estimated_slots: int
    missing_slots: int
    estimated_share: str
    missing_share: str


class UnitEmissions(TotalEmissions):
    unit_id: str


class RiskReason(BaseModel):
    signal: str
    severity: float
    words: str


class AtRiskUnit(BaseModel):
    unit_id: str
    customer_id: str
    risk: float
    since: date
    assessed: date
    reasons: list[RiskReason]


class HealthEvent(BaseModel):
    date: date
    scope: str
    signal: str
    units: int
    assessed: int
    words: str


class HealthDay(BaseModel):
    date: date
    units: int
    completeness: float | None
    assessed: int
    at_risk: int


class FleetHealth(BaseModel):
    at_risk: list[AtRiskUnit]
    by_reason: dict[str, int]
    events: list[HealthEvent]
    inventory: dict[str, dict[str, int]]
    days: list[HealthDay]


class UnitHealthDay(BaseModel):
    date: date
    readings: int
    late: int
    delay_p50: int | None
    delay_max: int | None
    seq_gaps: int
    restarts: int
    clock_offset: int | None
    no_data: int
    rsrp: float | None
    rsrp_min: int | None
    rsrq: float | None
    sinr: float | None
    ce: int | None
    reboots: int | None
    vsup_min: int | None
    attaches: int | None
    fw: str | None
    cell: str | None
    diag_dropped: int
    disconnects: int


class UnitHealth(BaseModel):
    unit_id: str
    customer_id: str
    at_risk: bool
    risk: float | None
    since: date | None
    reasons: list[RiskReason]
    days: list[UnitHealthDay]


class FactorUsed(BaseModel):
    t_per_kwh: str
    published: date


class Emissions(BaseModel):
    customer_id: str
    month: str
    fiscal_year: int
    location_factor: FactorUsed | None
    market_factor: FactorUsed | None
    units: list[UnitEmissions]
    total: TotalEmissions
    notes: list[str]


class Command(BaseModel):
    command_id: str
    unit_id: str
    op: str
    args: dict[str, Any]
    state: Literal["queued", "sent", "accepted", "done", "failed", "rejected", "expired", "cancelled"]
    created: datetime
    changed: datetime
    expires: datetime
    asked_by: str
    asked_from: str
    tries: int
    detail: str
    answer: dict[str, Any] | None


class Commands(BaseModel):
    commands: list[Command]


class NewCommand(BaseModel):
    """A command for units: the listed ones, or every unit of a customer."""

    op: Literal["ping", "reboot", "set", "resend", "fw"]
    args: dict[str, Any] = Field(default_factory=dict, description="the operation's arguments (docs/devices.md)")
    units: list[str] = Field(default_factory=list, max_length=MAX_COMMAND_UNITS)
    customer: str | None = Field(default=None, max_length=64)
    expires_s: int | None = Field(default=None, ge=10, le=30 * 86400, description="its life (devices.expiry_s)")


def _refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "a parameter is malformed or out of range",
        401: "no token, or not a valid one",
        403: "refused: for operators only, outside the token's scope, or from an address its customer does not allow",
        404: "no such unit, customer or file for this caller",
        409: "the command is no longer queued",
        413: f"a body of over {MAX_BODY // 1024} KiB",
        429: "too many failed attempts from this address",
        503: "the store is unavailable for now",
    }
    return {c: {"model": Error, "description": reasons[c]} for c in codes}


DOWNLOAD_CHUNK = 64 * 1024  # bytes of a file read at a time: what a download holds while its client reads


async def _chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    """An open file's bytes, a chunk at a time as the client takes them, read off the event loop; closed at
    the end, or when the client goes."""
    loop = asyncio.get_running_loop()
    try:
        while chunk := await loop.run_in_executor(None, f.read, DOWNLOAD_CHUNK):
            yield chunk
    finally:
        f.close()


def build_api(ctx: WebContext) -> FastAPI:
    """The API as an ASGI application; `/api/openapi.json` is its OpenAPI 3.1 document."""
    app = FastAPI(
        title="smame API",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url=None,  # the interactive pages load scripts from a CDN: none at run time
        redoc_url=None,
    )
    tokens, sessions = Tokens(ctx.store), Sessions(ctx.store)

    async def json_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, HTTPException):
            return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)
        if isinstance(exc, RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
            return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 400)
        if isinstance(exc, ctx.store.errors):
            return JSONResponse({"error": "the store is unavailable for now: try again later"}, 503)
        log.exception("API request %s failed", request.url.path)
        return JSONResponse({"error": "internal error"}, 500)

    for kind in (HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, json_error)

    def _files_here() -> None:
        """Refuse, saying why, what only the customers' files answer on a node that writes none."""
        if ctx.export is None:
            raise ApiError(404, f"{NO_FILES}: ask a node that does")

    async def caller(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))],
    ) -> Reader:
        """The customer whose token the request carries, or the operator whose console session cookie it
        carries; refuses with 401 (a wrong token after the slow-down) or 429."""
        address = client_of(request)
        if ctx.bans.banned(address):
            raise ApiError(429, "too many failed attempts from this address: try again later", {"Retry-After": "600"})
        if bearer is None or not bearer.credentials.strip():
            secret = request.cookies.get(SESSION_COOKIE, "")
            session = await ctx.store.call(sessions.get, secret, int(ctx.clock())) if secret else None
            if session is None:
                raise ApiError(
                    401, "an API token is needed: Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
                )
            if ctx.require_2fa and not session.two_factor:
                raise ApiError(403, "enrol a second factor in the console first (web.require_2fa)")
            return Reader(None, f"operator {session.operator}", session.csrf, session.role)
        token = bearer.credentials.strip()
        grant = await ctx.store.call(tokens.known, token)
        match = TOKEN.fullmatch(token)
        customer = ctx.registry().customers.get(grant.customer) if grant is not None else None
        if grant is None or customer is None:
            ctx.bans.failed(address, f"token {match['id']}" if match else "", "the API")
            await asyncio.sleep(ctx.fail_delay_s)  # a guesser learns slowly; the loop serves others meanwhile
            raise ApiError(401, "this API token is not valid", {"WWW-Authenticate": "Bearer"})
        # (a token's 256 bits are not guessed: one that exists says why it is refused, and counts toward no ban,
        # so that the customer's server is told what to fix rather than banned)
        if grant.expired(ctx.clock()):
            expired = datetime.fromtimestamp(grant.expires or 0, ctx.grid.zone).isoformat()
            challenge = {"WWW-Authenticate": "Bearer"}
            raise ApiError(401, f"this API token expired at {expired}: ask for a new one", challenge)
        if not customer.allows(address):
            ctx.bans.refuse(address, f"token {grant.id}", "the API")
            raise ApiError(403, f"this token's customer does not allow calls from {address}")
        return Reader(grant.customer, f"token {grant.id}", scope=frozenset(grant.scope))

    Caller = Annotated[Reader, Depends(caller)]
    router = APIRouter(prefix="/api/v1")

    @router.get("/units", response_model=Units, responses=_refusals(401, 403, 429, 503))
    async def units(reader: Caller) -> Response:
        """The caller's units (an operator's: every unit), with the time of each one's newest reading."""
        reader.needs("units")
        registry = ctx.registry()
        every = sorted(registry.units.values(), key=attrgetter("id")) if reader.customer is None else []
        own = registry.units_of(reader.customer) if reader.customer is not None else every
        last = await ctx.store.call(ctx.store.last_readings, [u.id for u in own])
        return _json(
            {
                "units": [
                    {
                        "unit_id": u.id,
                        "customer_id": u.customer,
                        "meter_id": u.meter or None,
                        "label": u.label or None,
                        "last_reading_at": _instant(last.get(u.id), ctx.grid),
                    }
                    for u in own
                ]
            }
        )

    @router.get("/units/{unit_id}/slots", response_model=Slots, responses=_refusals(400, 401, 403, 404, 429, 503))
    async def slots(
        reader: Caller,
        unit_id: Annotated[str, PathParam(max_length=64)],
        first: Annotated[date, Query(alias="from", description="the first local day, YYYY-MM-DD")],
        last: Annotated[date | None, Query(alias="to", description="the last local day (default: from)")] = None,
    ) -> Response:
        """One object per half hour of each local day from `from` to `to`, both included, up to the last one
        closed; at most `max_days` days."""
        reader.needs("units")
        registry = ctx.registry()
        unit = registry.units.get(unit_id)
        if unit is None or not reader.sees(unit.customer):
            raise ApiError(404, f"no unit {unit_id}")
        last = last or first
        for name, day in (("from", first), ("to", last)):
            if not FIRST_DAY <= day <= LAST_DAY:
                raise ApiError(400, f"{name}: a day from {FIRST_DAY} to {LAST_DAY}")
        if last < first:
            raise ApiError(400, "to: before from")
        if (last - first).days + 1 > ctx.max_days:
            raise ApiError(400, f"to: at most {ctx.max_days} days in one call")
        include_export = registry.customers[unit.customer].include_export
        upto = int(ctx.clock())
        days = [(d, [e for e in ctx.grid.day_slots(d) if e <= upto]) for d in _days(first, last)]
        rows = await ctx.store.call(ctx.store.slots_at, unit_id, [e for _, ends in days for e in ends])
        by_end = {r.slot: r for r in rows}
        out = []
        for day, ends in days:
            text, zone = day.isoformat(), ctx.grid.zone
            start = datetime.fromtimestamp(ends[0] - SLOT, zone).isoformat() if ends else ""
            for index, e in enumerate(ends, 1):
                end = datetime.fromtimestamp(e, zone).isoformat()
                values = slot_values(by_end.get(e), include_export)
                out.append({"date": text, "slot": index, "start": start, "end": end, **values})
                start = end
        return _json({"unit_id": unit_id, "slots": out})

    @router.get(
        "/customers/{customer_id}/days/{day}.csv",
        response_class=Response,
        responses={
            200: {"content": {"text/csv": {}}, "description": "the day's CSV file"},
            **_refusals(400, 401, 403, 404, 429),
        },
    )
    async def day_file(
        reader: Caller,
        customer_id: Annotated[str, PathParam(max_length=64)],
        day: Annotated[date, PathParam(description="the local day, YYYY-MM-DD")],
    ) -> Response:
        """The same bytes as the customer's CSV file of that day (as the file gateway serves them)."""
        reader.needs("files")
        customer = ctx.registry().customers.get(customer_id)
        if customer is None or not reader.sees(customer_id):
            raise ApiError(404, f"no customer {customer_id}")
        _files_here()
        path = path_of(ctx.export_dir, customer_id, day)
        loop = asyncio.get_running_loop()
        try:
            # opened now: a rewrite renames a new file over this one, and the open one stays whole as it was
            f = await loop.run_in_executor(None, path.open, "rb")
        except FileNotFoundError:
            raise ApiError(404, f"no file of {customer_id} for {day.isoformat()}") from None
        if reader.customer is not None:  # the customer's downloads, as the file gateway notes them (not operators')
            row = (customer_id, path.name, int(ctx.clock()), "api", reader.who, 1)
            try:
                await ctx.store.call(ctx.store.record_downloads, [row])
            except ctx.store.errors as e:  # the file is served all the same
                log.warning("download of %s not recorded: %s", path.name, e)
            except BaseException:
                f.close()
                raise
        charset = _CHARSET[customer.encoding]
        return StreamingResponse(
            _chunks(f),
            media_type=f"text/csv; charset={charset}",
            headers={
                "Content-Disposition": f'attachment; filename="{path.name}"',
                "Content-Length": str(os.fstat(f.fileno()).st_size),
            },
        )

    @router.get(
        "/customers/{customer_id}/emissions", response_model=Emissions, responses=_refusals(400, 401, 403, 404, 429)
    )
    async def emissions(
        reader: Caller,
        customer_id: Annotated[str, PathParam(max_length=64)],
        month: Annotated[str, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="the month, YYYY-MM")],
    ) -> Response:
        """The customer's CO2 of a month so far, per unit and in total, location- and market-based, as in its
        monthly summary file: kWh and kg as exact decimal strings (kg null where no factor was in force)."""
        reader.needs("emissions")
        customer = ctx.registry().customers.get(customer_id)
        if customer is None or not reader.sees(customer_id):
            raise ApiError(404, f"no customer {customer_id}")
        first = date.fromisoformat(f"{month}-01")
        if not customer.co2_columns:
            raise ApiError(404, f"customer {customer_id} has no emissions (co2_columns is off)")
        _files_here()
        loop = asyncio.get_running_loop()
        summary = await loop.run_in_executor(None, month_summary, ctx.export_dir, customer, first)
        if summary is None:
            raise ApiError(404, f"no emissions of {customer_id} for {month}")
        rows = summary_rows(summary)
        total = {k: v for k, v in rows[-1].items() if k != "unit_id"}  # the last row is the total
        return _json(
            {
                "customer_id": customer_id,
                "month": month,
                "fiscal_year": fiscal_year(first),
                "location_factor": _factor(summary.location),
                "market_factor": _factor(summary.market),
                "units": rows[:-1],
                "total": total,
                "notes": summary.notes,
            }
        )

    def _operators_only(reader: Reader) -> None:
        if reader.customer is not None:
            raise ApiError(403, "operators only: the fleet's health is read with an operator's console session")

    @router.get("/fleet/health", response_model=FleetHealth, responses=_refusals(401, 403, 429, 503))
    async def fleet_health_api(
        reader: Caller, days: Annotated[int, Query(ge=1, le=400, description="days of the trend")] = 30
    ) -> Response:
        """Operators only: the units at risk of failing now with their reasons, counts by reason, the fleet's
        and cells' events of today and yesterday, the inventory (units by firmware, signal band, coverage level
        and reboots on their newest day), and each day's units, completeness and units at risk."""
        _operators_only(reader)
        got = await ctx.store.call(fleet_health, ctx.store, ctx.grid, ctx.registry(), ctx.clock(), days)
        return _json(
            {
                "at_risk": [_at_risk(s, customer, ctx.grid) for s, customer in got.at_risk],
                "by_reason": got.by_reason,
                "events": [
                    {"date": d, "scope": sc, "signal": sig, "units": n, "assessed": of, "words": w}
                    for d, sc, sig, n, of, w in got.events
                ],
                "inventory": {
                    k: {g: len(v) for g, v in groups.items()} for k, groups in got.inventory.groups().items()
                },
                "days": [
                    {
                        "date": t.day,
                        "units": t.units,
                        "completeness": t.completeness,
                        "assessed": t.assessed,
                        "at_risk": t.at_risk,
                    }
                    for t in got.trend
                ],
            }
        )

    @router.get("/units/{unit_id}/health", response_model=UnitHealth, responses=_refusals(401, 403, 404, 429, 503))
    async def unit_health_api(
        reader: Caller,
        unit_id: Annotated[str, PathParam(max_length=64)],
        days: Annotated[int, Query(ge=1, le=400, description="days of health records, today's included")] = 30,
    ) -> Response:
        """Operators only: a unit's daily health records (oldest first) and whether it is at risk now, why,
        and since which day."""
        _operators_only(reader)
        unit = ctx.registry().units.get(unit_id)
        if unit is None:
            raise ApiError(404, f"no unit {unit_id}")
        got = await ctx.store.call(unit_health, ctx.store, ctx.grid, unit_id, ctx.clock(), days)
        s = got.at_risk
        return _json(
            {
                "unit_id": unit_id,
                "customer_id": unit.customer,
                "at_risk": s is not None,
                "risk": s.risk if s else None,
                "since": _day(s.since, ctx.grid) if s else None,
                "reasons": list(s.reasons) if s else [],
                "days": got.days,
            }
        )

    def _may_change(reader: Reader, request: Request) -> str:
        """The operator who asks for a change (`console:<name>`); 403 for a customer, or for a session's request
        without its CSRF token (another site's page may make a browser send the cookie, never the header)."""
        _operators_only(reader)
        if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), reader.csrf):
            raise ApiError(403, f"a change needs the {CSRF_HEADER} header with the console session's CSRF token")
        if not may(reader.role, "operator"):
            raise ApiError(403, f"refused: a change needs the role operator, and {reader.who}'s role is {reader.role}")
        return "console:" + reader.who.removeprefix("operator ")

    async def _body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise ApiError(413, f"a body of over {MAX_BODY // 1024} KiB is refused")
        return bytes(body)

    @router.get("/commands", response_model=Commands, responses=_refusals(400, 401, 403, 429, 503))
    async def commands(
        reader: Caller,
        unit: Annotated[str | None, Query(max_length=64, description="only this unit's")] = None,
        state: Annotated[str | None, Query(max_length=16, description="only those in this state")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        """Operators only: the newest commands to units, newest first, with their state and the unit's answer."""
        _operators_only(reader)
        if state is not None and state not in STATES:
            raise ApiError(400, f"state: one of {', '.join(STATES)}")
        rows = await ctx.store.call(ctx.store.commands, unit, limit, state)
        return _json({"commands": [_command(r, ctx.grid) for r in rows]})

    @router.get("/commands/{command_id}", response_model=Command, responses=_refusals(401, 403, 404, 429, 503))
    async def command(reader: Caller, command_id: Annotated[str, PathParam(max_length=64)]) -> Response:
        """Operators only: one command, with its state and the unit's answer."""
        _operators_only(reader)
        row = await ctx.store.call(ctx.store.command, command_id)
        if row is None:
            raise ApiError(404, f"no command {command_id}")
        return _json(_command(row, ctx.grid))

    @router.post(
        "/commands",
        status_code=201,
        response_model=Commands,
        responses=_refusals(400, 401, 403, 413, 429, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": NewCommand.model_json_schema()}},
            }
        },
    )
    async def queue(reader: Caller, request: Request) -> Response:
        """Operators only (with the `X-CSRF-Token` header): queue a command for the listed units or every unit
        of a customer; the leading node sends it. Its arguments are checked first, as `smame units cmd`'s."""
        who = _may_change(reader, request)
        try:
            asked = NewCommand.model_validate_json(await _body(request))
        except ValidationError as exc:
            errors = exc.errors()
            where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
            raise ApiError(400, f"{where or 'body'}: {errors[0]['msg'] if errors else 'invalid'}") from None
        try:
            if asked.customer is not None and asked.units:
                raise CommandError("give units or a customer, not both")
            op_args = check_args(asked.op, asked.args)
            chosen = targets(ctx.registry(), asked.units, asked.customer)
        except CommandError as exc:
            raise ApiError(400, str(exc)) from None
        now = int(ctx.clock())
        expires = now + (asked.expires_s or ctx.command_expiry_s)
        address = client_of(request)
        text = json.dumps(op_args, separators=(",", ":"))
        rows = await ctx.store.call(ctx.store.queue_commands, asked.op, text, chosen, now, expires, who, address)
        log.info("%s queued %d command(s) %s over the API", who, len(rows), asked.op)
        return Response(_encode({"commands": [_command(r, ctx.grid) for r in rows]}), 201, media_type=JSON)

    @router.post(
        "/commands/{command_id}/cancel", response_model=Command, responses=_refusals(401, 403, 404, 409, 429, 503)
    )
    async def cancel(
        reader: Caller, request: Request, command_id: Annotated[str, PathParam(max_length=64)]
    ) -> Response:
        """Operators only (with the `X-CSRF-Token` header): withdraw a command that is still queued."""
        who = _may_change(reader, request)
        address = client_of(request)
        if not await ctx.store.call(ctx.store.cancel_command, command_id, int(ctx.clock()), who, address):
            if await ctx.store.call(ctx.store.command, command_id) is None:
                raise ApiError(404, f"no command {command_id}")
            raise ApiError(409, "that command is no longer queued: it cannot be withdrawn")
        row = await ctx.store.call(ctx.store.command, command_id)
        assert row is not None
        return _json(_command(row, ctx.grid))

    app.include_router(router)
    return app


def _command(r: CommandRow, grid: Grid) -> dict[str, Any]:
    return {
        "command_id": r.id,
        "unit_id": r.unit,
        "op": r.op,
        "args": json.loads(r.args),
        "state": r.state,
        "created": _instant(r.created, grid),
        "changed": _instant(r.changed, grid),
        "expires": _instant(r.expires, grid),
        "asked_by": r.who,
        "asked_from": r.origin,
        "tries": r.tries,
        "detail": r.detail,
        "answer": json.loads(r.answer) if r.answer else None,
    }


def _day(start: int, grid: Grid) -> date:
    return datetime.fromtimestamp(start, grid.zone).date()


def _at_risk(s: Standing, customer: str, grid: Grid) -> dict[str, Any]:
    return {
        "unit_id": s.unit,
        "customer_id": customer,
        "risk": s.risk,
        "since": _day(s.since, grid),
        "assessed": _day(s.day, grid),
        "reasons": list(s.reasons),
    }


def _factor(used: tuple[str, str] | None) -> dict[str, str] | None:
    return None if used is None else {"t_per_kwh": used[0], "published": used[1]}


_encode = msgspec.json.Encoder().encode


JSON = "application/json"


def _json(payload: dict[str, Any]) -> Response:
    # encoded here, not through the response model: 2,160 slots in well under a millisecond
    return Response(_encode(payload), media_type=JSON)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _instant(epoch: int | None, grid: Grid) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, grid.zone).isoformat()


# A fleet's slots have few distinct values and flags: each is formatted once (Fractions and IntFlags are slow).
_kwh = functools.lru_cache(maxsize=65536)(format_kwh)
_flags = functools.lru_cache(maxsize=1024)(lambda flags: tuple(flag_names(flags)))


def slot_values(row: SlotRow | None, include_export: bool) -> dict[str, Any]:
    """A slot's kWh, quality and flags as the API shows them: as in the customer's CSV file (long layout)."""
    if row is None:
        return {"import_kwh": None, "export_kwh": None, "quality": "M", "flags": ()}
    imp = exp = None
    scaled = row.e1 is not None and row.coef is not None
    if row.imp is not None and scaled:
        imp = _kwh(row.imp, row.e1, row.coef)
    quality, flags = row.imp_q or "M", row.imp_flags
    if include_export:
        if row.exp is not None and scaled:
            exp = _kwh(row.exp, row.e1, row.coef)
        if row.exp_q is not None and _RANK.get(row.exp_q, 2) < _RANK.get(quality, 2):
            quality = row.exp_q
        flags |= row.exp_flags
    return {"import_kwh": imp, "export_kwh": exp, "quality": quality, "flags": _flags(flags)}
