"""docker-compose.yml agrees with the code: env vars KafkaSettings reads, topic names, CLI commands, Kafka version.

There is no Docker engine in CI; the file is parsed with PyYAML and checked against the project's own tables.
"""

from __future__ import annotations

import base64
import importlib
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from localkafka.broker import KAFKA_VERSION
from streams.settings import ENV_VARS, KafkaSettings

ROOT = Path(__file__).resolve().parents[2]
DOMAINTOK_SERVICES = ("topics", "tokenizer", "encoder", "encoder-gpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def entry_points() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["domaintok.commands"]


def test_services(compose):
    services = compose["services"]
    assert set(services) == {"kafka", *DOMAINTOK_SERVICES}
    assert services["tokenizer"]["deploy"]["replicas"] == 2
    assert services["encoder-gpu"]["profiles"] == ["gpu"]
    [device] = services["encoder-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    for name in ("tokenizer", "encoder", "encoder-gpu"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert any(v.endswith(":/artifacts:ro") for v in services[name]["volumes"])
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_domaintok_env_is_exactly_what_settings_read(compose):
    for name in DOMAINTOK_SERVICES:
        env = compose["services"][name]["environment"]
        unknown = set(env) - set(ENV_VARS)
        assert not unknown, f"{name} sets variables KafkaSettings never reads: {sorted(unknown)}"
        settings = KafkaSettings.from_env({k: str(v) for k, v in env.items()})
        # The broker address is the kafka service's internal listener.
        assert settings.bootstrap_servers == "kafka:9092"
        advertised = compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert "PLAINTEXT://kafka:9092" in advertised.split(",")
        # Topic names are the code's defaults, so a host-side `domaintok produce` with no DOMAINTOK_* agrees.
        assert settings.topics == KafkaSettings().topics
        assert settings.partitions == KafkaSettings().partitions


def test_kafka_service_matches_the_tested_broker(compose):
    kafka = compose["services"]["kafka"]
    image, tag = kafka["image"].split(":")
    assert image == "apache/kafka"
    assert tag == KAFKA_VERSION  # production runs the version the integration tests run
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16  # a valid Kafka Uuid
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
    assert "kafka-data" in compose["volumes"]


def test_commands_exist_in_the_cli(compose, entry_points):
    for name in DOMAINTOK_SERVICES:
        service = compose["services"][name]
        assert service["build"]["dockerfile_inline"].rstrip().endswith('ENTRYPOINT ["domaintok"]')
        command = service["command"]
        assert command[0] in entry_points, f"{name}: `domaintok {command[0]}` is not a CLI command"
    assert compose["services"]["topics"]["command"] == ["broker", "topics"]
    from localkafka.broker import command as broker

    assert "topics" in broker.commands


def _resolve(entry_point: str, args: list[str]) -> tuple[click.Command, list[str]]:
    module, attr = entry_point.split(":")
    cmd = getattr(importlib.import_module(module), attr)
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        cmd = cmd.commands[rest.pop(0)]
    return cmd, rest


@pytest.mark.parametrize("service", ["tokenizer", "encoder", "encoder-gpu"])
def test_worker_commands_parse(compose, entry_points, service):
    command = compose["services"][service]["command"]
    try:
        cmd, rest = _resolve(entry_points[command[0]], command[1:])
    except ModuleNotFoundError as exc:
        if exc.name != entry_points[command[0]].split(":")[0]:
            raise
        pytest.skip(f"{entry_points[command[0]]} does not exist yet: {exc}")
    assert not isinstance(cmd, click.Group), f"{service}: {command} names a group, not a command"
    options = {opt for p in cmd.params for opt in p.opts}
    given = [a for a in rest if a.startswith("--")]
    assert set(given) <= options, f"{service}: options {sorted(set(given) - options)} unknown to `domaintok {' '.join(command[:2])}`"
    # The command line parses (without running the worker).
    ctx = cmd.make_context(cmd.name, rest, resilient_parsing=True)
    assert ctx.params
