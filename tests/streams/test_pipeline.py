"""The online pipeline on a real broker: tokenizer worker(s) + encoder worker as subprocesses, events in, embeddings out.

Checks completeness (one final embedding per user with n_events = events sent), dead-letter with reasons, two
workers sharing partitions with a kill -9 and restart of one (no loss, n_events exact), and online/offline parity.
"""

from __future__ import annotations

import collections
import time
import uuid

import msgspec
import numpy as np
import pytest

from streams.clients import DeadLetterReader, EmbeddingConsumer, EventProducer
from localkafka.demo import build_artifacts, event_rows, producer_overrides, start_encoder, start_tokenizer, stop_process, wait_ready
from streams.records import event_headers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    events, tok, tok_dir, model_dir = build_artifacts(work, "ecommerce", 40, 2400, seed=3)
    return work, events, tok, tok_dir, model_dir


def _expected_counts(events, tok) -> dict[str, int]:
    return dict(collections.Counter(events.column(tok.schema.user_id).cast("string").to_pylist()))


def _collect(settings, expected: dict[str, int], timeout: float = 120.0) -> dict:
    latest: dict = {}
    with EmbeddingConsumer(settings) as reader:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in reader.poll_batch(2000, timeout=0.5):
                cur = latest.get(rec.user_id)
                if cur is None or rec.n_events > cur.n_events:
                    latest[rec.user_id] = rec
            if all(u in latest and latest[u].n_events >= n for u, n in expected.items()):
                break
    return latest


def test_complete_dead_letter_and_offline_parity(kafka_settings, artifacts):
    from domaintok.models.embedding import embed_sequences, load_encoder

    work, events, tok, tok_dir, model_dir = artifacts
    app_id = f"tok-{uuid.uuid4().hex[:8]}"
    procs = [start_tokenizer(kafka_settings, tok_dir, app_id, work / f"{app_id}.log"),
             start_encoder(kafka_settings, model_dir, f"enc-{app_id}", work / f"enc-{app_id}.log")]
    try:
        wait_ready(procs[0], work / f"{app_id}.log")
        rows = event_rows(events, tok)
        with EventProducer(kafka_settings, fingerprint=tok.fingerprint, **producer_overrides()) as producer:
            producer.send_many(rows[:1200])
            producer.send(b"{not json", b"u-bad")
            producer.send(msgspec.json.encode(rows[0]), b"u-fp", headers=event_headers("someone-else"))
            producer.send_many(rows[1200:])
        expected = _expected_counts(events, tok)
        latest = _collect(kafka_settings, expected)
        assert {u: r.n_events for u, r in latest.items()} == expected
        with DeadLetterReader(kafka_settings) as dl:
            dead = list(dl.records(max_records=2, idle_timeout=20))
        assert sorted(d.key for d in dead) == [b"u-bad", b"u-fp"]
        assert all(d.stage == "tokenize" and d.source.startswith(kafka_settings.topic_events + "/") for d in dead)
        reasons = {d.key: d.error for d in dead}
        assert "invalid event" in reasons[b"u-bad"] and "fingerprint" in reasons[b"u-fp"]
        assert next(d for d in dead if d.key == b"u-bad").value == b"{not json"
    finally:
        for proc in procs:
            stop_process(proc)
    # parity: the same events tokenized offline and embedded in one batch give the streamed embeddings
    offline = tok.tokenize(events).to_pylist()
    model = load_encoder(model_dir, device="cpu")
    emb = embed_sequences(model, [np.asarray(r["input_ids"]) for r in offline])
    diff = max(float(np.abs(np.asarray(latest[r["user_id"]].embedding, np.float32) - e).max()) for r, e in zip(offline, emb))
    print(f"online/offline max abs diff: {diff:.2e}")
    assert diff < 1e-4


def test_two_workers_and_kill_restart_lose_nothing(kafka_settings, artifacts):
    work, events, tok, tok_dir, model_dir = artifacts
    app_id = f"tok2-{uuid.uuid4().hex[:8]}"
    logs = [work / f"{app_id}-{i}.log" for i in range(3)]
    procs = [start_tokenizer(kafka_settings, tok_dir, app_id, logs[0]),
             start_tokenizer(kafka_settings, tok_dir, app_id, logs[1]),
             start_encoder(kafka_settings, model_dir, f"enc-{app_id}", work / f"enc-{app_id}.log")]
    try:
        wait_ready(procs[0], logs[0])
        wait_ready(procs[1], logs[1])
        rows = event_rows(events, tok)
        with EventProducer(kafka_settings, fingerprint=tok.fingerprint, **producer_overrides()) as producer:
            producer.send_many(rows[:1000])
        time.sleep(3)
        procs[1].kill()  # kill -9: no commit, no flush of its last batch
        procs[1].wait(10)
        with EventProducer(kafka_settings, fingerprint=tok.fingerprint, **producer_overrides()) as producer:
            producer.send_many(rows[1000:1800])
        procs[1] = start_tokenizer(kafka_settings, tok_dir, app_id, logs[2])
        wait_ready(procs[1], logs[2])
        with EventProducer(kafka_settings, fingerprint=tok.fingerprint, **producer_overrides()) as producer:
            producer.send_many(rows[1800:])
        expected = _expected_counts(events, tok)
        latest = _collect(kafka_settings, expected, timeout=150)
        assert {u: r.n_events for u, r in latest.items()} == expected
        assert all(log.read_text().count("Ready") >= 1 for log in (logs[0], logs[2]))
    finally:
        for proc in procs:
            stop_process(proc)
