"""A tokenizer agent that fails ends its worker process (exit 70) instead of idling with partitions assigned, and
the failed batch is replayed by the next worker: nothing is lost.

The failure is real, not injected into the code: the sequences topic is set to refuse records larger than 64 bytes,
so every send of the agent fails at the broker. Restoring the limit and starting a new worker must then deliver
every user's full count.
"""

from __future__ import annotations

import collections
import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from streams.clients import EventProducer, _TopicReader
from localkafka.demo import build_artifacts, event_rows, producer_overrides, start_tokenizer, stop_process, wait_ready
from streams.records import SequenceRecord, decode_sequence


EXIT_AGENT_FAILED = 70  # streams.app.EXIT_AGENT_FAILED


class _Sequences(_TopicReader[SequenceRecord]):
    def _decode(self, msg) -> SequenceRecord:
        return decode_sequence(msg.value())


def _set_max_message_bytes(settings, value: int | None) -> None:
    admin = AdminClient(settings.confluent_admin())
    op = AlterConfigOpType.DELETE if value is None else AlterConfigOpType.SET
    entry = ConfigEntry("max.message.bytes", "" if value is None else str(value), incremental_operation=op)
    resource = ConfigResource(ConfigResource.Type.TOPIC, settings.topic_sequences, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


@pytest.mark.requires_apache("alters a topic config (incremental_alter_configs) and checks broker-side refusal")
def test_failed_agent_exits_and_the_batch_is_replayed(kafka_settings, tmp_path):
    events, tok, tok_dir, _ = build_artifacts(tmp_path, "ecommerce", 20, 400, seed=5)
    expected = collections.Counter(events.column(tok.schema.user_id).cast("string").to_pylist())
    app_id = f"crash-{uuid.uuid4().hex[:8]}"
    _set_max_message_bytes(kafka_settings, 64)
    log = tmp_path / "first.log"
    proc = start_tokenizer(kafka_settings, tok_dir, app_id, log)
    try:
        wait_ready(proc, log)
        with EventProducer(kafka_settings, fingerprint=tok.fingerprint, **producer_overrides()) as producer:
            producer.send_many(event_rows(events, tok))
        code = proc.wait(timeout=120)
    finally:
        stop_process(proc)
    text = log.read_text(errors="replace")
    assert code == EXIT_AGENT_FAILED, text[-3000:]
    assert "tokenize agent failed, exiting" in text

    _set_max_message_bytes(kafka_settings, None)
    log2 = tmp_path / "second.log"
    proc = start_tokenizer(kafka_settings, tok_dir, app_id, log2)
    latest: dict[str, int] = {}
    try:
        wait_ready(proc, log2)
        with _Sequences(kafka_settings, kafka_settings.topic_sequences) as reader:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(latest.get(u, 0) < n for u, n in expected.items()):
                for rec in reader.poll_batch(2000, timeout=0.5):
                    latest[rec.user_id] = max(latest.get(rec.user_id, 0), rec.n_events)
    finally:
        stop_process(proc)
    assert latest == dict(expected), (latest, dict(expected))
