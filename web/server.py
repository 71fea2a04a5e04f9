"""The web server's place in `smame run`: uvicorn on a thread and event loop of its own.

Its own loop, so that a slow request never delays the ingest loop's socket reads or commits; its own store
connection (given by the caller), so that its reads never queue behind the services' work.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from web.proxies import Proxies

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("smame.web")


class WebServer:
    """Serves an ASGI application, made by `app` on the server's own thread, on `host:port` until stopped,
    taking the client's address and scheme from `proxies` only (`web.proxies`)."""

    def __init__(self, app: Callable[[], Any], host: str, port: int, proxies: Proxies | None = None) -> None:
        self._app = app
        self.host, self.wanted_port = host, port
        self.proxies = proxies or Proxies()
        self._server: uvicorn.Server | None = None
        self._failed: BaseException | None = None
        self._stop = threading.Event()  # set when `run` ends: a server still being made is not started

    @property
    def port(self) -> int | None:
        """The port it listens on, once started (the one chosen when configured as 0)."""
        for server in getattr(self._server, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return None

    async def run(self) -> None:
        """Serve until cancelled; raise OSError when it cannot start, RuntimeError when it stops by itself."""
        loop = asyncio.get_running_loop()
        started = threading.Event()
        ended: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not ended.done():
                ended.set_result(None)

        def serve() -> None:
            try:
                asyncio.run(self._serve(started))
            except BaseException as exc:  # noqa: BLE001 (told to the supervising coroutine below)
                self._failed = exc
            finally:
                started.set()
                try:
                    loop.call_soon_threadsafe(settle)
                except RuntimeError:  # the supervising loop is gone already: nobody to tell
                    pass

        thread = threading.Thread(target=serve, name="web", daemon=True)
        thread.start()
        try:
            await loop.run_in_executor(None, started.wait)
            if self._server is None or not self._server.started:
                where = f"{self.host} port {self.wanted_port}"
                raise OSError(f"the web server could not start on {where}: {self._failed!r}")
            log.info("web server listening on %s port %s", self.host, self.port)
            await ended
            raise RuntimeError(f"the web server stopped: {self._failed!r}")
        finally:
            self._stop.set()  # before looking at the server: `_serve` looks again after making it
            if self._server is not None:
                self._server.should_exit = True
            await loop.run_in_executor(None, thread.join, 5)

    async def _serve(self, started: threading.Event) -> None:
        import uvicorn  # on the server's thread, as the application is made: not on smame's way to the broker

        from web.connections import GuardedH11Protocol
        from web.proxies import forwarded

        app = self._app()  # loading the framework takes a second or two: smame may be told to stop meanwhile
        if self._stop.is_set():
            return
        config = uvicorn.Config(
            forwarded(app, self.proxies),
            host=self.host,
            port=self.wanted_port,
            log_config=None,  # smame's logging
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,  # uvicorn's would trust 127.0.0.1's forwarded headers: web.proxies decides
            # beyond that 503 at once; a stranger's idle connections go after HEAD_TIMEOUT_S, PER_ADDRESS at most
            limit_concurrency=256,
            http=GuardedH11Protocol,
            timeout_keep_alive=10,
            h11_max_incomplete_event_size=16 * 1024,
        )
        self._server = uvicorn.Server(config)  # not on the main thread: it leaves the signals to smame
        self._server.server_state.smame_proxies = self.proxies  # type: ignore[attr-defined]  # web.connections
        if self._stop.is_set():  # told to stop while the server was being made, after `run` looked for it
            return
        task = asyncio.create_task(self._server.serve())
        while not self._server.started and not task.done():
            await asyncio.sleep(0.01)
        started.set()
        await task
