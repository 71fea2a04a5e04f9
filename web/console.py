"""The operators' console: pages for people, beside the API, on the same server.

Operators log in with a name and password (`smame operators add`); the session is an HttpOnly, SameSite=Strict
cookie whose row in the store holds the session's CSRF token, which every form posts back. A wrong password is
slowed down and counted on the node's one ban list, as on the file gateway. Pages are rendered on the server
(Jinja2) and need nothing beyond the smame host.
"""

import asyncio
import csv
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

import segno
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from aggregator.campaigns import change_phase, create_campaign, read_plan
from aggregator.desired import SCOPES, check_target, read_desired, steps_now, text, wanted
from aggregator.store import CommandRow, QuarantineRow, SlotRow
from csv_export.co2 import month_summary, summary_rows
from csv_export.exporter import SUCCEEDED
from csv_export.files import NAME
from csv_export.jobs import SUMMARY_NAME
from ftp_gateway.accounts import normalize
from kernel.commands import OPS, CommandError, State, check_args, parse_arg_pairs, targets
from kernel.commands import STATES as COMMAND_STATES
from kernel.emissions import fiscal_year
from kernel.firmware import STEPS, check_plan, wave_sizes
from kernel.meter import E1_UNITS
from kernel.reading import REASONS
from kernel.timegrid import SLOT
from monitoring import alerts
from monitoring.alert_log import HISTORY_LIMIT, AlertLog
from monitoring.at_risk import SIGNALS
from monitoring.fleet import STATES, by_customer, fleet_states, state_of
from monitoring.outbox_table import OutboxTable
from web.access import (
    SESSION_COOKIE,
    AccessError,
    Operators,
    Session,
    Sessions,
    may,
    new_totp_secret,
    totp_uri,
)
from web.api import slot_values
from web.context import NO_FILES, WebContext, client_of
from web.fleet_health import fleet_health, unit_health
from web.overview import Share, completeness_map, customer_shares

HERE = Path(__file__).parent
log = logging.getLogger("smame.web")
LOGIN_CSRF = "smame_login_csrf"  # the login form's token, before there is a session (double-submit cookie)
PAGE = 50  # units a page
MAP_PAGE = 20  # units a page of a customer's completeness map (each a row of up to 45 days)
QUARANTINE_PAGE = 50  # newest refused telegrams shown
SHARES_S = 60.0  # the fleet's completeness by customer is counted again at most this often (a scan of 2 days)
MAX_FORM = 8 * 1024
MAX_FIELDS = 12  # fields of a posted form (the largest, a campaign's, has 10)
TOO_BIG = f"a form of over {MAX_FORM} bytes or {MAX_FIELDS} fields is refused"
MAX_SILENCE_S = 7 * 86400  # a kind of alert is silenced for a week at most: a silence must not be forgotten
HEALTH_S = 300.0  # the fleet's health and trend are read again this often (a scan of the retention), and after a pass
TREND_DAYS = 90  # days of the fleet page's trend
RISK_SORTS = ("risk", "since", "unit", "customer")
COMMANDS_PAGE = 100  # newest commands shown
AUDIT_PAGE = 100  # audit entries a page
AUDIT_CSV = 100_000  # audit entries in one CSV export at most (the newest)
UNIT_COMMANDS = 10  # newest commands on a unit's page
STEPS_PAGE = 200  # units out of step listed
CAMPAIGNS_PAGE = 50  # newest campaigns listed
MAX_EXPIRY_H = 30 * 24  # the longest life a command may be given (devices.expiry_s's bound)
ENROL_PAGE = "/account"  # an operator's own page: its role, and its second factor enrolled there
TOTP_SECRET = re.compile(r"[A-Z2-7]{32}")  # a key the enrolment page made (`new_totp_secret`)
HISTORY_STATES = ("firing", "repeat", "resolved", "event", "acknowledged", "silenced", "unsilenced")


def add_console(app: FastAPI, ctx: WebContext) -> None:
    """Add the console's pages and its static files to the app (none of them in the API's document)."""
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals["this_node"] = ctx.node  # every page's header says which node answers
    templates.env.filters["counted"] = counted
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    sessions, operators = Sessions(ctx.store), Operators(ctx.store)

    async def session_of(request: Request) -> Session | None:
        secret = request.cookies.get(SESSION_COOKIE, "")
        return await ctx.store.call(sessions.get, secret, int(ctx.clock())) if secret else None

    def must_enrol(session: Session) -> bool:
        """Whether the operator may do nothing before it has a second factor (web.require_2fa)."""
        return ctx.require_2fa and not session.two_factor

    async def logged_in(request: Request) -> Session:
        """The page's operator session; without one, the answer is the login page, and for an operator who
        must enrol a second factor first, the enrolment page."""
        session = await session_of(request)
        if session is None:
            raise _LoginFirst
        if must_enrol(session):
            raise _EnrolFirst
        return session

    async def login_first(request: Request, exc: Exception) -> Response:
        return RedirectResponse("/login", 303)

    async def enrol_first(request: Request, exc: Exception) -> Response:
        return RedirectResponse(ENROL_PAGE, 303)

    app.add_exception_handler(_LoginFirst, login_first)
    app.add_exception_handler(_EnrolFirst, enrol_first)
    Operator = Annotated[Session, Depends(logged_in)]

    async def form(request: Request) -> dict[str, str] | None:
        """The posted form's fields, or None when its body is over MAX_FORM (read no further than that) or it
        has over MAX_FIELDS fields."""
        if int(request.headers.get("content-length", "0") or "0") > MAX_FORM:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return None
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=MAX_FIELDS)
        except ValueError:  # more fields than any form of the console has
            return None
        return {k: v[0] for k, v in fields.items()}

    def login_page(request: Request, error: str = "", status: int = 200) -> Response:
        token = secrets.token_urlsafe(32)
        page = templates.TemplateResponse(request, "login.html", {"csrf": token, "error": error}, status_code=status)
        page.set_cookie(LOGIN_CSRF, token, httponly=True, samesite="strict", secure=_secure(request), path="/login")
        return page

    @app.get("/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        return login_page(request)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        address = client_of(request)
        if ctx.bans.banned(address):
            return PlainTextResponse("too many failed attempts from this address: try again later", 429)
        fields = await form(request)
        if fields is None:
            return PlainTextResponse(TOO_BIG, 413)
        expected = request.cookies.get(LOGIN_CSRF, "")
        if not expected or not hmac.compare_digest(fields.get("csrf", ""), expected):
            return PlainTextResponse("missing or wrong CSRF token: load the login page again", 403)
        name, password = fields.get("name", "")[:64], fields.get("password", "")[:1024]
        code = fields.get("code", "")[:32]
        stored = await ctx.store.call(operators.hash_of, name)
        ok = await asyncio.get_running_loop().run_in_executor(None, operators.verify, password, stored)
        how = "password"
        if ok and await ctx.store.call(operators.has_second_factor, name):
            second = await ctx.store.call(operators.check_second, name, code, ctx.clock())
            ok, how = second is not None, f"password and {second or 'a wrong code'}"
        if not ok:
            # (the same words whichever was wrong: a guesser learns nothing of the password from them)
            ctx.bans.failed(address, f"operator {name}", "the console")
            await ctx.store.call(
                ctx.store.record_audit, int(ctx.clock()), "console", address, "login failed", name, how
            )
            await asyncio.sleep(ctx.fail_delay_s)
            return login_page(request, "Wrong name, password or code.", 401)
        secret = await ctx.store.call(sessions.open, name, int(ctx.clock()))
        await ctx.store.call(ctx.store.record_audit, int(ctx.clock()), f"console:{name}", address, "login", name, how)
        done = RedirectResponse("/", 303)
        done.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="strict", secure=_secure(request), path="/")
        done.delete_cookie(LOGIN_CSRF, path="/login")
        return done

    async def operator_form(request: Request, need: str = "operator") -> tuple[Session, dict[str, str]] | Response:
        """A logged-in operator's posted form with its session's CSRF token, from an operator whose role is at
        least `need` (and who has a second factor where one is required), or the answer refusing it."""
        session = await session_of(request)
        fields = await form(request)
        if session is None:
            return RedirectResponse("/login", 303)
        if fields is None:
            return PlainTextResponse(TOO_BIG, 413)
        if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
            return PlainTextResponse("missing or wrong CSRF token", 403)
        if need != "viewer" and must_enrol(session):
            return PlainTextResponse(f"enrol a second factor first: {ENROL_PAGE}", 403)
        if not may(session.role, need):
            refusal = f"refused: this needs the role {need}, and {session.operator}'s role is {session.role}"
            return PlainTextResponse(refusal, 403)
        return session, fields

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        got = await operator_form(request, "viewer")
        if isinstance(got, Response):
            return got
        await ctx.store.call(sessions.close, request.cookies.get(SESSION_COOKIE, ""))
        done = RedirectResponse("/login", 303)
        done.delete_cookie(SESSION_COOKIE, path="/")
        return done

    async def account_page(
        request: Request, session: Session, codes: Sequence[str] = (), error: str = "", status: int = 200
    ) -> Response:
        """The operator's own page: its role, and its second factor (enrolled, or a new key to enrol)."""
        secret = new_totp_secret()
        left = 0
        if session.two_factor and not codes:
            listed = await ctx.store.call(operators.list)
            left = next((o.recovery_left for o in listed if o.name == session.operator), 0)
        context = {
            "session": session,
            "required": must_enrol(session),
            "secret": secret,
            "qr": segno.make(totp_uri(session.operator, secret)).svg_inline(scale=4, title="authenticator key"),
            "codes": codes,
            "recovery_left": left,
            "error": error,
        }
        return templates.TemplateResponse(request, "account.html", context, status_code=status)

    @app.get(ENROL_PAGE, include_in_schema=False, response_class=HTMLResponse)
    async def account(request: Request) -> Response:
        session = await session_of(request)
        if session is None:
            return RedirectResponse("/login", 303)
        return await account_page(request, session)

    @app.post(ENROL_PAGE + "/2fa", include_in_schema=False)
    async def enrol(request: Request) -> Response:
        got = await operator_form(request, "viewer")
        if isinstance(got, Response):
            return got
        session, fields = got
        if session.two_factor:
            return PlainTextResponse("you have an authenticator already: an administrator resets it first", 409)
        secret = fields.get("secret", "")
        if not TOTP_SECRET.fullmatch(secret):
            return PlainTextResponse("the form's key is not one this page made: load it again", 400)
        # the password again: a session taken over (a browser left open) must not lock its operator out with a
        # stranger's authenticator; a wrong one counts toward the address's ban as at the login
        address = origin(request)
        stored = await ctx.store.call(operators.hash_of, session.operator)
        password = fields.get("password", "")[:1024]
        if not await asyncio.get_running_loop().run_in_executor(None, operators.verify, password, stored):
            ctx.bans.failed(address, f"operator {session.operator}", "the console")
            await asyncio.sleep(ctx.fail_delay_s)
            return await account_page(request, session, error="Wrong password.", status=401)
        try:
            code = fields.get("code", "")[:32]
            codes = await ctx.store.call(operators.enrol, session.operator, secret, code, ctx.clock())
        except AccessError as exc:
            return await account_page(request, session, error=str(exc), status=400)
        now, action = int(ctx.clock()), "second factor enrolled"
        await ctx.store.call(ctx.store.record_audit, now, who(session), origin(request), action, session.operator)
        return await account_page(request, replace(session, two_factor=True), codes)

    shares: dict[str, Any] = {"at": -math.inf}  # the fleet's completeness by customer, as last counted

    def count_shares(now: int) -> dict[str, Any]:
        """Each customer's share of today's closed half hours and yesterday's (on the store's thread)."""
        registry = ctx.registry()
        customer_of = {u.id: u.customer for u in registry.units.values()}
        today = ctx.grid.day_of(ctx.grid.floor(now) + SLOT)
        out: dict[str, Any] = {"at": now}
        for name, day in (("today", today), ("yesterday", today - timedelta(days=1))):
            ends = [e for e in ctx.grid.day_slots(day) if e <= now]
            counts = ctx.store.unit_quality_counts(ends[0] - SLOT, ends[-1]) if ends else []
            out[name] = customer_shares(counts, customer_of, len(ends))
        return out

    def health(now: float) -> dict[str, Any]:
        """Export and delivery as the store and this node's exporter tell them (on the store's thread)."""
        raw = ctx.store.get_meta(alerts.STATE_KEY, "{}")
        pending, oldest, gave_up, error = OutboxTable(ctx.store).health(now - 86400)
        export = ctx.export
        return {
            "alerts": sorted((alerts.load_state(raw) or {}).items(), key=lambda kv: kv[1].since),
            "exported": float(ctx.store.get_meta(SUCCEEDED, "0") or 0),
            "nodes": ctx.store.nodes(),
            "export_failures": export.failures if export else None,
            "export_error": export.last_error if export else "",
            "pending": pending,
            "oldest": oldest,
            "gave_up": gave_up,
            "delivery_error": error,
        }

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def fleet(request: Request, session: Operator, q: str = "", state: str = "", page: int = 1) -> Response:
        registry = ctx.registry()
        units = sorted(registry.units.values(), key=lambda u: u.id)
        last = await ctx.store.call(ctx.store.last_readings, [u.id for u in units])
        now = ctx.clock()
        if now - shares["at"] >= SHARES_S or now < shares["at"]:
            shares.update(await ctx.store.call(count_shares, int(now)))
        states = fleet_states(units, last, now, ctx.silent_after_s)
        q, state = q.strip()[:64], state if state in STATES else ""
        chosen = [
            s
            for s in states
            if (not state or s.state == state) and (not q or q in s.unit or q == s.customer or q in s.label)
        ]
        pages = max(1, math.ceil(len(chosen) / PAGE))
        page = min(max(page, 1), pages)
        rows = [
            {**_fields(s), "last_text": _local(s.last, ctx) if s.last is not None else "never"}
            for s in chosen[(page - 1) * PAGE : page * PAGE]
        ]
        silent = sorted((s for s in states if s.state == "silent"), key=lambda s: (s.last or 0, s.unit))
        about = await ctx.store.call(health, now)
        seen = await fleet_now()
        got = seen["health"]
        trend = {
            "zone": ctx.grid.name,
            "days": [ctx.grid.day_start(t.day) for t in got.trend],
            "completeness": [None if t.completeness is None else round(100 * t.completeness, 2) for t in got.trend],
            "at_risk": [t.at_risk for t in got.trend],
            "hours": [h for h, _ in seen["hours"]],
            "telegrams": [n for _, n in seen["hours"]],
        }
        context = {
            "session": session,
            "at_risk": len(got.at_risk),
            "at_risk_reasons": [(SIGNALS.get(k, k), n) for k, n in got.by_reason.items()],
            "trend": trend,
            "states": STATES,
            "customers": [
                (c, counts, shares["today"].get(c, Share()), shares["yesterday"].get(c, Share()))
                for c, counts in by_customer(states).items()
            ],
            "shares_at": _local(int(shares["at"]), ctx),
            "total": len(states),
            "now": _local(int(now), ctx),
            "silent": [{**_fields(s), "last_text": _local(s.last or 0, ctx)} for s in silent[:10]],
            "silent_count": len(silent),
            "alerts": [
                {"title": alerts.TITLES.get(name, name), "since": _local(int(a.since), ctx), "text": a.text}
                for name, a in about["alerts"]
            ],
            "exported": _local(int(about["exported"]), ctx) if about["exported"] else "never",
            "export_age_s": now - about["exported"] if about["exported"] else None,
            "about": about,
            "oldest": _local(int(about["oldest"]), ctx) if about["oldest"] else "",
            "nodes": [_node_row(node, beat, row, now, ctx) for node, beat, row in about["nodes"]],
            "broker": _broker_rows(about["nodes"], ctx.node()),
            "q": q,
            "state": state,
            "rows": rows,
            "matched": len(chosen),
            "page": page,
            "pages": pages,
        }
        return templates.TemplateResponse(request, "fleet.html", context)

    @app.get("/quarantine", include_in_schema=False, response_class=HTMLResponse)
    async def quarantine(request: Request, session: Operator, reason: str = "") -> Response:
        reason = reason if reason in REASONS else ""
        counts = await ctx.store.call(ctx.store.quarantine_counts)
        items = await ctx.store.call(ctx.store.quarantine, reason or None, QUARANTINE_PAGE)
        units = ctx.registry().units
        context = {
            "session": session,
            "counts": sorted(counts.items()),
            "reason": reason,
            "items": [
                {**_refused(q, ctx), "unit": q.unit or "", "known": q.unit in units, "topic": q.topic[:200]}
                for q in items
            ],
        }
        return templates.TemplateResponse(request, "quarantine.html", context)

    history = AlertLog(ctx.store)

    @app.get("/alerts", include_in_schema=False, response_class=HTMLResponse)
    async def alerts_page(
        request: Request, session: Operator, kind: str = "", state: str = "", node: str = "", days: int = 7
    ) -> Response:
        now = ctx.clock()
        days = min(max(days, 1), 366)
        kind = kind if kind in alerts.TITLES else ""
        state = state if state in HISTORY_STATES else ""
        node = node.strip()[:100]

        def read() -> tuple[Any, ...]:
            since = now - days * 86400
            raw = ctx.store.get_meta(alerts.STATE_KEY, "{}")
            active = sorted((alerts.load_state(raw) or {}).items(), key=lambda kv: kv[1].since)
            got = history.controls(), history.history(since, kind, state, node), history.nodes(since)
            return active, *got, ctx.store.bans(now)

        active, controls, entries, nodes, bans = await ctx.store.call(read)
        context = {
            "session": session,
            "active": [
                {
                    "name": name,
                    "title": alerts.TITLES.get(name, name),
                    "since": _local(int(a.since), ctx),
                    "since_raw": repr(a.since),
                    "text": a.text,
                    "ack": (
                        f"{ack.who}, {_local(int(ack.at), ctx)}"
                        if (ack := controls.acks.get(name)) is not None and ack.since == a.since
                        else ""
                    ),
                }
                for name, a in active
            ],
            "silences": [
                {"name": name, "title": alerts.TITLES.get(name, name), "until": _local(int(s.until), ctx), "who": s.who}
                for name, s in sorted(controls.silences.items())
                if s.until > now
            ],
            "bans": [
                {"address": a, "door": door, "since": _local(int(at), ctx), "until": _local(int(end), ctx), "node": n}
                for a, door, at, end, n in bans
            ],
            "titles": sorted(alerts.TITLES.items()),
            "states": HISTORY_STATES,
            "nodes": nodes,
            "kind": kind,
            "state": state,
            "node": node,
            "days": days,
            "entries": [
                {
                    "at": _local(int(e.at), ctx),
                    "title": alerts.TITLES.get(e.name, e.name),
                    "state": e.state,
                    "text": e.text,
                    "node": e.node,
                    "who": e.who,
                    "told": e.told,
                }
                for e in entries
            ],
            "limit": HISTORY_LIMIT,
        }
        return templates.TemplateResponse(request, "alerts.html", context)

    @app.post("/alerts/acknowledge", include_in_schema=False)
    async def acknowledge(request: Request) -> Response:
        got = await operator_form(request)
        if isinstance(got, Response):
            return got
        session, fields = got
        name = fields.get("name", "")

        def ack() -> bool:
            active = alerts.load_state(ctx.store.get_meta(alerts.STATE_KEY, "{}")) or {}
            alert = active.get(name)
            if alert is None or repr(alert.since) != fields.get("since"):
                return False  # cleared meanwhile, or another alert of the kind: not what the operator saw
            history.acknowledge(name, alert.since, session.operator, this_node(), ctx.clock())
            ctx.store.record_audit(int(ctx.clock()), who(session), origin(request), "alert acknowledged", name)
            return True

        if not await ctx.store.call(ack):
            return PlainTextResponse("that alert holds no more: nothing to acknowledge", 409)
        return RedirectResponse("/alerts", 303)

    @app.post("/alerts/silence", include_in_schema=False)
    async def silence(request: Request) -> Response:
        got = await operator_form(request)
        if isinstance(got, Response):
            return got
        session, fields = got
        name, hours = fields.get("name", ""), fields.get("hours", "")
        if name not in alerts.TITLES:
            return PlainTextResponse("no such kind of alert", 400)
        try:
            span = float(hours) * 3600
        except ValueError:
            span = math.nan
        if not 0 <= span <= MAX_SILENCE_S:  # also NaN
            return PlainTextResponse(f"hours: a number from 0 (lift the silence) to {MAX_SILENCE_S // 3600}", 400)
        now = ctx.clock()
        await ctx.store.call(
            history.silence, name, now + span, _local(int(now + span), ctx), session.operator, this_node(), now
        )
        action, until = ("alert silenced", f"until {_local(int(now + span), ctx)}") if span else ("silence lifted", "")
        await ctx.store.call(ctx.store.record_audit, int(now), who(session), origin(request), action, name, until)
        return RedirectResponse("/alerts", 303)

    @app.post("/bans/lift", include_in_schema=False)
    async def lift_ban(request: Request) -> Response:
        got = await operator_form(request)
        if isinstance(got, Response):
            return got
        session, fields = got
        address = normalize(fields.get("address", "")[:100])
        if not await ctx.store.call(ctx.store.lift_ban, address):
            return PlainTextResponse("that address is not banned (any more)", 409)
        ctx.bans.lift(address)  # here at once; the other nodes at their next look at the store
        await ctx.store.call(
            ctx.store.record_audit, int(ctx.clock()), who(session), origin(request), "ban lifted", address
        )
        log.info("operator %s lifted the ban of %s", session.operator, address)
        return RedirectResponse("/alerts", 303)

    @app.get("/commands", include_in_schema=False, response_class=HTMLResponse)
    async def commands_page(request: Request, session: Operator, unit: str = "", state: str = "") -> Response:
        return await commands_view(request, session, unit, state)

    async def commands_view(
        request: Request,
        session: Session,
        unit: str,
        state: str,
        error: str = "",
        filled: dict[str, str] | None = None,
        status: int = 200,
    ) -> Response:
        """The commands page: the newest commands (of a unit, in a state) and the form that sends one."""
        unit, state = unit.strip()[:64], state if state in COMMAND_STATES else ""
        rows = await ctx.store.call(ctx.store.commands, unit or None, COMMANDS_PAGE, state or None)
        context = {
            "session": session,
            "unit": unit,
            "state": state,
            "states": COMMAND_STATES,
            "ops": OPS,
            "rows": [_command(r, ctx) for r in rows],
            "limit": COMMANDS_PAGE,
            "error": error,
            "filled": filled or {"units": unit},
            "expiry_h": round(ctx.command_expiry_s / 3600, 2),
        }
        return templates.TemplateResponse(request, "commands.html", context, status_code=status)

    @app.post("/commands", include_in_schema=False)
    async def send_command(request: Request) -> Response:
        got = await operator_form(request)
        if isinstance(got, Response):
            return got
        session, fields = got
        op, customer = fields.get("op", ""), fields.get("customer", "").strip() or None
        units = [u for u in re.split(r"[\s,]+", fields.get("units", "")) if u]
        try:
            op_args = check_args(op, parse_arg_pairs(fields.get("args", "").split()))
            if customer is not None and units:
                raise CommandError("give units or a customer, not both")
            chosen = targets(ctx.registry(), units, customer)
            life = _life(fields.get("expires_h", ""), ctx.command_expiry_s)
        except CommandError as exc:
            return await commands_view(request, session, "", "", str(exc), fields, 400)
        now, text = int(ctx.clock()), json.dumps(op_args, separators=(",", ":"))
        rows = await ctx.store.call(
            ctx.store.queue_commands, op, text, chosen, now, now + life, who(session), origin(request)
        )
        log.info("operator %s queued %d command(s) %s", session.operator, len(rows), op)
        return RedirectResponse(f"/commands?unit={quote(chosen[0])}" if len(chosen) == 1 else "/commands", 303)

    @app.post("/commands/cancel", include_in_schema=False)
    async def cancel_command(request: Request) -> Response:
        got = await operator_form(request)
        if isinstance(got, Response):
            return got
        session, fields = got
        command_id = fields.get("id", "")[:64]
        now = int(ctx.clock())
        if not await ctx.store.call(ctx.store.cancel_command, command_id, now, who(session), origin(request)):
            return PlainTextResponse("that command is no longer queued: it cannot be withdrawn", 409)
        return RedirectResponse("/commands", 303)

    @app.get("/configuration", include_in_schema=False, response_class=HTMLResponse)
    async def configuration_page(request: Request, session: Operator) -> Response:
        return await configuration_view(request, session)

    async def configuration_view(
        request: Request, session: Session, error: str = "", filled: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        """The desired configurations, the form that changes them, and the units out of step."""
        registry = ctx.registry()

        def read() -> tuple[Any, ...]:
            return ctx.store.desired(), steps_now(ctx.store, registry)

        desired, steps = await ctx.store.call(read)
        context = {
            "session": session,
            "scopes": SCOPES,
            "desired": [
                {"scope": sc, "target": t, "config": c, "who": w, "at": _local(at, ctx)}
                for sc, t, c, w, _, at in desired
            ],
            "steps": [
                {
                    "unit": st.unit,
                    "customer": st.customer,
                    "differs": text(st.differs),
                    "reported": text(st.reported) if st.reported else "",
                    "reported_at": _local(st.reported_at, ctx) if st.reported_at else "",
                    "tried": f"{st.last_try[3] or 'forgotten'} {_local(st.last_try[1], ctx)}" if st.last_try else "",
                }
                for st in steps[:STEPS_PAGE]
            ],
            "out_of_step": len(steps),
            "limit": STEPS_PAGE,
            "error": error,
            "filled": filled or {},
        }
        return templates.TemplateResponse(request, "configuration.html", context, status_code=status)

    @app.post("/configuration", include_in_schema=False)
    async def change_configuration(request: Request) -> Response:
        got = await operator_form(request, "admin")
        if isinstance(got, Response):
            return got
        session, fields = got
        scope, clear = fields.get("scope", ""), fields.get("action") == "clear"
        try:
            target = check_target(ctx.registry(), scope, fields.get("target", "").strip())
            config = None if clear else check_args("set", parse_arg_pairs(fields.get("args", "").split()))
        except CommandError as exc:
            return await configuration_view(request, session, str(exc), fields, 400)
        now = int(ctx.clock())
        await ctx.store.call(ctx.store.want, scope, target, config, who(session), origin(request), now)
        return RedirectResponse("/configuration", 303)

    @app.get("/campaigns", include_in_schema=False, response_class=HTMLResponse)
    async def campaigns_page(request: Request, session: Operator) -> Response:
        return await campaigns_view(request, session)

    async def campaigns_view(
        request: Request, session: Session, error: str = "", filled: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        """The firmware images, the newest campaigns with their counts, and the form that starts one."""

        def read() -> tuple[Any, ...]:
            rows = [(c, ctx.store.campaign_counts(c.id)) for c in ctx.store.campaigns(CAMPAIGNS_PAGE)]
            return ctx.store.firmwares(), rows

        images, rows = await ctx.store.call(read)
        context = {
            "session": session,
            "images": [
                {"version": v, "sha256": h, "size": n, "added": _local(a, ctx), "who": w} for v, h, n, a, w in images
            ],
            "campaigns": [
                {
                    "id": c.id,
                    "name": c.name,
                    "version": c.version,
                    "phase": c.phase,
                    "created": _local(c.created, ctx),
                    "total": c.total,
                    "counts": [(step, counts.get(step, 0)) for step in STEPS],
                    "detail": c.detail,
                }
                for c, counts in rows
            ],
            "error": error,
            "filled": filled or {"waves": "1,10,50,100", "timeout": "3600", "abort_share": "0.1", "abort_min": "10"},
            "firmware_url": ctx.firmware_url,
        }
        return templates.TemplateResponse(request, "campaigns.html", context, status_code=status)

    @app.post("/campaigns", include_in_schema=False)
    async def start_campaign(request: Request) -> Response:
        got = await operator_form(request, "admin")
        if isinstance(got, Response):
            return got
        session, fields = got
        kind, value = fields.get("target_kind", ""), fields.get("target", "").strip()
        try:
            if not ctx.firmware_url:
                raise CommandError("devices.firmware_url is not set: units would not know where to fetch images")
            if kind not in ("customer", "from_version", "units"):
                raise CommandError("target: a customer, a firmware version or a list of units")
            target: dict[str, Any] = {kind: [u for u in re.split(r"[\s,]+", value) if u] if kind == "units" else value}
            waves = [] if fields.get("rate", "").strip() else _numbers(fields.get("waves", ""), "waves")
            plan = check_plan(
                waves,
                int(_numbers(fields.get("rate", "") or "0", "rate")[0]),
                int(_numbers(fields.get("timeout", ""), "timeout")[0]),
                _numbers(fields.get("abort_share", ""), "abort share")[0],
                int(_numbers(fields.get("abort_min", ""), "abort minimum")[0]),
            )
            now = int(ctx.clock())
            c = await ctx.store.call(
                create_campaign,
                ctx.store,
                ctx.registry(),
                fields.get("version", ""),
                target,
                plan,
                now,
                who(session),
                origin(request),
            )
        except CommandError as exc:
            return await campaigns_view(request, session, str(exc), fields, 400)
        return RedirectResponse(f"/campaigns/{c.id}", 303)

    @app.get("/campaigns/{campaign_id}", include_in_schema=False, response_class=HTMLResponse)
    async def campaign_page(request: Request, session: Operator, campaign_id: str) -> Response:
        c = await ctx.store.call(ctx.store.campaign, campaign_id[:40])
        if c is None:
            return await not_found(request, session, "campaign", campaign_id)
        plan = read_plan(c.plan)
        sizes = wave_sizes(plan, c.total)

        def read() -> tuple[Any, ...]:
            waves = [ctx.store.campaign_span_counts(c.id, sizes[w - 1] if w else 0, n) for w, n in enumerate(sizes)]
            return ctx.store.campaign_counts(c.id), waves, ctx.store.campaign_units(c.id, "failed", 500)

        counts, waves, failed = await ctx.store.call(read)
        context = {
            "session": session,
            "c": c,
            "plan": plan,
            "counts": [(step, counts.get(step, 0)) for step in STEPS],
            "steps": STEPS,
            "waves": [
                {"n": w + 1, "units": n - (sizes[w - 1] if w else 0), "counts": [wc.get(s, 0) for s in STEPS]}
                for w, (n, wc) in enumerate(zip(sizes, waves, strict=True))
            ],
            "failed": [
                {"unit": u, "stage": stage, "at": _local(changed, ctx), "detail": detail[:300]}
                for _, u, _, _, changed, stage, detail in failed
            ],
            "failed_total": counts.get("failed", 0),
            "created": _local(c.created, ctx),
            "changed": _local(c.changed, ctx),
            "actions": {"running": ("pause", "cancel"), "paused": ("resume", "cancel")}.get(c.phase, ()),
        }
        return templates.TemplateResponse(request, "campaign.html", context)

    @app.post("/campaigns/{campaign_id}/{action}", include_in_schema=False)
    async def campaign_action(request: Request, campaign_id: str, action: str) -> Response:
        got = await operator_form(request, "admin")
        if isinstance(got, Response):
            return got
        session, _ = got
        now = int(ctx.clock())
        try:
            await ctx.store.call(change_phase, ctx.store, campaign_id[:40], action, now, who(session), origin(request))
        except CommandError as exc:
            return PlainTextResponse(str(exc), 409)
        return RedirectResponse(f"/campaigns/{quote(campaign_id[:40])}", 303)

    @app.get("/audit", include_in_schema=False, response_class=HTMLResponse)
    async def audit_page(request: Request, session: Operator, about: str = "", before: int | None = None) -> Response:
        about = about.strip()[:200]
        entries = await ctx.store.call(ctx.store.audit, AUDIT_PAGE, before, about)
        context = {
            "session": session,
            "about": about,
            "entries": [
                {"at": _local(at, ctx), "who": w, "origin": o, "action": a, "target": t, "detail": d[:300]}
                for _, at, w, o, a, t, d in entries
            ],
            "older": entries[-1][0] if len(entries) == AUDIT_PAGE else None,
            "keep_days": ctx.audit_keep_days,
        }
        return templates.TemplateResponse(request, "audit.html", context)

    @app.get("/audit.csv", include_in_schema=False)
    async def audit_csv(request: Request, session: Operator, about: str = "") -> Response:
        """The audit log's entries (those about `about`, when given) as CSV, newest first, at most AUDIT_CSV."""
        about = about.strip()[:200]
        entries = await ctx.store.call(ctx.store.audit, AUDIT_CSV, None, about)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["id", "at", "who", "from", "action", "on", "detail"])
        for i, at, w, o, a, t, d in entries:
            writer.writerow([i, _local(at, ctx), w, o, a, t, d])
        now = int(ctx.clock())
        await ctx.store.call(ctx.store.record_audit, now, who(session), origin(request), "audit exported", about)
        name = f"smame-audit-{datetime.fromtimestamp(now, ctx.grid.zone):%Y%m%d-%H%M}.csv"
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        return Response(out.getvalue().encode(), media_type="text/csv; charset=utf-8", headers=headers)

    @app.get("/customers/{customer_id}/emissions", include_in_schema=False, response_class=HTMLResponse)
    async def emissions_page(request: Request, session: Operator, customer_id: str, month: str = "") -> Response:
        customer = ctx.registry().customers.get(customer_id)
        if customer is None:
            return await not_found(request, session, "customer", customer_id)
        if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
            return PlainTextResponse("month: YYYY-MM", 400)
        first = date.fromisoformat(f"{month}-01")
        summary, why = None, ""
        if not customer.co2_columns:
            why = "the customer's files have no CO2 columns (co2_columns is off)"
        elif ctx.export is None:
            why = NO_FILES
        else:
            summary = await asyncio.get_running_loop().run_in_executor(
                None, month_summary, ctx.export_dir, customer, first
            )
        rows = summary_rows(summary) if summary is not None else []
        context = {
            "session": session,
            "customer": customer,
            "month": month,
            "why": why,
            "units": rows[:-1],
            "total": rows[-1] if rows else None,
            "fiscal_year": fiscal_year(first),
            "location": _factor_text(summary.location) if summary else "",
            "market": _factor_text(summary.market) if summary else "",
            "notes": summary.notes if summary else [],
            "api": f"/api/v1/customers/{quote(customer.id)}/emissions?month={month}",
        }
        return templates.TemplateResponse(request, "emissions.html", context)

    async def not_found(request: Request, session: Session, kind: str, name: str) -> Response:
        """The page of a unit or customer the registry does not have (404), with what it tried to send."""
        name = name[:64]
        quarantined = await ctx.store.call(ctx.store.unit_quarantine, name, 20) if kind == "unit" else []
        context = {
            "session": session,
            "kind": kind,
            "name": name,
            "quarantined": [_refused(q, ctx) for q in quarantined],
        }
        return templates.TemplateResponse(request, "missing.html", context, status_code=404)

    def this_node() -> str:
        return str(ctx.node().get("node") or "this node")

    def who(session: Session) -> str:
        return f"console:{session.operator}"

    def origin(request: Request) -> str:
        """The address an operator acts from (the proxy's client when it is trusted)."""
        return client_of(request)

    @app.get("/customers/{customer_id}", include_in_schema=False, response_class=HTMLResponse)
    async def customer_page(request: Request, session: Operator, customer_id: str, page: int = 1) -> Response:
        registry = ctx.registry()
        customer = registry.customers.get(customer_id)
        if customer is None:
            return await not_found(request, session, "customer", customer_id)
        now = int(ctx.clock())
        units = registry.units_of(customer.id)
        pages = max(1, math.ceil(len(units) / MAP_PAGE))
        page = min(max(page, 1), pages)
        shown = units[(page - 1) * MAP_PAGE : page * MAP_PAGE]
        today = ctx.grid.day_of(ctx.grid.floor(now) + SLOT)
        days = [today - timedelta(days=d) for d in range(ctx.file_days - 1, -1, -1)]
        spans = [(d, [e for e in ctx.grid.day_slots(d) if e <= now]) for d in days]
        ids = [u.id for u in shown]
        rows = await ctx.store.call(ctx.store.qualities_at, ids, [e for _, ends in spans for e in ends])
        first = await ctx.store.call(ctx.store.first_readings, ids)
        cells = completeness_map(rows, first, spans)
        last = await ctx.store.call(ctx.store.last_readings, ids)
        downloads = await ctx.store.call(ctx.store.downloads, customer.id)
        files = []  # a node that writes none lists none: what its directory may hold is no longer kept up to date
        if ctx.export is not None:
            files = await asyncio.get_running_loop().run_in_executor(None, _files, ctx.export_dir / customer.id)
        context = {
            "session": session,
            "customer": customer,
            "units": len(units),
            "days": days,
            "months": months_of(days),
            "map": [
                {
                    **_fields(s),
                    "last_text": _local(s.last, ctx) if s.last is not None else "never",
                    "cells": cells[s.unit],
                }
                for s in fleet_states(shown, last, now, ctx.silent_after_s)
            ],
            "page": page,
            "pages": pages,
            "no_files": NO_FILES if ctx.export is None else "",
            "files": [
                {
                    "name": name,
                    "link": _file_link(customer.id, name),
                    "size": size,
                    "modified": _local(int(mtime), ctx),
                    "download": _download(downloads.get(name), ctx),
                }
                for name, size, mtime in files
            ],
        }
        return templates.TemplateResponse(request, "customer.html", context)

    fleet_seen: dict[str, Any] = {"at": -math.inf}  # the fleet's health, as last read

    async def fleet_now() -> Any:
        now = ctx.clock()
        # read again after a while, and at once when a health pass has kept a newer assessment
        assessed = await ctx.store.call(ctx.store.last_assessed)
        if now - fleet_seen["at"] >= HEALTH_S or now < fleet_seen["at"] or assessed != fleet_seen.get("assessed"):
            got = await ctx.store.call(fleet_health, ctx.store, ctx.grid, ctx.registry(), now, TREND_DAYS)
            hours = await ctx.store.call(ctx.store.telegrams_by_hour, int(now) // 3600 * 3600 - 23 * 3600)
            fleet_seen.update({"at": now, "health": got, "hours": hours, "assessed": assessed})
        return fleet_seen

    @app.get("/at-risk", include_in_schema=False, response_class=HTMLResponse)
    async def at_risk_page(request: Request, session: Operator, sort: str = "risk", reason: str = "") -> Response:
        seen = await fleet_now()
        got = seen["health"]
        sort = sort if sort in RISK_SORTS else "risk"
        reason = reason if reason in SIGNALS else ""
        rows = [
            {
                "unit": s.unit,
                "customer": customer,
                "risk": s.risk,
                "since": _local(s.since, ctx)[:10],
                "since_epoch": s.since,
                "reasons": [(SIGNALS.get(str(r["signal"]), r["signal"]), r["words"]) for r in s.reasons],
            }
            for s, customer in got.at_risk
            if not reason or reason in s.signals
        ]
        key = {
            "risk": lambda r: (-r["risk"], r["unit"]),
            "since": lambda r: (r["since_epoch"], -r["risk"]),
            "unit": lambda r: r["unit"],
            "customer": lambda r: (r["customer"], -r["risk"]),
        }[sort]
        context = {
            "session": session,
            "rows": sorted(rows, key=key),
            "sort": sort,
            "reason": reason,
            "signals": SIGNALS,
            "by_reason": got.by_reason,
            "total": len(got.at_risk),
            "events": [(d.isoformat(), sc, SIGNALS.get(sig, sig), n, of, w) for d, sc, sig, n, of, w in got.events],
            "read_at": _local(int(seen["at"]), ctx),
        }
        return templates.TemplateResponse(request, "at_risk.html", context)

    @app.get("/inventory", include_in_schema=False, response_class=HTMLResponse)
    async def inventory_page(request: Request, session: Operator, by: str = "", value: str = "") -> Response:
        seen = await fleet_now()
        groups = seen["health"].inventory.groups()
        by = by if by in groups else ""
        chosen = groups[by].get(value, []) if by else []
        context = {
            "session": session,
            "groups": {
                name: [(g, len(units), len(units) / max(1, sum(map(len, gs.values())))) for g, units in gs.items()]
                for name, gs in groups.items()
            },
            "by": by,
            "value": value if chosen else "",
            "chosen": chosen[:1000],
            "more": max(0, len(chosen) - 1000),
            "read_at": _local(int(seen["at"]), ctx),
        }
        return templates.TemplateResponse(request, "inventory.html", context)

    @app.get("/units/{unit_id}", include_in_schema=False, response_class=HTMLResponse)
    async def unit_page(request: Request, session: Operator, unit_id: str, days: int = 2) -> Response:
        unit = ctx.registry().units.get(unit_id)
        if unit is None:
            return await not_found(request, session, "unit", unit_id)
        days = min(max(days, 1), ctx.max_days)
        now = int(ctx.clock())
        today = ctx.grid.day_of(ctx.grid.floor(now) + SLOT)
        ends = [e for d in range(days - 1, -1, -1) for e in ctx.grid.day_slots(today - timedelta(days=d)) if e <= now]
        rows = {r.slot: r for r in await ctx.store.call(ctx.store.slots_at, unit.id, ends)}
        include_export = ctx.registry().customers[unit.customer].include_export
        last = (await ctx.store.call(ctx.store.last_readings, [unit.id]))[unit.id]
        curve: dict[str, Any] = {"zone": ctx.grid.name, "t": [], "actual": [], "estimated": [], "export": []}
        flagged: list[dict[str, str]] = []
        missing = 0
        for e in ends:
            r = rows.get(e)
            imp = _kwh(r.imp, r) if r is not None else None
            quality = (r.imp_q if r is not None else None) or "M"
            missing += quality == "M"
            curve["t"].append(e - SLOT)  # drawn at the half hour's start
            curve["actual"].append(imp if quality == "A" else None)
            curve["estimated"].append(imp if quality == "E" else None)
            curve["export"].append(_kwh(r.exp, r) if r is not None else None)
            if r is not None and (r.imp_flags | r.exp_flags) and len(flagged) < 200:
                label = ctx.grid.label(e)
                shown = slot_values(r, include_export)  # exact, as the API and the files give them
                flagged.append(
                    {
                        "when": f"{label.day} {label.start}-{label.end}",
                        "kwh": shown["import_kwh"] or "",
                        "quality": shown["quality"],
                        "flags": ", ".join(shown["flags"]),
                    }
                )
        quarantined = await ctx.store.call(ctx.store.unit_quarantine, unit.id, 20)
        commands = await ctx.store.call(ctx.store.commands, unit.id, UNIT_COMMANDS)

        def configuration() -> tuple[dict[str, Any], tuple[str, int] | None]:
            return wanted(unit, read_desired(ctx.store.desired())), ctx.store.reported_of(unit.id)

        want, reported = await ctx.store.call(configuration)
        kept = await ctx.store.call(unit_health, ctx.store, ctx.grid, unit.id, now, max(days, 30))
        fields = ("rsrp", "sinr", "delay_p50", "reboots", "restarts", "disconnects", "clock_offset")
        series: dict[str, Any] = {"zone": ctx.grid.name, "t": [ctx.grid.day_start(d["date"]) for d in kept.days]}
        series |= {f: [d[f] for d in kept.days] for f in fields}
        newest = kept.days[-1] if kept.days else None
        standing = kept.at_risk
        context = {
            "session": session,
            "unit": unit,
            "health": series,
            "newest": newest,
            "at_risk": {
                "risk": standing.risk,
                "since": _local(standing.since, ctx)[:10],
                "reasons": [r["words"] for r in standing.reasons],
            }
            if standing
            else None,
            "quarantined": [_refused(q, ctx) for q in quarantined],
            "commands": [_command(r, ctx) for r in commands],
            "config": {
                "wanted": text(want) if want else "",
                "reported": reported[0] if reported else "",
                "reported_at": _local(reported[1], ctx) if reported else "",
                "in_step": all(json.loads(reported[0]).get(k) == v for k, v in want.items()) if reported else not want,
            },
            "ops": OPS,
            "last": _local(last, ctx) if last is not None else "never",
            "state": state_of(last, now, ctx.silent_after_s),
            "days": days,
            "curve": curve,
            "missing": missing,
            "total": len(ends),
            "flagged": flagged,
        }
        return templates.TemplateResponse(request, "unit.html", context)


class _LoginFirst(Exception):
    """A page asked for without a live session."""


class _EnrolFirst(Exception):
    """A page asked for by an operator who must enrol a second factor first."""


def _broker_rows(
    nodes: list[tuple[str, float, dict[str, object]]], this: Mapping[str, object]
) -> dict[str, object] | None:
    """The broker's cluster as the leading node last saw it (its beat carries it; on SQLite, this node, the only
    one): each broker node up or not, and smame's queue (leader, replicas online); None when none watches one."""
    seen = next((row["broker"] for _, _, row in nodes if row.get("role") == "leader" and "broker" in row), None)
    if seen is None and this.get("role") == "leader":
        seen = this.get("broker")
    if not isinstance(seen, dict):
        return None
    states = seen.get("nodes")
    rows = [
        {"node": str(name), "state": str(state), "down": state != "up"}
        for name, state in (states.items() if isinstance(states, dict) else [])
    ]
    queue, said, short = seen.get("queue"), "", False
    if isinstance(queue, dict):
        if "error" in queue:
            said = f"not known: {queue['error']}"
        else:
            members, online = queue.get("members") or [], queue.get("online") or []
            short = len(online) < len(members)
            said = (
                f"leader {queue.get('leader') or 'none'}, {len(online)} of {len(members)} replicas online, "
                f"{queue.get('messages', 0)} telegrams waiting"
            )
    return {"nodes": rows, "queue": said, "degraded": short or any(r["down"] for r in rows)}


def _node_row(node: str, beat: float, row: dict[str, object], now: float, ctx: WebContext) -> dict[str, object]:
    """One node of the nodes panel: its role, the age of its beat, and whatever keeps it from its part."""
    age = max(0.0, now - beat)
    problems = [str(row[k]) for k in ("fault", "export_error") if row.get(k)]
    if row.get("delivery_error"):
        problems.append(f"sending failing: {row['delivery_error']}")
    if row.get("reload_error"):
        problems.append(f"registry reload refused: {row['reload_error']}")
    exported = row.get("export_ok")
    offset = row.get("clock_offset")
    return {
        "node": node,
        "this": node == ctx.node().get("node"),
        "role": row.get("role", "?"),
        "epoch": row.get("epoch") or "",
        "beat": f"{age:.0f} s ago" if age < 120 else f"gone since {_local(int(beat), ctx)}",
        "gone": age >= 120,
        "exported": _local(int(exported), ctx) if isinstance(exported, int | float) and exported else "never",
        "problems": problems,
        "clock": f"{offset:+.1f} s" if isinstance(offset, int | float) else "",
        "version": row.get("version", ""),
    }


def _kwh(raw: int | None, row: SlotRow) -> float | None:
    """A register's kWh as a number to draw (the exact decimal is the API's and the files')."""
    if raw is None or row.e1 is None or row.coef is None or row.e1 not in E1_UNITS:
        return None
    return float(raw * row.coef * E1_UNITS[row.e1])


def _files(directory: Path) -> list[tuple[str, int, float]]:
    """A customer's CSV files, its monthly CO2 summaries (newest month first) before its days (newest first):
    (name, size, modified)."""
    out = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                ours = NAME.match(entry.name) or SUMMARY_NAME.match(entry.name)
                if entry.name.endswith(".csv") and ours and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    out.append((entry.name, st.st_size, st.st_mtime))
    except FileNotFoundError:
        return []
    return sorted(out, key=lambda f: (f[0].endswith("_co2.csv"), f[0]), reverse=True)


def _file_link(customer: str, name: str) -> str:
    """Where the console opens a file: the API's copy of a day's file, or the page of a month's CO2."""
    summary = SUMMARY_NAME.match(name)
    if summary:
        month = summary["month"]
        return f"/customers/{quote(customer)}/emissions?month={month[:4]}-{month[4:]}"
    return f"/api/v1/customers/{quote(customer)}/days/{name[-12:-8]}-{name[-8:-6]}-{name[-6:-4]}.csv"


def _download(row: tuple[int, str, str, int] | None, ctx: WebContext) -> str:
    if row is None:
        return ""
    at, via, who, count = row
    return f"{_local(at, ctx)} over {via} by {who}" + (f" ({count} in all)" if count > 1 else "")


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _refused(q: QuarantineRow, ctx: WebContext) -> dict[str, str]:
    """A quarantined item as the pages show it: when, why, and the payload's first bytes as text (never run)."""
    return {
        "received": _local(q.received, ctx),
        "reason": q.reason,
        "detail": q.detail[:300],
        "payload": q.payload[:120].decode("utf-8", "replace"),
    }


def _command(r: CommandRow, ctx: WebContext) -> dict[str, Any]:
    """A command as the pages show it."""
    return {
        "id": r.id,
        "unit": r.unit,
        "op": r.op,
        "args": "" if r.args == "{}" else r.args[:300],
        "state": r.state,
        "created": _local(r.created, ctx),
        "changed": _local(r.changed, ctx),
        "expires": _local(r.expires, ctx),
        "who": r.who,
        "origin": r.origin,
        "tries": r.tries,
        "detail": r.detail[:300],
        "answer": r.answer[:300],
        "queued": r.state == State.QUEUED,
    }


def _numbers(text: str, what: str) -> list[float]:
    """Comma-separated numbers from a form's field; CommandError naming the field when one is none."""
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or any(math.isnan(x) or math.isinf(x) for x in out):
        raise CommandError(f"{what}: a number (or numbers, comma-separated), not {text[:40]!r}")
    return out


def _life(hours: str, default_s: int) -> int:
    """A command's life in seconds from the form's hours ("" for the default); CommandError when it is none."""
    if not hours.strip():
        return default_s
    try:
        span = float(hours) * 3600
    except ValueError:
        span = math.nan
    if not 10 <= span <= MAX_EXPIRY_H * 3600:  # also NaN
        raise CommandError(f"expires: hours from 0.01 to {MAX_EXPIRY_H}")
    return int(span)


def _factor_text(used: tuple[str, str] | None) -> str:
    return "" if used is None else f"{used[0]} t-CO2/kWh (published {used[1]})"


def counted(n: int, thing: str) -> str:
    """`1 unit`, `2 units`: a count with its noun."""
    return f"{n:,} {thing}" if n == 1 else f"{n:,} {thing}s"


def months_of(days: Sequence[date]) -> list[tuple[str, int]]:
    """The months a run of days spans, as (YYYY-MM, how many of the days fall in it), in order."""
    out: list[tuple[str, int]] = []
    for d in days:
        label = f"{d:%Y-%m}"
        if out and out[-1][0] == label:
            out[-1] = (label, out[-1][1] + 1)
        else:
            out.append((label, 1))
    return out


def _local(epoch: int, ctx: WebContext) -> str:
    return datetime.fromtimestamp(epoch, ctx.grid.zone).strftime("%Y-%m-%d %H:%M %z")


def _fields(state: Any) -> dict[str, Any]:
    return {k: getattr(state, k) for k in ("unit", "customer", "label", "state")}
