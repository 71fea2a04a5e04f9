"""The operators' console: pages for people, beside the API, on the same server.

Operators log in with a name and password (`smame operators add`); the session is an HttpOnly, SameSite=Strict
cookie whose row in the store holds the session's CSRF token, which every form posts back. A wrong password is
slowed down and counted on the node's one ban list, as on the file gateway. Pages are rendered on the server
(Jinja2) and need nothing beyond the smame host.
"""

import asyncio
import hmac
import math
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from aggregator.store import SlotRow
from ftp_gateway.accounts import normalize
from kernel.meter import E1_UNITS
from kernel.timegrid import SLOT
from monitoring.fleet import STATES, by_customer, fleet_states, state_of
from web.access import Operators, Session, Sessions
from web.api import slot_values
from web.context import WebContext

HERE = Path(__file__).parent
COOKIE = "smame_session"
LOGIN_CSRF = "smame_login_csrf"  # the login form's token, before there is a session (double-submit cookie)
PAGE = 50  # units a page
MAX_FORM = 8 * 1024


def add_console(app: FastAPI, ctx: WebContext) -> None:
    """Add the console's pages and its static files to the app (none of them in the API's document)."""
    templates = Jinja2Templates(directory=HERE / "templates")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    sessions, operators = Sessions(ctx.store), Operators(ctx.store)

    async def session_of(request: Request) -> Session | None:
        secret = request.cookies.get(COOKIE, "")
        return await ctx.store.call(sessions.get, secret, int(ctx.clock())) if secret else None

    async def form(request: Request) -> dict[str, str] | None:
        """The posted form's fields, or None when its body is over MAX_FORM: read no further than that."""
        if int(request.headers.get("content-length", "0") or "0") > MAX_FORM:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return None
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=10).items()}

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
        address = normalize(request.client.host if request.client else "")
        if ctx.bans.banned(address):
            return PlainTextResponse("too many failed attempts from this address: try again later", 429)
        fields = await form(request)
        if fields is None:
            return PlainTextResponse(f"a form of over {MAX_FORM} bytes is refused", 413)
        expected = request.cookies.get(LOGIN_CSRF, "")
        if not expected or not hmac.compare_digest(fields.get("csrf", ""), expected):
            return PlainTextResponse("missing or wrong CSRF token: load the login page again", 403)
        name, password = fields.get("name", "")[:64], fields.get("password", "")[:1024]
        if not await ctx.store.call(operators.check, name, password):
            ctx.bans.failed(address)
            await asyncio.sleep(ctx.fail_delay_s)
            return login_page(request, "Wrong name or password.", 401)
        ctx.bans.succeeded(address)
        secret, _ = await ctx.store.call(sessions.open, name, int(ctx.clock()))
        done = RedirectResponse("/", 303)
        done.set_cookie(COOKIE, secret, httponly=True, samesite="strict", secure=_secure(request), path="/")
        done.delete_cookie(LOGIN_CSRF, path="/login")
        return done

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        session = await session_of(request)
        fields = await form(request)
        if session is None:
            return RedirectResponse("/login", 303)
        if fields is None:
            return PlainTextResponse(f"a form of over {MAX_FORM} bytes is refused", 413)
        if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
            return PlainTextResponse("missing or wrong CSRF token", 403)
        await ctx.store.call(sessions.close, request.cookies.get(COOKIE, ""))
        done = RedirectResponse("/login", 303)
        done.delete_cookie(COOKIE, path="/")
        return done

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def fleet(request: Request, q: str = "", state: str = "", page: int = 1) -> Response:
        session = await session_of(request)
        if session is None:
            return RedirectResponse("/login", 303)
        registry = ctx.registry()
        units = sorted(registry.units.values(), key=lambda u: u.id)
        last = await ctx.store.call(ctx.store.last_readings, [u.id for u in units])
        now = ctx.clock()
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
        context = {
            "session": session,
            "states": STATES,
            "customers": list(by_customer(states).items()),
            "total": len(states),
            "now": _local(int(now), ctx),
            "q": q,
            "state": state,
            "rows": rows,
            "matched": len(chosen),
            "page": page,
            "pages": pages,
        }
        return templates.TemplateResponse(request, "fleet.html", context)

    @app.get("/units/{unit_id}", include_in_schema=False, response_class=HTMLResponse)
    async def unit_page(request: Request, unit_id: str, days: int = 2) -> Response:
        session = await session_of(request)
        if session is None:
            return RedirectResponse("/login", 303)
        unit = ctx.registry().units.get(unit_id)
        if unit is None:
            return PlainTextResponse(f"no unit {unit_id[:64]}", 404)
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
        context = {
            "session": session,
            "unit": unit,
            "last": _local(last, ctx) if last is not None else "never",
            "state": state_of(last, now, ctx.silent_after_s),
            "days": days,
            "curve": curve,
            "missing": missing,
            "total": len(ends),
            "flagged": flagged,
        }
        return templates.TemplateResponse(request, "unit.html", context)


def _kwh(raw: int | None, row: SlotRow) -> float | None:
    """A register's kWh as a number to draw (the exact decimal is the API's and the files')."""
    if raw is None or row.e1 is None or row.coef is None or row.e1 not in E1_UNITS:
        return None
    return float(raw * row.coef * E1_UNITS[row.e1])


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _local(epoch: int, ctx: WebContext) -> str:
    return datetime.fromtimestamp(epoch, ctx.grid.zone).strftime("%Y-%m-%d %H:%M %z")


def _fields(state: Any) -> dict[str, Any]:
    return {k: getattr(state, k) for k in ("unit", "customer", "label", "state")}
