"""The wire contract as a client in another language meets it: a kcat-style producer (librdkafka's default CRC32
partitioner, JSON lines, the fingerprint header read from the tokenizer's JSON file) and a kcat-style consumer that
reads only what the README documents (JSON values on the embeddings topic, the largest n_events per user wins).
The workers' metrics and log format are checked on the same run."""

from __future__ import annotations

import collections
import datetime as dt
import json
import socket
import time
import urllib.request
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from localkafka.demo import build_artifacts, start_encoder, start_tokenizer, stop_process, wait_ready

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample `name{labels...}` in a Prometheus text page (labels matched as a subset)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        sample_labels, value = line[len(name) + 1 :].rsplit("} ", 1)
        if all(f'{k}="{v}"' in sample_labels for k, v in labels.items()):
            return float(value)
    return None


def test_kcat_style_producer_and_consumer(kafka_settings, tmp_path):
    settings = kafka_settings
    events, tok, tok_dir, model_dir = build_artifacts(tmp_path, "ecommerce", 30, 900, seed=5)
    fingerprint = json.loads((tok_dir / "domaintok_tokenizer.json").read_text())["fingerprint"]  # jq -r .fingerprint
    app_id = f"wire-{uuid.uuid4().hex[:8]}"
    tok_port, enc_port = _free_port(), _free_port()
    tok_log, enc_log = tmp_path / "tokenizer.log", tmp_path / "encoder.log"
    procs = [
        start_tokenizer(settings, tok_dir, app_id, tok_log, DOMAINTOK_METRICS_PORT=str(tok_port),
                        F_DATADIR=str(tmp_path / "faust-data")),
        start_encoder(settings, model_dir, f"enc-{app_id}", enc_log, "--metrics-port", str(enc_port)),
    ]
    try:
        wait_ready(procs[0], tok_log)
        wait_ready(procs[1], enc_log, marker="event=start")
        # kcat -P -t events -k <user> -H domaintok-fingerprint=<fp>: librdkafka defaults, one JSON object a line,
        # timestamps as the README allows (space separator, no zone: the schema's timezone)
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        expected = collections.Counter()
        for row in events.to_pylist():
            row["timestamp"] = row["timestamp"].strftime("%Y-%m-%d %H:%M:%S.%f")
            producer.produce(settings.topic_events, key=row["user_id"].encode(), value=json.dumps(row).encode(),
                             headers=[("domaintok-fingerprint", fingerprint.encode())])
            expected[row["user_id"]] += 1
        assert producer.flush(30) == 0
        del producer  # librdkafka clients live until collected; this one has nothing left to send

        # kcat -C -t embeddings -f '%k %s\n': JSON values, keep the largest n_events per user
        reader = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"kcat-{app_id}",
                           "auto.offset.reset": "earliest"})
        reader.subscribe([settings.topic_embeddings])
        latest: dict[str, dict] = {}
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and any(latest.get(u, {}).get("n_events", 0) < n
                                                      for u, n in expected.items()):
                msg = reader.poll(0.5)
                if msg is None or msg.error():
                    continue
                value = json.loads(msg.value())
                assert msg.key().decode() == value["user_id"]
                if value["n_events"] > latest.get(value["user_id"], {}).get("n_events", 0):
                    latest[value["user_id"]] = value
        finally:
            reader.close()
        assert {u: v["n_events"] for u, v in latest.items()} == dict(expected)
        first = next(iter(latest.values()))
        assert len(first["embedding"]) > 0 and first["model_version"]
        assert dt.datetime.fromtimestamp(first["last_event_ts"] / 1e6, dt.timezone.utc).year >= 2020

        # consumer lag is reported by a 5 s timer in both workers: wait for the first report, not for a fast run
        deadline = time.monotonic() + 30
        while True:
            tok_metrics, enc_metrics = _scrape(tok_port), _scrape(enc_port)
            reported = (_metric(tok_metrics, "domaintok_consumer_lag", stage="tokenize") is not None
                        and _metric(enc_metrics, "domaintok_consumer_lag", stage="encode") is not None)
            if reported or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert _metric(tok_metrics, "domaintok_misrouted_total", stage="tokenize") > 0  # CRC32 keys forwarded
        assert _metric(tok_metrics, "domaintok_consumer_lag", stage="tokenize") is not None
        assert _metric(tok_metrics, "domaintok_events_in_total", stage="tokenize") >= len(events)
        assert _metric(enc_metrics, "domaintok_end_to_end_seconds_bucket", stage="encode", le="300.0") > 0
        assert _metric(enc_metrics, "domaintok_consumer_lag", stage="encode") is not None
    finally:
        for proc in procs:
            stop_process(proc)
    text = tok_log.read_text(errors="replace")
    assert "level=WARNING logger=domaintok.worker.tokenize event=misrouted count=" in text
    assert "level=INFO logger=faust.worker event=log msg=" in text  # Faust's own lines, in the same format
