# smame: one image for ingest, export, FTPS/SFTP, the web API, monitoring (and the simulator profile).
# The same two pip commands install smame without Docker (README, "Without Docker").
FROM node:20-bookworm-slim AS frontend
# the console's chart library from the npm registry, pinned by the lock file (scripts/build-frontend)
WORKDIR /src/web/frontend
COPY web/frontend/package.json web/frontend/package-lock.json ./
COPY scripts/build-frontend /src/scripts/build-frontend
RUN mkdir -p /src/web/static && /src/scripts/build-frontend

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY deploy/requirements.txt deploy/requirements.txt
RUN python -m venv /opt/smame && /opt/smame/bin/pip install --no-cache-dir -r deploy/requirements.txt
COPY pyproject.toml README.md ./
COPY kernel kernel
COPY smame smame
COPY broker_bridge broker_bridge
COPY aggregator aggregator
COPY csv_export csv_export
COPY ftp_gateway ftp_gateway
COPY monitoring monitoring
COPY simulators simulators
COPY web web
COPY --from=frontend /src/web/static/vendor web/static/vendor
RUN /opt/smame/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/smame --create-home smame
COPY --from=build /opt/smame /opt/smame
ENV PATH=/opt/smame/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SMAME_DATA_DIR=/var/lib/smame \
    SMAME_LOG__FORMAT=json
USER smame
WORKDIR /var/lib/smame
VOLUME ["/var/lib/smame"]
EXPOSE 2121 2222 8080 9108 60000-60099
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["smame"]
CMD ["run", "-c", "/etc/smame/smame.toml"]
