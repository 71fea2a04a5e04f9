"""Settings: the order of sources, errors that name the key, and docs that list every key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from kernel.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def keys(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("SMAME_"):
            monkeypatch.delenv(k)


def test_defaults_match_the_contract() -> None:
    s = load_settings()
    assert (s.timezone, s.broker.url, s.broker.client_id, s.broker.topic) == (
        "Asia/Tokyo",
        "mqtt://127.0.0.1:1883",
        "smame-ingest",
        "smame/v1/+/reading",
    )
    assert s.storage_url == "sqlite:///data/smame.db"
    assert (s.registry.units, s.registry.customers) == (Path("units.csv"), Path("customers.toml"))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "smame.toml"
    f.write_text('timezone = "Europe/Berlin"\ndata_dir = "/srv/x"\n[broker]\nurl = "mqtts://a:8883"\nbatch_size = 10\n')
    monkeypatch.setenv("SMAME_BROKER__URL", "mqtt://b:1884")
    s = load_settings(f)
    assert (s.timezone, s.broker.url, s.broker.batch_size) == ("Europe/Berlin", "mqtt://b:1884", 10)
    assert s.storage_url == "sqlite:////srv/x/smame.db"
    monkeypatch.setenv("SMAME_WEB__TRUSTED_PROXIES", "10.0.0.1, 172.16.0.0/12")
    assert load_settings(f).web.trusted_proxies == ["10.0.0.1", "172.16.0.0/12"]


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ('[broker]\nurl = "http://x"\n', {}, "broker.url / SMAME_BROKER__URL"),
        ("[broker]\nbogus = 1\n", {}, "broker.bogus / SMAME_BROKER__BOGUS: unknown key"),
        ('timezone = "Asia/Nowhere"\n', {}, "timezone / SMAME_TIMEZONE"),
        ("", {"SMAME_BROKER__BATCH_SIZE": "0"}, "broker.batch_size / SMAME_BROKER__BATCH_SIZE"),
        ("", {"SMAME_STORAGE__URL": "mysql://x/y"}, "storage.url / SMAME_STORAGE__URL"),
        ('[log]\nlevel = "LOUD"\n', {}, "log.level / SMAME_LOG__LEVEL"),
        ("", {"SMAME_WEB__TRUSTED_PROXIES": "10.0.0.1,proxy.lan"}, "web.trusted_proxies / SMAME_WEB__TRUSTED"),
        ("", {"SMAME_BROKER__URL": "mqtt://a:1883,mqtts://b:8883"}, "all mqtt:// or all mqtts://"),
        ("", {"SMAME_BROKER__URL": "mqtt://a:1883,b:1883"}, "broker.url / SMAME_BROKER__URL"),
        ("", {"SMAME_BROKER__KIND": "rabbitmq", "SMAME_BROKER__TOPIC": "$share/g/smame/v1/+/reading"}, "no shared"),
        ("", {"SMAME_BROKER__KIND": "emqx"}, "broker.kind / SMAME_BROKER__KIND"),
    ],
)
def test_a_wrong_value_names_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str], named: str
) -> None:
    f = tmp_path / "smame.toml"
    f.write_text(toml)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as err:
        load_settings(f)
    assert named in str(err.value)


def test_broken_toml_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker\nurl=1")
    with pytest.raises(SettingsError, match="bad.toml"):
        load_settings(bad)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 1000 + "]" * 1000 + "\n")  # tomllib recurses once a level
    with pytest.raises(SettingsError, match="deep.toml: not valid TOML: nested too deep"):
        load_settings(deep)


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for key in keys():
        env = "SMAME_" + key.replace(".", "__").upper()
        assert f"`{key}`" in doc and f"`{env}`" in doc, key


def test_an_smame_variable_that_names_no_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMAME_TIMEZON", "UTC")  # a typo, ignored without a word before
    monkeypatch.setenv("SMAME_STORAGE_URL", "postgresql://smame@db/smame")  # compose's variable, not smame's
    monkeypatch.setenv("smame_broker__urll", "mqtt://x")
    monkeypatch.setenv("SMAME_TEST_POSTGRES", "postgresql://elsewhere")  # the test suite's own: left alone
    monkeypatch.setenv("SMAME_BROKER__URL", "mqtt://broker:1883")  # a setting: fine
    with pytest.raises(SettingsError) as said:
        load_settings()
    assert str(said.value).splitlines()[1:] == [
        "  unknown environment variable SMAME_STORAGE_URL: no such setting (it is docker compose's variable "
        "(.env); smame reads SMAME_STORAGE__URL)",
        "  unknown environment variable SMAME_TIMEZON: no such setting (did you mean SMAME_TIMEZONE?)",
        "  unknown environment variable smame_broker__urll: no such setting (did you mean SMAME_BROKER__URL?)",
    ]
    for name in ("SMAME_TIMEZON", "SMAME_STORAGE_URL", "smame_broker__urll"):
        monkeypatch.delenv(name)
    assert load_settings().broker.url == "mqtt://broker:1883"


def test_a_cluster_is_its_nodes_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMAME_BROKER__URL", "mqtts://n1.lan:8883, mqtts://n2.lan,mqtts://10.0.0.3:18883")
    monkeypatch.setenv("SMAME_BROKER__KIND", "rabbitmq")
    b = load_settings().broker
    assert b.nodes == (("n1.lan", 8883), ("n2.lan", 8883), ("10.0.0.3", 18883))
    assert b.tls and b.kind == "rabbitmq"
