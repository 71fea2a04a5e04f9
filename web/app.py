"""The web application: the JSON API and the operators' console on one ASGI app."""

from fastapi import FastAPI

from web.api import build_api
from web.console import add_console
from web.context import WebContext


def build_app(ctx: WebContext) -> FastAPI:
    """The API (`web.api`) with the console's pages (`web.console`) beside it."""
    app = build_api(ctx)
    add_console(app, ctx)
    return app
