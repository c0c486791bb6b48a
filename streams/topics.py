"""Creating the pipeline's topics (an admin call every deployment needs, whichever Kafka it runs on)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from domaintok.errors import DomaintokError
from streams.settings import KafkaSettings

# librdkafka logs every refused connection to stderr; while we poll a starting broker that is expected noise.
_QUIET = logging.getLogger("domaintok.broker.rdkafka")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def ensure_topics(
    settings: KafkaSettings,
    names: Iterable[str] | None = None,
    partitions: int | None = None,
    *,
    replication_factor: int = -1,
    timeout: float = 30.0,
    exact: bool = True,
) -> dict[str, int]:
    """Create `names` (default: the pipeline's four topics) with `partitions` each, and wait until they exist.

    Existing topics are left alone; one with a different partition count is an error (keys would land on
    different partitions than the pipeline's Table changelogs expect) unless `exact=False` (a producer does
    not care). Returns name -> partition count.
    `replication_factor=-1` takes the broker's default.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.clients import wait_for_metadata
    from streams.settings import DEAD_LETTER_MAX_BYTES

    names = list(settings.topics.values() if names is None else names)
    partitions = partitions or settings.partitions
    admin = AdminClient(settings.confluent_admin(logger=_QUIET))
    wait_for_metadata(admin, settings, timeout=timeout)  # refused credentials: KafkaAuthError now, not a 30 s hang
    # the dead-letter topic holds whole events plus headers: room for any record the events topic accepted
    configs = {settings.topic_dead_letter: {"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)}}
    deadline = time.monotonic() + timeout
    # The broker may take a moment to accept CreateTopics after start; retry transient errors.
    pending = set(names)
    while pending:
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor, config=configs.get(n, {}))
             for n in sorted(pending)],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result()
                pending.discard(name)
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    pending.discard(name)
                elif not err.retriable() or time.monotonic() > deadline:
                    raise DomaintokError(f"cannot create topic {name!r}: {err.str()}") from None
        if pending:
            time.sleep(0.2)

    found: dict[str, int] = {}
    while True:
        metadata = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        found = {}
        for name in names:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                continue
            if topic.partitions and all(p.leader >= 0 for p in topic.partitions.values()):
                found[name] = len(topic.partitions)
        if len(found) == len(names):
            break
        if time.monotonic() > deadline:
            missing = sorted(set(names) - set(found))
            raise DomaintokError(f"topics not ready after {timeout:.0f} s: {', '.join(missing)}")
        time.sleep(0.1)
    wrong = {n: p for n, p in found.items() if p != partitions}
    if wrong and exact:
        detail = ", ".join(f"{n} has {p}" for n, p in sorted(wrong.items()))
        raise DomaintokError(f"topics exist with a partition count other than {partitions}: {detail}")
    return found
