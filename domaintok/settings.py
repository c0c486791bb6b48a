"""Every DOMAINTOK_* setting in one struct, read from the environment in one place (`Settings.from_env`).

The workers, the local brokers and tokenize take their settings from here; a CLI option overrides a field
(`dataclasses.replace`), and `to_env` gives a child process the same settings. The Kafka connection and topic names
(KAFKA_*, DOMAINTOK_TOPIC_*, DOMAINTOK_PARTITIONS) are `streams.settings.KafkaSettings`, which every Kafka client
shares. Reading the environment is the only thing this module does, and only when asked.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from domaintok.errors import DomaintokError

CONSUMERS = ("batch", "faust")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings, with the environment variable of each in brackets."""

    # tokenizer worker
    tokenizer_dir: str = ""  # DOMAINTOK_TOKENIZER_DIR: the fitted tokenizer directory (required by the worker)
    app_id: str = "domaintok-tokenizer"  # DOMAINTOK_APP_ID: consumer group and Table changelog prefix
    max_length: int | None = None  # DOMAINTOK_MAX_LENGTH: window length in tokens (default: the tokenizer's)
    batch_size: int = 4000  # DOMAINTOK_BATCH_SIZE: events per micro-batch at most
    batch_within: float = 0.2  # DOMAINTOK_BATCH_WITHIN: seconds to wait for a batch to fill
    web_port: int = 6066  # DOMAINTOK_WEB_PORT: Faust web (the worker passes --without-web unless asked)
    store: str = "memory://"  # DOMAINTOK_STORE: Table store; state is rebuilt from the changelog on start
    commit_interval: float = 2.8  # DOMAINTOK_COMMIT_INTERVAL: seconds between offset commits (a crash replays
    # at most about this much input; replays are skipped by the stored positions, so it costs time, not counts)
    consumer: str = "batch"  # DOMAINTOK_CONSUMER: "batch" = streams/fast_consumer.py batch delivery, "faust" = stock
    producer_linger: float = 0.002  # DOMAINTOK_PRODUCER_LINGER: seconds a send may wait for more records to batch;
    # each micro-batch ends with a flush that waits this long for its last partial batch (sends are bursty anyway)
    fetch_max_wait: float = 0.1  # DOMAINTOK_FETCH_MAX_WAIT: seconds a fetch may wait at the broker (batch consumer;
    # Faust's own 1.5 s delays partitions left out of the in-flight fetch by up to that much)
    # both workers
    metrics_port: int = 0  # DOMAINTOK_METRICS_PORT: Prometheus /metrics (0 = off)
    metrics_host: str = "127.0.0.1"  # DOMAINTOK_METRICS_HOST: the address /metrics listens on
    # encoder worker
    encoder_group: str = "domaintok-encoder"  # DOMAINTOK_ENCODER_GROUP: its consumer group
    encoder_throttle: float = 0.0  # DOMAINTOK_ENCODER_THROTTLE: seconds slept per batch (tests of lag only)
    # offline and tooling
    tokenize_chunk_events: int = 1_000_000  # DOMAINTOK_TOKENIZE_CHUNK_EVENTS: tokenize holds at most this many
    # events in memory; larger inputs are tokenized in user ranges of this size
    kafka_version: str = "4.3.1"  # DOMAINTOK_KAFKA_VERSION: the Apache Kafka `domaintok broker --kind apache` runs
    cache_dir: str = ""  # DOMAINTOK_CACHE_DIR: brokers' jars and data (default $XDG_CACHE_HOME/domaintok)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `environ` (default `os.environ`); unset or empty variables keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper(), "").strip()
            if not raw:
                continue
            try:
                values[f.name] = _parse(f.type, raw)
            except ValueError:
                raise DomaintokError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: not a valid {f.type}") from None
        if "consumer" in values:
            values["consumer"] = values["consumer"].lower()
        settings = cls(**values)
        if settings.consumer not in CONSUMERS:
            raise DomaintokError(f"DOMAINTOK_CONSUMER={settings.consumer!r} is not one of {', '.join(CONSUMERS)}")
        return settings

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process (every one: a variable the
        parent's environment already holds is overwritten, an unset field is an empty variable)."""
        return {
            ENV_PREFIX + f.name.upper(): "" if getattr(self, f.name) is None else str(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def override(self, **options: Any) -> Settings:
        """These settings with the options that were given (None = not given: keep the setting)."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})


ENV_PREFIX = "DOMAINTOK_"


def _parse(kind: str, raw: str) -> Any:
    if "int" in kind:
        return int(raw)
    if "float" in kind:
        return float(raw)
    return raw
