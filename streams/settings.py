"""Kafka connection and topic settings, read once from the environment, and the client configs derived from them.

One `KafkaSettings` feeds every client the project uses (confluent-kafka, aiokafka, Faust), so a security
setting given once (SASL, TLS) reaches all of them; its repr never shows the password.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Mapping
from typing import Any

from domaintok.errors import DomaintokError

# Every environment variable KafkaSettings reads, with the field it fills. docker-compose.yml and the tests
# check against this table, so a variable is spelled in exactly one place.
ENV_VARS: dict[str, str] = {
    "KAFKA_BOOTSTRAP_SERVERS": "bootstrap_servers",
    "KAFKA_CLIENT_ID": "client_id",
    "KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "KAFKA_SASL_USERNAME": "sasl_username",
    "KAFKA_SASL_PASSWORD": "sasl_password",
    "KAFKA_SSL_CAFILE": "ssl_cafile",
    "KAFKA_SSL_CERTFILE": "ssl_certfile",
    "KAFKA_SSL_KEYFILE": "ssl_keyfile",
    "DOMAINTOK_TOPIC_EVENTS": "topic_events",
    "DOMAINTOK_TOPIC_SEQUENCES": "topic_sequences",
    "DOMAINTOK_TOPIC_EMBEDDINGS": "topic_embeddings",
    "DOMAINTOK_TOPIC_DEAD_LETTER": "topic_dead_letter",
    "DOMAINTOK_PARTITIONS": "partitions",
}

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# The broker holds a JoinGroup for session timeout / 2 before answering; librdkafka's 45 s default meant
# 23 s before the first message (notes/kafka-measurements.md). 6 s keeps joins at ~3 s and is still safe.
SESSION_TIMEOUT_MS = 6000


@dataclasses.dataclass(frozen=True, kw_only=True)
class KafkaSettings:
    """Where the brokers are, how to authenticate, and which topics the pipeline uses.

    `bootstrap_servers=None` means "no broker given": commands that need one start the local embedded broker.
    """

    bootstrap_servers: str | None = None
    client_id: str = "domaintok"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = dataclasses.field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    topic_events: str = "domaintok.events"
    topic_sequences: str = "domaintok.sequences"
    topic_embeddings: str = "domaintok.embeddings"
    topic_dead_letter: str = "domaintok.dead-letter"
    partitions: int = 8

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise DomaintokError(
                f"KAFKA_SECURITY_PROTOCOL={self.security_protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)}"
            )
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise DomaintokError(
                    f"KAFKA_SASL_MECHANISM={self.sasl_mechanism!r} is not one of {', '.join(SASL_MECHANISMS)} "
                    f"(required by KAFKA_SECURITY_PROTOCOL={self.security_protocol})"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise DomaintokError(
                    f"KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required by "
                    f"KAFKA_SECURITY_PROTOCOL={self.security_protocol}"
                )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise DomaintokError("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE must be given together (client TLS cert)")
        if self.partitions < 1:
            raise DomaintokError(f"DOMAINTOK_PARTITIONS={self.partitions} must be >= 1")

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSettings:
        """Settings from `environ` (default `os.environ`); unset or empty variables keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for var, field in ENV_VARS.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            if field == "partitions":
                try:
                    values[field] = int(raw)
                except ValueError:
                    raise DomaintokError(f"{var}={raw!r} is not an integer") from None
            elif field in ("security_protocol", "sasl_mechanism"):
                values[field] = raw.upper()
            else:
                values[field] = raw
        return cls(**values)

    def replace(self, **changes: Any) -> KafkaSettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_bootstrap(self, bootstrap_servers: str) -> KafkaSettings:
        return self.replace(bootstrap_servers=bootstrap_servers)

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings (for child processes: workers, tests)."""
        env = {}
        for var, field in ENV_VARS.items():
            value = getattr(self, field)
            if value is not None:
                env[var] = str(value)
        return env

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "sasl_password" and value is not None:
                value = "***"
            shown.append(f"{f.name}={value!r}")
        return f"KafkaSettings({', '.join(shown)})"

    __str__ = __repr__

    # -- derived facts --------------------------------------------------------------------------------------

    @property
    def topics(self) -> dict[str, str]:
        """Role -> topic name, for the four topics of the pipeline."""
        return {
            "events": self.topic_events,
            "sequences": self.topic_sequences,
            "embeddings": self.topic_embeddings,
            "dead-letter": self.topic_dead_letter,
        }

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def require_bootstrap(self) -> str:
        """The bootstrap servers, or a one-line error saying how to give them."""
        if not self.bootstrap_servers:
            raise DomaintokError(
                "no Kafka broker given: set KAFKA_BOOTSTRAP_SERVERS (or start one with `domaintok broker`)"
            )
        return self.bootstrap_servers

    # -- confluent-kafka ------------------------------------------------------------------------------------

    def confluent_common(self) -> dict[str, Any]:
        """librdkafka properties shared by producers, consumers and admin clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.require_bootstrap(),
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        if self.uses_sasl:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password
        if self.uses_tls:
            if self.ssl_cafile:
                conf["ssl.ca.location"] = self.ssl_cafile
            if self.ssl_certfile:
                conf["ssl.certificate.location"] = self.ssl_certfile
                conf["ssl.key.location"] = self.ssl_keyfile
        return conf

    def confluent_producer(self, **overrides: Any) -> dict[str, Any]:
        """Producer config: murmur2 partitioning (Java's default, what Faust Tables expect), batched for throughput."""
        conf = self.confluent_common()
        conf.update(
            {
                "partitioner": "murmur2_random",
                "linger.ms": 5,
                "batch.size": 512 * 1024,
                "compression.type": "lz4",
                "enable.idempotence": True,
                "acks": "all",
            }
        )
        conf.update(overrides)
        return conf

    def confluent_consumer(self, group_id: str, **overrides: Any) -> dict[str, Any]:
        """Consumer config for `group_id`: earliest on a new group, offsets committed by the caller."""
        conf = self.confluent_common()
        conf.update(
            {
                "group.id": group_id,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": 1000,
            }
        )
        conf.update(overrides)
        return conf

    def confluent_admin(self, **overrides: Any) -> dict[str, Any]:
        conf = self.confluent_common()
        conf.update(overrides)
        return conf

    # -- aiokafka / Faust -----------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client TLS context from the CA/cert/key files, or None when TLS is off."""
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise DomaintokError(f"cannot load TLS files (KAFKA_SSL_CAFILE/CERTFILE/KEYFILE): {exc}") from None
        return context

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.require_bootstrap().split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def faust_broker_url(self) -> str:
        """`kafka://host:port;kafka://host2:port2`, the form Faust's `broker` setting takes."""
        return ";".join(f"kafka://{server.strip()}" for server in self.require_bootstrap().split(","))

    def faust_settings(self) -> dict[str, Any]:
        """Keyword arguments for `faust.App`: broker URL, credentials and the fast-join session timeout."""
        settings: dict[str, Any] = {
            "broker": self.faust_broker_url(),
            "broker_client_id": self.client_id,
            "broker_session_timeout": SESSION_TIMEOUT_MS / 1000,
            "broker_heartbeat_interval": 1,
            "topic_partitions": self.partitions,
        }
        credentials = self.faust_credentials()
        if credentials is not None:
            settings["broker_credentials"] = credentials
        return settings

    def faust_credentials(self) -> Any:
        """A faust Credentials object (SASL or SSL), or None for PLAINTEXT."""
        if self.security_protocol == "PLAINTEXT":
            return None
        from faust.auth import SASLCredentials, SSLCredentials  # heavy import, only when security is on

        if self.uses_sasl:
            return SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                mechanism=self.sasl_mechanism,
                ssl_context=self.ssl_context(),
            )
        return SSLCredentials(self.ssl_context())
