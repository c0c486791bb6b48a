"""Kafka connection and topic settings, read once from the environment, and the client configs derived from them.

One `KafkaSettings` feeds every client the project uses (confluent-kafka, aiokafka, Faust), so a security
setting given once (SASL, TLS) reaches all of them; its repr never shows the password.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
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
    "KAFKA_SSL_KEY_PASSWORD": "ssl_key_password",
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

# Record size limits. Producers of events refuse values over EVENT_MAX_BYTES (librdkafka's default
# message.max.bytes; the broker's default topic limit is 1 MiB). A dead letter is the original record plus a few
# headers, so the dead-letter topic (created by ensure_topics) and the workers' producers allow DEAD_LETTER_MAX_BYTES:
# every record the events topic accepted can be dead-lettered whole.
EVENT_MAX_BYTES = 1_000_000
DEAD_LETTER_MAX_BYTES = 2 * 1024 * 1024

# Fields whose values are secrets: never shown by repr/str (to_env still passes them to child processes).
SECRET_FIELDS = ("sasl_password", "ssl_key_password")

# librdkafka's own log lines (connection failures, retries) go here instead of straight to stderr: a CLI then
# prints one clear error instead of a screen of `%3|...|FAIL|` lines; workers that configure logging still see them.
RDKAFKA_LOG = logging.getLogger("domaintok.rdkafka")
RDKAFKA_LOG.addHandler(logging.NullHandler())


class KafkaAuthError(DomaintokError):
    """The broker refused our credentials or TLS handshake: retrying with the same settings cannot succeed."""


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
    ssl_key_password: str | None = dataclasses.field(default=None, repr=False)
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
            if f.name in SECRET_FIELDS and value is not None:
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
                if self.ssl_key_password is not None:
                    conf["ssl.key.password"] = self.ssl_key_password
        conf["error_cb"] = self.raise_on_auth_error
        conf["logger"] = RDKAFKA_LOG
        return conf

    def describe_auth(self) -> str:
        """Who we connect as, without secrets: `user 'alice' (SASL_SSL SCRAM-SHA-256, host:port)`."""
        who = f"user {self.sasl_username!r} " if self.uses_sasl else ""
        how = f"{self.security_protocol} {self.sasl_mechanism}" if self.uses_sasl else self.security_protocol
        return f"{who}({how}, {self.bootstrap_servers})"

    def raise_on_auth_error(self, err: Any) -> None:
        """librdkafka error_cb: an authentication or TLS failure becomes KafkaAuthError, raised by the client call
        (poll/consume/flush) that served it, so a worker or CLI stops with one line instead of retrying forever.
        Other errors (broker down, timeouts) are transient: librdkafka retries them and logs through RDKAFKA_LOG."""
        from confluent_kafka import KafkaError  # heavy import, only when a client exists

        code = err.code()
        # the broker refusing our client certificate comes as a transport error carrying the TLS alert
        refused_cert = code == KafkaError._TRANSPORT and re.search(r"SSL routines.*alert", err.str()) is not None
        if code not in (KafkaError._AUTHENTICATION, KafkaError._SSL) and not refused_cert:
            return
        detail = re.sub(r"\s*\(after \d+ms in state \w+\)", "", err.str())
        detail = detail.split(": ", 1)[1] if "://" in detail.split(": ", 1)[0] else detail  # drop "sasl_ssl://h:p/id: "
        what = "authentication" if code == KafkaError._AUTHENTICATION else "TLS handshake"
        hint = ("check KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD / KAFKA_SASL_MECHANISM"
                if code == KafkaError._AUTHENTICATION else "check KAFKA_SSL_CAFILE / KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE")
        raise KafkaAuthError(f"Kafka {what} failed for {self.describe_auth()}: {' '.join(detail.split())} ({hint})")

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
                # room for a dead letter of a maximal event (its headers come on top of the original bytes)
                "message.max.bytes": DEAD_LETTER_MAX_BYTES,
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
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password=self.ssl_key_password)
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
            "producer_max_request_size": DEAD_LETTER_MAX_BYTES,  # dead letters of maximal events (EVENT_MAX_BYTES)
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
