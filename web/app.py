"""The web application: the JSON API and the operators' console on one ASGI app."""

from web.api import build_api
from web.console import add_console
from web.context import WebContext
from web.firmware import add_firmware
from web.guard import App, guarded


def build_app(ctx: WebContext) -> App:
    """The API (`web.api`) with the console's pages (`web.console`) and the units' firmware downloads
    (`web.firmware`) beside it, guarded (`web.guard`)."""
    app = build_api(ctx)
    add_console(app, ctx)
    add_firmware(app, ctx)
    return guarded(app)
