"""Firmware images for units (devices.md, "Firmware campaigns"): `GET /fw/{campaign}/{unit}/{token}.bin`.

Only a unit a running (or paused) campaign has started, with the token its campaign's secret makes for it
(`kernel.firmware.unit_token`), gets the image; any other request answers the same 404, and a wrong token counts
toward its address's ban as a wrong password does. Range requests are answered (206), so that a unit cut off
mid-download resumes where it stopped. The image is read from the store once and kept in this node's
`<data_dir>/firmware` under its SHA-256, checked, so that every node serves what the store holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from kernel.firmware import CAMPAIGN_ID, STARTED, unit_token
from kernel.meter import UNIT_ID
from web.context import WebContext, client_of

NOT_HERE = {"error": "no such image"}


def add_firmware(app: FastAPI, ctx: WebContext) -> None:
    """Add the units' firmware downloads to the app (not in the API's document: units are not its callers)."""
    lock = asyncio.Lock()  # one node writes an image to its cache once

    @app.get("/fw/{campaign_id}/{unit_id}/{token}.bin", include_in_schema=False)
    async def image(request: Request, campaign_id: str, unit_id: str, token: str) -> Response:
        address = client_of(request)
        if ctx.bans.banned(address):
            return JSONResponse({"error": "too many failed attempts from this address: try again later"}, 429)
        if not (CAMPAIGN_ID.fullmatch(campaign_id) and UNIT_ID.fullmatch(unit_id)):
            return JSONResponse(NOT_HERE, 404)
        campaign = await ctx.store.call(ctx.store.campaign, campaign_id)
        if campaign is None or campaign.phase not in ("running", "paused"):
            return JSONResponse(NOT_HERE, 404)
        if not hmac.compare_digest(token.encode(), unit_token(campaign.secret, campaign_id, unit_id).encode()):
            ctx.bans.failed(address, f"firmware of campaign {campaign_id}", "the firmware downloads")
            await asyncio.sleep(ctx.fail_delay_s)
            return JSONResponse(NOT_HERE, 404)
        steps = await ctx.store.call(ctx.store.campaign_step_of, campaign_id, unit_id)
        if steps not in STARTED:
            return JSONResponse(NOT_HERE, 404)
        path = ctx.firmware_dir / f"{campaign.sha256}.bin"
        if not path.exists():
            async with lock:
                if not path.exists():
                    data = await ctx.store.call(ctx.store.firmware_image, campaign.version)
                    if data is None or hashlib.sha256(data).hexdigest() != campaign.sha256:
                        return JSONResponse({"error": "the image is not as the campaign names it"}, 500)
                    await asyncio.get_running_loop().run_in_executor(None, _keep, path, data)
        return FileResponse(path, media_type="application/octet-stream")


def _keep(path: Path, data: bytes) -> None:
    """Write the image whole, then put it in place: a reader never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
