"""Encoder worker: newest-window selection, fingerprint refusal, and on a real broker: embeddings produced, malformed
sequences dead-lettered (stage encode), offsets committed so a second run re-reads nothing."""

from __future__ import annotations

import uuid

import pytest

from domaintok.errors import ArtifactError
from streams.clients import DeadLetterReader, EmbeddingConsumer
from localkafka.demo import build_artifacts
from streams.encoder import EncoderConfig, EncoderWorker, select_newest
from streams.records import SequenceRecord, encode_record


def _seq(user, n, fp="fp"):
    return SequenceRecord(user_id=user, input_ids=[1] + [5] * n, n_events=n, last_event_ts=n, source_ts_ms=0, fingerprint=fp)


def test_select_newest_keeps_max_n_events_per_user():
    out = select_newest([_seq("a", 3), _seq("b", 1), _seq("a", 5), _seq("a", 4)])
    assert [(r.user_id, r.n_events) for r in out] == [("a", 5), ("b", 1)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    work = tmp_path_factory.mktemp("encoder")
    _, tok, tok_dir, model_dir = build_artifacts(work, "finance", 10, 300)
    other = build_artifacts(tmp_path_factory.mktemp("other"), "ecommerce", 10, 300)[2]
    return tok, tok_dir, model_dir, other


def test_refuses_model_of_another_tokenizer(embedded_kafka, artifacts):
    tok, tok_dir, model_dir, other_tok_dir = artifacts
    settings = embedded_kafka.settings()
    with pytest.raises(ArtifactError, match="fingerprint"):
        EncoderWorker(EncoderConfig(model_dir=str(model_dir), tokenizer_dir=str(other_tok_dir)), settings)


@pytest.mark.integration
def test_encodes_dead_letters_and_commits(kafka_settings, artifacts):
    from confluent_kafka import Producer

    tok, tok_dir, model_dir, _ = artifacts
    producer = Producer(kafka_settings.confluent_producer())
    seqs = [_seq("u1", 2, tok.fingerprint), _seq("u2", 1, tok.fingerprint), _seq("u1", 3, tok.fingerprint)]
    for rec in seqs:
        producer.produce(kafka_settings.topic_sequences, key=rec.user_id.encode(), value=encode_record(rec))
    producer.produce(kafka_settings.topic_sequences, key=b"bad", value=b"[1, 2")
    producer.produce(kafka_settings.topic_sequences, key=b"u3", value=encode_record(_seq("u3", 1, "another")))
    producer.flush(30)
    group = f"enc-{uuid.uuid4().hex[:8]}"
    config = EncoderConfig(model_dir=str(model_dir), group_id=group, tokenizer_dir=str(tok_dir), batch_within=0.5)
    worker = EncoderWorker(config, kafka_settings)
    worker.run(max_idle=8)
    with EmbeddingConsumer(kafka_settings) as reader:
        got = list(reader.records(idle_timeout=5))
    best = {}
    for r in got:
        best[r.user_id] = max(best.get(r.user_id, 0), r.n_events)
    assert best == {"u1": 3, "u2": 1}
    assert all(len(r.embedding) == worker.model.config.hidden_size for r in got)
    with DeadLetterReader(kafka_settings) as dl:
        dead = {d.key: d for d in dl.records(max_records=2, idle_timeout=10)}
    assert set(dead) == {b"bad", b"u3"} and dead[b"bad"].value == b"[1, 2"
    assert dead[b"bad"].stage == "encode" and "invalid sequence" in dead[b"bad"].error
    assert "fingerprint" in dead[b"u3"].error
    again = EncoderWorker(config, kafka_settings)  # same group: offsets were committed, nothing to redo
    again.run(max_idle=8)
    assert again.encoded == 0
