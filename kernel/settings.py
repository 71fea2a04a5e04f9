"""The one typed settings object: defaults, then a TOML file, then `SMAME_SECTION__KEY` variables.

Each service receives only its own section. A wrong value fails at start with a message that
names the key (as it is written in TOML and as an environment variable).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from kernel.storage_url import POSTGRES_SCHEMES

ENV_PREFIX = "SMAME_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerSettings(Section):
    """MQTT broker the units publish to."""

    # the broker, or a cluster's nodes separated by commas: smame connects to one and moves to the next when it fails
    url: str = "mqtt://127.0.0.1:1883"
    # mosquitto: MQTT 5 (the embedded default); rabbitmq: a RabbitMQ cluster's MQTT plugin, MQTT 3.1.1, each persistent
    # session on a quorum queue (docs/cluster.md)
    kind: Literal["mosquitto", "rabbitmq"] = "mosquitto"
    # RabbitMQ's management API (http(s)://host:15672, logged in as username/password): smame's queue's replicas and
    # leader for /healthz, the metrics and the console; none: only whether each node takes a connection
    management_url: str | None = None
    watch_s: float = Field(default=15.0, ge=1, le=3600)  # how often a cluster's nodes are looked at
    client_id: str = Field(default="smame-ingest", min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    topic: str = "smame/v1/+/reading"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    session_expiry: int = Field(default=7 * 24 * 3600, ge=60, le=2**32 - 1)
    keepalive: int = Field(default=60, ge=5, le=65535)
    batch_size: int = Field(default=10000, ge=1, le=30000)
    batch_delay_ms: int = Field(default=100, ge=1, le=10000)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        broker_nodes(v)
        return v

    @field_validator("management_url")
    @classmethod
    def _management_url(cls, v: str | None) -> str | None:
        if not v:  # empty: none (as a compose file passes an unset variable)
            return None
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
                raise ValueError("must look like http://host:15672 or https://host:15671 (no credentials in it)")
            _ = parts.port
        return v

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """Host and port of each node named by `url`, in its order."""
        return broker_nodes(self.url)[0]

    @property
    def tls(self) -> bool:
        """Whether the broker is reached over TLS (mqtts://)."""
        return broker_nodes(self.url)[1]

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not v or "#" in v[:-1] or not v.endswith("/reading"):
            raise ValueError(
                "must be a filter ending in /reading, e.g. smame/v1/+/reading or $share/g/smame/v1/+/reading"
            )
        return v

    @model_validator(mode="after")
    def _shared_on_rabbitmq(self) -> BrokerSettings:
        if self.kind == "rabbitmq" and self.topic.startswith("$share/"):
            raise ValueError("topic: RabbitMQ's MQTT plugin has no shared subscriptions ($share/)")
        return self


def broker_nodes(url: str) -> tuple[tuple[tuple[str, int], ...], bool]:
    """Host and port of each node that a broker URL names (`mqtt://host:port`, or several separated by commas),
    and whether they are reached over TLS; ValueError saying what is wrong."""
    nodes, schemes = [], set()
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                "must look like mqtt://host:port or mqtts://host:port, or several such separated by commas"
            )
        tls = parts.scheme == "mqtts"
        nodes.append((parts.hostname, parts.port or (8883 if tls else 1883)))  # a bad port raises ValueError
        schemes.add(parts.scheme)
    if len(schemes) > 1:
        raise ValueError("a cluster's nodes are all mqtt:// or all mqtts://")
    return tuple(nodes), "mqtts" in schemes


class StorageSettings(Section):
    """Where readings and slots are kept."""

    url: str | None = None  # default: sqlite:///<data_dir>/smame.db
    synchronous: Literal["FULL", "NORMAL"] = "FULL"  # SQLite's; PostgreSQL's is the server's synchronous_commit
    retention_days: int = Field(default=400, ge=0)  # 0: keep everything

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("sqlite:///") and len(v) > 10:
            return v
        if v.startswith(POSTGRES_SCHEMES) and len(v.split("://", 1)[1]) > 0:
            return v
        raise ValueError("must be sqlite:///path or postgresql://user@host:port/database")
        return v


class RegistrySettings(Section):
    """The files that say which unit belongs to which customer."""

    units: Path = Path("units.csv")
    customers: Path = Path("customers.toml")


class EmissionsSettings(Section):
    """Where the CO2 emission factors come from."""

    factors: Path | None = None  # emission_factors.csv; none: customers' CO2 columns stay empty


class IngestSettings(Section):
    """Validation of incoming telegrams and the slot arithmetic."""

    clock_tolerance_s: int = Field(default=300, ge=0, le=86400)  # how far ahead of its receipt a reading may lie
    max_age_days: int = Field(default=1096, ge=1, le=3660)  # older readings are refused (too_old)
    max_readings: int = Field(default=96, ge=1, le=1000)  # readings one telegram may carry
    quarantine_days: int = Field(default=90, ge=1)  # refused telegrams are kept this long
    default_contract_kw: float = Field(default=50.0, gt=0)
    gap_cap_slots: int = Field(default=48, ge=1, le=48 * 31)


class ExportSettings(Section):
    """Per-customer CSV files."""

    enabled: bool = True
    dir: Path | None = None  # default: <data_dir>/export
    retention_days: int = Field(default=45, ge=1, le=3660)
    grace_s: int = Field(default=120, ge=0, le=1800)
    workers: int = Field(default=2, ge=1, le=64)  # processes rendering days in parallel


class FtpSettings(Section):
    """FTP and FTPS for customers (bans apply to SFTP too)."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=2121, ge=0, le=65535)
    tls_required: bool = True
    certfile: Path | None = None  # default: a self-signed one in <data_dir>/ftps-cert.pem
    keyfile: Path | None = None
    passive_ports: str = "60000-60099"
    masquerade_address: str | None = None
    max_connections: int = Field(default=256, ge=1)
    max_connections_per_ip: int = Field(default=16, ge=1)
    fail_delay_s: float = Field(default=3.0, ge=0)
    # Connections not logged in yet (FTP and SFTP alike): strangers idling at the door cannot crowd customers out.
    login_timeout_s: float = Field(default=20.0, gt=0, le=600)
    max_unauthenticated: int = Field(default=32, ge=1)
    max_unauthenticated_per_ip: int = Field(default=4, ge=1)
    ban_after: int = Field(default=5, ge=1)
    ban_window_s: int = Field(default=600, ge=1)
    ban_s: int = Field(default=3600, ge=1)

    @field_validator("passive_ports")
    @classmethod
    def _ports(cls, v: str) -> str:
        low, sep, high = v.partition("-")
        if not (sep and low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 65535):
            raise ValueError("must be a range like 60000-60099 (ports 1024 to 65535)")
        return v

    @property
    def passive_range(self) -> range:
        """The passive ports as a range."""
        low, _, high = self.passive_ports.partition("-")
        return range(int(low), int(high) + 1)


class SftpSettings(Section):
    """SFTP for customers."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=2222, ge=0, le=65535)
    host_key: Path | None = None  # default: <data_dir>/ssh_host_ed25519_key, made on first start


class MonitoringSettings(Section):
    """Prometheus metrics and the health endpoint; how long reports and alerts are retried."""

    enabled: bool = True
    host: str = "127.0.0.1"  # this machine only; a deployment that scrapes from elsewhere says so (compose: 0.0.0.0)
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    outbox_give_up_s: int = Field(default=3 * 86400, ge=60)  # a report or alert not sent by then is dropped
    outbox_retry_s: float = Field(default=15.0, gt=0)  # first retry of a failed send; doubles up to 30 min
    outbox_keep_days: int = Field(default=30, ge=1)  # sent and abandoned messages are kept this long
    # certificates watched for their expiry besides those smame uses (FTPS, the broker's CA and its client
    # certificate): files, or directories as `smame provision --out` writes them (the CA, the broker's, each unit's)
    certificates: Annotated[list[Path], NoDecode] = []

    @field_validator("certificates", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        if isinstance(v, str):  # SMAME_MONITORING__CERTIFICATES=/etc/smame/broker,/etc/ssl/extra.pem
            v = [p.strip() for p in v.split(",") if p.strip()]
        return v


class WebSettings(Section):
    """The web server: the JSON API for customers' machines (and, as it grows, the operators' console)."""

    enabled: bool = True
    bind: str = "127.0.0.1"  # this machine only; a deployment that publishes it says so (compose: 0.0.0.0)
    port: int = Field(default=8080, ge=0, le=65535)
    max_days: int = Field(default=45, ge=1, le=366)  # days of slots one API call may ask for
    # every operator needs a second factor (an authenticator, TOTP): one without is sent to enrol one first
    require_2fa: bool = False
    # proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks); nobody else's are
    trusted_proxies: Annotated[list[str], NoDecode] = []

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, v: Any) -> Any:
        if isinstance(v, str):  # SMAME_WEB__TRUSTED_PROXIES=10.0.0.1,172.16.0.0/12
            v = [a.strip() for a in v.split(",") if a.strip()]
        for network in v if isinstance(v, list) else []:
            try:
                ipaddress.ip_network(str(network), strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an address or network (192.0.2.10, 10.0.0.0/8, ::1)") from None
        return v


class MailSettings(Section):
    """SMTP for the daily report and alerts (off while smtp_url is unset)."""

    smtp_url: str | None = None  # smtp://host:587 (STARTTLS when offered) or smtps://host:465
    starttls: Literal["auto", "always", "never"] = "auto"
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None  # to verify the server's certificate; default: the system's CAs
    sender: str = "smame@localhost"
    recipients: Annotated[list[str], NoDecode] = []
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("smtp_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
                raise ValueError("must look like smtp://host:port or smtps://host:port")
            _ = parts.port  # raises on a bad port
        return v

    @field_validator("recipients", mode="before")
    @classmethod
    def _recipients(cls, v: Any) -> Any:
        # SMAME_MAIL__RECIPIENTS=a@x,b@y reads better in a compose file than a JSON list
        if isinstance(v, str):
            v = [a.strip() for a in v.split(",") if a.strip()]
        for address in v if isinstance(v, list) else []:
            if not isinstance(address, str) or "@" not in address:
                raise ValueError(f"{address!r} is not a mail address")
        return v

    @model_validator(mode="after")
    def _complete(self) -> MailSettings:
        if self.smtp_url and not self.recipients:
            raise ValueError("recipients: set at least one address when smtp_url is set")
        return self


class SlackSettings(Section):
    """Slack for the daily report and alerts: an incoming webhook, or a bot token and a channel."""

    webhook_url: SecretStr | None = None
    token: SecretStr | None = None
    channel: str | None = None
    api_url: str = "https://slack.com/api/"  # another one only for a proxy or a test stand-in
    timeout_s: int = Field(default=30, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> SlackSettings:
        if self.token and not self.channel:
            raise ValueError("channel: set it when token is set (or use webhook_url)")
        return self

    @property
    def enabled(self) -> bool:
        """Whether anything is to be sent to Slack."""
        return self.webhook_url is not None or self.token is not None


class ReportSettings(Section):
    """The daily report on the previous day."""

    enabled: bool = True
    at: str = "08:00"  # local time
    silent_after_s: int = Field(default=86400, ge=1800)
    zero_run_slots: int = Field(default=12, ge=2)
    catch_up_wait_s: float = Field(default=900.0, ge=0)  # how long a due report waits for ingest to catch up

    @field_validator("at")
    @classmethod
    def _at(cls, v: str) -> str:
        hh, sep, mm = v.partition(":")
        if not (sep and hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60 and len(mm) == 2):
            raise ValueError("must be a local time HH:MM, e.g. 08:00")
        return v

    @property
    def minutes(self) -> int:
        """Minutes after local midnight."""
        hh, _, mm = self.at.partition(":")
        return int(hh) * 60 + int(mm)


class AlertSettings(Section):
    """Live alerts: when each condition starts, repeats and clears."""

    enabled: bool = True
    check_s: float = Field(default=30.0, gt=0)
    repeat_s: int = Field(default=4 * 3600, ge=0)  # 0: never repeat an alert that stays on
    ingest_silence_s: int = Field(default=2700, ge=10)  # no telegram at all for this long while units exist
    broker_down_s: int = Field(default=120, ge=1)
    store_down_s: int = Field(default=60, ge=1)  # a node that cannot reach the store this long says so directly
    disk_free_percent: float = Field(default=10.0, ge=0, le=100)
    silent_after_s: int = Field(default=7200, ge=60)  # a unit is silent when its newest reading is older
    silent_units_min: int = Field(default=10, ge=1)  # this many silent units at once raise one alert
    cert_warn_days: int = Field(default=30, ge=1)  # a certificate that expires within this many days: an alert
    cert_urgent_days: int = Field(default=7, ge=0)  # and within this many (or expired): another, more urgent
    history_days: int = Field(default=90, ge=1, le=3660)  # how long the alerts' history is kept


class HealthSettings(Section):
    """Units' health and the risk of their failing (docs/health.md)."""

    pass_every_s: float = Field(default=3600.0, ge=1)  # how often the records and the risk are made again
    alert_at_risk: int = Field(default=50, ge=0)  # more units at risk than this raise `units_at_risk`; 0: never
    report_units: int = Field(default=20, ge=0, le=1000)  # at-risk units the daily report names, riskiest first


class DevicesSettings(Section):
    """Commands to units (docs/devices.md): sent by the leader over its own connection to the broker."""

    enabled: bool = True
    expiry_s: int = Field(default=86400, ge=10, le=30 * 86400)  # a command's default lifetime (`--expires`)
    rate_per_s: float = Field(default=100.0, gt=0, le=100000)  # commands published a second, across the fleet
    retry_s: int = Field(default=300, ge=1, le=86400)  # a command no session took is published again this late
    keep_days: int = Field(default=400, ge=1, le=3650)  # ended commands and audit entries are kept this long
    repair: bool = True  # gaps that later readings did not fill are asked of their units with `resend`, once
    repair_after_s: int = Field(default=3600, ge=0, le=7 * 86400)  # a gap this old that is still a gap is asked for
    repair_days: int = Field(default=7, ge=1, le=31)  # gaps of the last this many days are looked for
    repair_every_s: float = Field(default=1800.0, ge=1, le=86400)  # how often they are looked for
    repair_per_s: float = Field(default=5.0, gt=0, le=10000)  # gap repairs sent a second at most, across the fleet
    config_every_s: float = Field(default=60.0, ge=1, le=86400)  # how often units out of step are looked for
    campaign_every_s: float = Field(default=5.0, ge=0.5, le=3600)  # how often firmware campaigns move on
    # where units fetch firmware images: smame's web server as the units reach it (https://smame.example.jp:8443)
    firmware_url: str = Field(default="", pattern=r"^(https?://[A-Za-z0-9.:\[\]-]{1,300}(/[!-~]{0,200})?)?$")


class NodeSettings(Section):
    """This node's view of itself: when its ingest counts as stuck, when it hands leadership over, how far its
    clock may stray from the store's (docs/monitoring.md, "The service sees itself")."""

    stall_s: float = Field(default=15.0, ge=1, le=3600)  # telegrams waiting this long with no commit: stalled
    handover_s: float = Field(default=5.0, ge=1, le=3600)  # a leader off the broker this long hands over
    max_clock_offset_s: float = Field(default=30.0, ge=1, le=86400)  # beyond it, the node refuses to lead


class LogSettings(Section):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class Settings(BaseSettings):
    """All of smame's settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True, case_sensitive=False
    )

    timezone: str = "Asia/Tokyo"
    data_dir: Path = Path("data")
    broker: BrokerSettings = BrokerSettings()
    storage: StorageSettings = StorageSettings()
    registry: RegistrySettings = RegistrySettings()
    emissions: EmissionsSettings = EmissionsSettings()
    ingest: IngestSettings = IngestSettings()
    export: ExportSettings = ExportSettings()
    ftp: FtpSettings = FtpSettings()
    sftp: SftpSettings = SftpSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    web: WebSettings = WebSettings()
    mail: MailSettings = MailSettings()
    slack: SlackSettings = SlackSettings()
    report: ReportSettings = ReportSettings()
    alerts: AlertSettings = AlertSettings()
    health: HealthSettings = HealthSettings()
    devices: DevicesSettings = DevicesSettings()
    node: NodeSettings = NodeSettings()
    log: LogSettings = LogSettings()

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. Asia/Tokyo)") from None
        return v

    @model_validator(mode="after")
    def _defaults_under_data_dir(self) -> Settings:
        if self.storage.url is None:
            url = f"sqlite:///{self.data_dir / 'smame.db'}"
            object.__setattr__(self, "storage", self.storage.model_copy(update={"url": url}))
        if self.export.dir is None:
            object.__setattr__(self, "export", self.export.model_copy(update={"dir": self.data_dir / "export"}))
        return self

    @property
    def storage_url(self) -> str:
        """The effective storage URL."""
        assert self.storage.url is not None
        return self.storage.url

    @property
    def watched_certificates(self) -> list[Path]:
        """The certificate files and directories whose expiry is watched: those smame uses (the file gateway's,
        the broker's CA and smame's client certificate), then monitoring.certificates."""
        f, b = self.ftp, self.broker
        made = self.data_dir / "ftps-cert.pem"  # the self-signed one the file gateway makes at its first start
        own = [f.certfile] if f.enabled and f.certfile else [made] if f.enabled and made.exists() else []
        own += [p for p in (b.ca_file, b.cert_file) if p is not None]
        return list(dict.fromkeys([*own, *self.monitoring.certificates]))

    @property
    def contract_kw(self) -> Fraction:
        """The default contract kW as an exact fraction."""
        return Fraction(str(self.ingest.default_contract_kw))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = settings_cls.model_config.get("toml_file")
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if toml:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=toml),)
        return sources


class SettingsError(ValueError):
    """Settings that cannot be used; the message names every wrong key."""


# The compose file's substitution variables (its .env), which look like settings and are none.
COMPOSE_VARIABLES = {"SMAME_STORAGE_URL": "SMAME_STORAGE__URL", "SMAME_MAIL_SMTP_URL": "SMAME_MAIL__SMTP_URL"}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with each `SMAME_` variable that names no setting (a typo would otherwise be ignored
    without a word). `SMAME_TEST*` belong to the test suite and are left alone."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            known |= {f"{ENV_PREFIX}{name.upper()}__{key.upper()}" for key in model.model_fields}
    out = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper.startswith(ENV_PREFIX + "TEST"):
            continue
        if upper in COMPOSE_VARIABLES:
            hint = f"it is docker compose's variable (.env); smame reads {COMPOSE_VARIABLES[upper]}"
        else:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}?" if close else "see docs/configuration.md"
        out.append(f"unknown environment variable {variable}: no such setting ({hint})")
    return out


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, the TOML file at `path` and the environment; an `SMAME_` variable that
    names no setting is an error."""
    if path is not None and not path.is_file():
        raise SettingsError(f"config file {path} not found")
    unknown = unknown_variables(os.environ)
    if unknown:
        raise SettingsError("bad configuration in the environment:\n  " + "\n  ".join(unknown))

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FromFile(**overrides)
    except ValidationError as exc:
        raise SettingsError(_explain(exc, path)) from None
    except ValueError as exc:  # TOML syntax errors and the like
        raise SettingsError(f"{path}: {exc}") from None
    except RecursionError:  # arrays or tables nested hundreds deep: tomllib recurses once a level
        raise SettingsError(f"{path}: not valid TOML: nested too deep") from None


def _explain(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        msg = err["msg"]
        # A check across a section's keys says "key: why"; name that key, not just the section.
        key_first = re.fullmatch(r"Value error, (\w+): (.*)", msg, re.S)
        if key_first:
            loc.append(key_first.group(1))
            msg = key_first.group(2)
        key = ".".join(loc)
        env = ENV_PREFIX + "__".join(loc).upper()
        given = err.get("input")
        shown = "" if isinstance(given, dict) or err["type"] == "missing" else f" (got {given!r})"
        msg = "unknown key" if err["type"] == "extra_forbidden" else msg
        lines.append(f"invalid setting {key} / {env}: {msg}{shown}")
    where = f" in {path} or the environment" if path else " in the environment"
    return f"bad configuration{where}:\n  " + "\n  ".join(lines)
