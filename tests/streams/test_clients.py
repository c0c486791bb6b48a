"""Settings from the environment (SASL/TLS configs, secret masking), the producer/consumer clients against a real
broker (keys, headers, Java-murmur2 partition placement, dedupe, dead letters), and the produce/consume commands.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid

import msgspec
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from domaintok.cli import cli
from domaintok.errors import DomaintokError
from domaintok.synthetic import generate_events, write_events_parquet
from streams.clients import DeadLetterReader, DeliveryError, EmbeddingConsumer, EventProducer, latest_per_user
from streams.records import (
    CONTENT_TYPE_MSGPACK,
    HEADER_CONTENT_TYPE,
    HEADER_ERROR,
    HEADER_FINGERPRINT,
    HEADER_SOURCE,
    HEADER_STAGE,
    EmbeddingRecord,
    SequenceRecord,
    dead_letter_headers,
    decode_embedding,
    decode_sequence,
    encode_record,
    parse_dead_letter_source,
)
from streams.settings import ENV_VARS, KafkaSettings

# -- murmur2, written here from the Java client's Utils.murmur2 (not from the code under test) ------------------


def java_murmur2(data: bytes) -> int:
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(data)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length & ~3
    rest = length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def java_partition(key: bytes, partitions: int) -> int:
    # Java: Utils.toPositive(murmur2(key)) % numPartitions, toPositive = x & 0x7fffffff.
    return (java_murmur2(key) & 0x7FFFFFFF) % partitions


def test_java_murmur2_reference_values():
    # Values from the Java client's UtilsTest.testMurmur2 (as signed ints there).
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829, b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
             b"abc": 479470107}
    for key, signed in cases.items():
        assert java_murmur2(key) == signed & 0xFFFFFFFF, key


# -- settings ------------------------------------------------------------------------------------------------


def test_settings_defaults_and_topics():
    s = KafkaSettings.from_env({})
    assert s.bootstrap_servers is None
    assert s.topics == {
        "events": "domaintok.events",
        "sequences": "domaintok.sequences",
        "embeddings": "domaintok.embeddings",
        "dead-letter": "domaintok.dead-letter",
    }
    assert s.partitions == 8
    with pytest.raises(DomaintokError, match="KAFKA_BOOTSTRAP_SERVERS"):
        s.confluent_producer()


def test_settings_from_env_reads_every_variable():
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "KAFKA_CLIENT_ID": "svc",
        "KAFKA_SECURITY_PROTOCOL": "sasl_plaintext",
        "KAFKA_SASL_MECHANISM": "scram-sha-512",
        "KAFKA_SASL_USERNAME": "alice",
        "KAFKA_SASL_PASSWORD": "s3cr3t-pw",
        "KAFKA_SSL_CAFILE": "",
        "DOMAINTOK_TOPIC_EVENTS": "e",
        "DOMAINTOK_TOPIC_SEQUENCES": "s",
        "DOMAINTOK_TOPIC_EMBEDDINGS": "m",
        "DOMAINTOK_TOPIC_DEAD_LETTER": "d",
        "DOMAINTOK_PARTITIONS": "12",
    }
    s = KafkaSettings.from_env(env)
    assert (s.bootstrap_servers, s.client_id, s.security_protocol, s.sasl_mechanism) == (
        "k1:9092,k2:9092", "svc", "SASL_PLAINTEXT", "SCRAM-SHA-512")
    assert (s.topic_events, s.topic_sequences, s.topic_embeddings, s.topic_dead_letter, s.partitions) == (
        "e", "s", "m", "d", 12)
    assert s.ssl_cafile is None  # empty means unset
    # to_env round-trips (child processes get the same settings).
    assert KafkaSettings.from_env(s.to_env()) == s
    assert set(s.to_env()) <= set(ENV_VARS)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_reaches_every_client(mechanism):
    s = KafkaSettings(bootstrap_servers="k:9092", security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism,
                      sasl_username="alice", sasl_password="pw")
    for conf in (s.confluent_producer(), s.confluent_consumer("g"), s.confluent_admin()):
        assert conf["security.protocol"] == "SASL_PLAINTEXT"
        assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (mechanism, "alice", "pw")
        assert "ssl.ca.location" not in conf
    kw = s.aiokafka_kwargs()
    assert kw["bootstrap_servers"] == ["k:9092"]
    assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        "SASL_PLAINTEXT", mechanism, "alice", "pw")
    assert "ssl_context" not in kw
    faust = s.faust_settings()
    assert faust["broker"] == "kafka://k:9092"
    assert faust["broker_session_timeout"] == 6
    creds = faust["broker_credentials"]
    assert (creds.username, creds.password, creds.mechanism.value, creds.protocol.value) == (
        "alice", "pw", mechanism, "SASL_PLAINTEXT")
    # The faust broker credentials turn into exactly the aiokafka arguments above.
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(creds)
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["sasl_plain_password"]) == (
        "SASL_PLAINTEXT", mechanism, "pw")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A throwaway CA and a client cert/key signed by it (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI absent: cannot make TLS test files")
    d = tmp_path_factory.mktemp("tls")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=client")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2")
    return {name: str(d / name) for name in ("ca.pem", "client.pem", "client.key")}


def test_sasl_ssl_with_client_cert(tls_files):
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "k:9093",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "KAFKA_SASL_USERNAME": "bob",
        "KAFKA_SASL_PASSWORD": "pw",
        "KAFKA_SSL_CAFILE": tls_files["ca.pem"],
        "KAFKA_SSL_CERTFILE": tls_files["client.pem"],
        "KAFKA_SSL_KEYFILE": tls_files["client.key"],
    }
    s = KafkaSettings.from_env(env)
    conf = s.confluent_consumer("g")
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["ssl.ca.location"] == tls_files["ca.pem"]
    assert conf["ssl.certificate.location"] == tls_files["client.pem"]
    assert conf["ssl.key.location"] == tls_files["client.key"]
    kw = s.aiokafka_kwargs()
    ctx = kw["ssl_context"]
    assert kw["security_protocol"] == "SASL_SSL" and ctx.verify_mode.name == "CERT_REQUIRED"
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "test-ca"),),)]
    creds = s.faust_settings()["broker_credentials"]
    assert creds.protocol.value == "SASL_SSL" and creds.ssl_context is not None


def test_ssl_only_gives_faust_ssl_credentials(tls_files):
    s = KafkaSettings(bootstrap_servers="k:9093", security_protocol="SSL", ssl_cafile=tls_files["ca.pem"])
    assert "sasl.mechanism" not in s.confluent_producer()
    creds = s.faust_settings()["broker_credentials"]
    assert creds.protocol.value == "SSL" and creds.context.verify_mode.name == "CERT_REQUIRED"


def test_password_is_masked_in_repr_and_str():
    s = KafkaSettings(bootstrap_servers="k:9092", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                      sasl_username="alice", sasl_password="hunter2-secret")
    for text in (repr(s), str(s), f"{s}", repr([s])):
        assert "hunter2-secret" not in text
        assert "sasl_password='***'" in text and "sasl_username='alice'" in text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL='TLS' is not one of"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM='GSSAPI'"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN"}, "KAFKA_SASL_USERNAME and"),
        ({"KAFKA_SSL_CERTFILE": "c.pem"}, "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE"),
        ({"DOMAINTOK_PARTITIONS": "eight"}, "DOMAINTOK_PARTITIONS='eight' is not an integer"),
        ({"DOMAINTOK_PARTITIONS": "0"}, "DOMAINTOK_PARTITIONS=0 must be >= 1"),
    ],
)
def test_bad_settings_are_one_line_errors(env, message):
    with pytest.raises(DomaintokError, match=message.replace("(", r"\(")):
        KafkaSettings.from_env(env)


# -- records -------------------------------------------------------------------------------------------------


def test_records_round_trip_and_reject_unknown_fields():
    seq = SequenceRecord(user_id="u1", input_ids=[2, 10, 4], n_events=7, last_event_ts=1, source_ts_ms=2, fingerprint="f")
    assert decode_sequence(encode_record(seq)) == seq
    assert decode_sequence(encode_record(seq, CONTENT_TYPE_MSGPACK), CONTENT_TYPE_MSGPACK) == seq
    emb = EmbeddingRecord(user_id="u1", embedding=[0.25, -1.5], n_events=7, last_event_ts=1, model_version="m",
                          produced_at=3, source_ts_ms=2)
    assert msgspec.json.decode(encode_record(emb)) == {
        "user_id": "u1", "embedding": [0.25, -1.5], "n_events": 7, "last_event_ts": 1, "model_version": "m",
        "produced_at": 3, "source_ts_ms": 2}
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        decode_embedding(encode_record(seq))


def test_dead_letter_headers_keep_originals_and_replace_ours():
    original = [("content-type", b"application/json"), ("domaintok-fingerprint", b"fp"), (HEADER_ERROR, b"old")]
    headers = dead_letter_headers(original, error="bad\nthing  here", topic="t.events", partition=3, offset=42,
                                  stage="tokenize")
    assert headers == [
        ("content-type", b"application/json"),
        ("domaintok-fingerprint", b"fp"),
        (HEADER_ERROR, b"bad thing here"),
        (HEADER_SOURCE, b"t.events/3/42"),
        (HEADER_STAGE, b"tokenize"),
    ]
    assert parse_dead_letter_source("t.events/3/42") == ("t.events", 3, 42)
    with pytest.raises(ValueError, match="unknown stage"):
        dead_letter_headers([], error="x", topic="t", partition=0, offset=0, stage="embed")


def test_latest_per_user_keeps_largest_n_events():
    def rec(user, n, produced):
        return EmbeddingRecord(user_id=user, embedding=[float(n)], n_events=n, last_event_ts=n, model_version="m",
                               produced_at=produced, source_ts_ms=0)

    records = [rec("a", 3, 1), rec("b", 1, 1), rec("a", 5, 2), rec("a", 4, 3), rec("b", 1, 5)]
    best = latest_per_user(records)
    assert {u: (r.n_events, r.produced_at) for u, r in best.items()} == {"a": (5, 2), "b": (1, 5)}


def test_delivery_failures_are_raised_by_flush():
    from localkafka.broker import free_port

    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")  # nothing listens there
    quiet = logging.getLogger("test.rdkafka")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    producer = EventProducer(settings, topic="nowhere", logger=quiet, **{"message.timeout.ms": 500})
    producer.send_many([{"user_id": "u1", "x": 1}, {"user_id": "u2", "x": 2}])
    with pytest.raises(DeliveryError, match="2 of 2 records failed delivery"):
        producer.flush(10)


# -- against a broker ------------------------------------------------------------------------------------------


def _read_raw(settings: KafkaSettings, topic: str, expected: int, timeout: float = 30.0):
    consumer = Consumer(settings.confluent_consumer(f"raw-{uuid.uuid4().hex[:8]}"))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    out.append(msg)
    finally:
        consumer.close()
    return out


@pytest.mark.integration
@pytest.mark.kafka_partitions(5)
def test_producer_places_keys_like_java_murmur2(kafka_any_settings):
    settings = kafka_any_settings
    users = [f"user-{i}" for i in range(40)] + ["17850", "ü-ñ", "a"]
    events = [{"user_id": u, "seq": i} for i, u in enumerate(users)]
    with EventProducer(settings, fingerprint="fp-123") as producer:
        assert producer.send_many(events) == len(events)
    messages = _read_raw(settings, settings.topic_events, len(events))
    assert len(messages) == len(events)
    placed = {m.key().decode(): m.partition() for m in messages}
    assert placed == {u: java_partition(u.encode(), 5) for u in users}
    assert len(set(placed.values())) == 5  # the keys really spread, so the check above means something
    for m in messages:
        headers = dict(m.headers())
        assert headers == {HEADER_CONTENT_TYPE: b"application/json", HEADER_FINGERPRINT: b"fp-123"}
        value = msgspec.json.decode(m.value())
        assert value["user_id"] == m.key().decode()


@pytest.mark.integration
def test_producer_msgpack_and_event_struct(kafka_any_settings):
    import datetime as dt

    Event = msgspec.defstruct("Event", [("user_id", str), ("timestamp", dt.datetime), ("amount", float)],
                              kw_only=True, forbid_unknown_fields=True)
    settings = kafka_any_settings
    events = [{"user_id": "u1", "timestamp": "2024-01-02T03:04:05Z", "amount": "1.5"},
              {"user_id": "u2", "timestamp": "2024-01-02T03:04:06Z", "amount": -2}]
    with EventProducer(settings, content_type=CONTENT_TYPE_MSGPACK, event_struct=Event) as producer:
        producer.send_many(events)
        with pytest.raises(DomaintokError, match="event 3 does not match"):
            producer.send_many([{"user_id": "u3", "amount": 1.0, "colour": "red"}])
    messages = sorted(_read_raw(settings, settings.topic_events, 2), key=lambda m: m.key())
    assert [dict(m.headers())[HEADER_CONTENT_TYPE] for m in messages] == [b"application/msgpack"] * 2
    decoded = [msgspec.msgpack.decode(m.value(), type=Event) for m in messages]
    assert [(e.user_id, e.amount, e.timestamp.second) for e in decoded] == [("u1", 1.5, 5), ("u2", -2.0, 6)]


def _produce_embeddings(settings, records):
    producer = Producer(settings.confluent_producer())
    for r in records:
        producer.produce(settings.topic_embeddings, key=r.user_id.encode(), value=encode_record(r))
    assert producer.flush(30) == 0


def _emb(user, n):
    return EmbeddingRecord(user_id=user, embedding=[n / 10, -n / 10], n_events=n, last_event_ts=1_700_000_000_000_000 + n,
                           model_version="tiny-abc", produced_at=1_800_000_000_000_000 + n, source_ts_ms=n)


@pytest.mark.integration
def test_embedding_consumer_with_and_without_group(kafka_any_settings):
    settings = kafka_any_settings
    records = [_emb("a", 1), _emb("b", 2), _emb("a", 3), _emb("a", 2)]
    _produce_embeddings(settings, records)
    with EmbeddingConsumer(settings, from_beginning=True) as consumer:
        got = list(consumer.records(max_records=4, idle_timeout=20))
    assert sorted(got, key=lambda r: (r.user_id, r.n_events)) == sorted(records, key=lambda r: (r.user_id, r.n_events))
    assert {u: r.n_events for u, r in latest_per_user(got).items()} == {"a": 3, "b": 2}
    # With a group: committed progress means a second reader of the same group sees only newer records.
    group = f"emb-{uuid.uuid4().hex[:8]}"
    with EmbeddingConsumer(settings, group_id=group) as consumer:
        assert len(list(consumer.records(max_records=4, idle_timeout=20))) == 4
        consumer.commit()
    _produce_embeddings(settings, [_emb("c", 9)])
    with EmbeddingConsumer(settings, group_id=group) as consumer:
        assert [r.user_id for r in consumer.records(max_records=1, idle_timeout=20)] == ["c"]


@pytest.mark.integration
def test_dead_letter_reader(kafka_any_settings):
    settings = kafka_any_settings
    producer = Producer(settings.confluent_producer())
    headers = dead_letter_headers([("content-type", b"application/json")], error="null user id (user_id)",
                                  topic=settings.topic_events, partition=1, offset=7, stage="tokenize")
    producer.produce(settings.topic_dead_letter, key=None, value=b'{"user_id": null}', headers=headers)
    assert producer.flush(30) == 0
    with DeadLetterReader(settings, from_beginning=True) as reader:
        [dead] = list(reader.records(max_records=1, idle_timeout=20))
    assert (dead.key, dead.value, dead.error, dead.stage) == (None, b'{"user_id": null}', "null user id (user_id)", "tokenize")
    assert dead.source == f"{settings.topic_events}/1/7"
    assert ("content-type", b"application/json") in dead.headers


@pytest.mark.integration
def test_reader_on_a_missing_topic_is_a_one_line_error(kafka_any):
    settings = kafka_any.settings()
    if kafka_any.kind == "embedded":
        pytest.skip("tansu auto-creates any topic a client asks metadata for")
    with pytest.raises(DomaintokError, match="does not exist"):
        EmbeddingConsumer(settings, topic=f"missing-{uuid.uuid4().hex[:6]}", **{"allow.auto.create.topics": False})


# -- the produce / consume commands ----------------------------------------------------------------------------


def _invoke(args, settings: KafkaSettings, **kwargs):
    result = CliRunner().invoke(cli, args, env=settings.to_env(), catch_exceptions=False, **kwargs)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def finance_tokenizer(tmp_path_factory):
    from domaintok.tokenizer import DomainTokenizer

    d = tmp_path_factory.mktemp("finance")
    events = d / "events.parquet"
    write_events_parquet(generate_events("finance", 50, 2000, seed=3), events)
    DomainTokenizer.fit("finance", events, bpe_vocab_size=300).save_pretrained(d / "tok")
    return d / "tok"


@pytest.mark.integration
def test_produce_synthetic_with_tokenizer(kafka_any_settings, finance_tokenizer, tmp_path):
    from domaintok.tokenizer import DomainTokenizer

    tok = DomainTokenizer.from_pretrained(finance_tokenizer)
    settings = kafka_any_settings
    saved = tmp_path / "events.parquet"
    metrics = tmp_path / "produce.json"
    result = _invoke(["produce", "--synthetic", "finance", "--users", "20", "--events", "300", "--seed", "5",
                      "--tokenizer", str(finance_tokenizer), "--save-parquet", str(saved), "--metrics", str(metrics),
                      "--quiet"], settings)
    assert f"produced 300 events to {settings.topic_events}" in result.output
    assert msgspec.json.decode(metrics.read_bytes())["events"] == 300
    messages = _read_raw(settings, settings.topic_events, 300)
    assert len(messages) == 300
    table = pq.read_table(saved)
    assert sorted(m.key().decode() for m in messages) == sorted(table.column("user_id").to_pylist())
    for m in messages:
        assert dict(m.headers())[HEADER_FINGERPRINT] == tok.fingerprint.encode()
        event = msgspec.json.decode(m.value(), type=tok.event_struct)  # the worker's decoder accepts it
        assert event.user_id == m.key().decode()
    # The events tokenize online exactly like the saved parquet does offline.
    decoded = [msgspec.json.decode(m.value(), type=tok.event_struct) for m in messages]
    assert tok.encode_event_tokens(decoded).errors == [None] * 300


@pytest.mark.integration
def test_produce_parquet_with_aliases_and_rate(kafka_any_settings, retail_events_slice, retail_tokenizer):
    settings = kafka_any_settings
    started = time.monotonic()
    result = _invoke(["produce", str(retail_events_slice), "--tokenizer", str(retail_tokenizer), "--limit", "150",
                      "--rate", "500", "--quiet"], settings)
    assert "produced 150 events" in result.output
    assert time.monotonic() - started >= 0.25  # 150 events at 500/s take >= 0.3 s
    messages = _read_raw(settings, settings.topic_events, 150)
    keys = {m.key() for m in messages if m.key() is not None}
    assert keys and all(k.decode().isdigit() for k in keys)  # CustomerID 17850.0 -> key "17850"
    first = msgspec.json.decode(messages[0].value())
    assert "CustomerID" in first and "Customer ID" not in first  # canonical names, whatever the file spelled


@pytest.mark.integration
def test_produce_stdin_and_consume_outputs(kafka_any_settings, tmp_path):
    settings = kafka_any_settings
    lines = '{"user_id": "x", "v": 1}\n\n{"user_id": "y", "v": 2}\n'
    result = _invoke(["produce", "-", "--quiet"], settings, input=lines)
    assert "produced 2 events" in result.output
    assert sorted(m.key() for m in _read_raw(settings, settings.topic_events, 2)) == [b"x", b"y"]

    _produce_embeddings(settings, [_emb("a", 1), _emb("b", 2), _emb("a", 3)])
    printed = _invoke(["consume", "--from-beginning", "--max", "3"], settings).output.splitlines()
    assert len(printed) == 3 and all("model=tiny-abc" in line for line in printed)
    out = tmp_path / "emb.parquet"
    _invoke(["consume", "--from-beginning", "--max", "3", "--output", str(out)], settings)
    table = pq.read_table(out)
    assert sorted(zip(table.column("user_id").to_pylist(), table.column("n_events").to_pylist())) == [("a", 3), ("b", 2)]
    assert table.schema.field("embedding").type.value_type.bit_width == 32
    everything = tmp_path / "all.jsonl"
    started = time.monotonic()
    _invoke(["consume", "--from-beginning", "--timeout", "1.5", "--all-records", "--output", str(everything)], settings)
    assert time.monotonic() - started >= 1.5  # --timeout: stops once nothing arrived for that long
    assert len(everything.read_text().splitlines()) == 3

    producer = Producer(settings.confluent_producer())
    producer.produce(settings.topic_dead_letter, key=b"x", value=b"\xff not json",
                     headers=dead_letter_headers([], error="invalid event: not JSON", topic=settings.topic_events,
                                                 partition=0, offset=1, stage="tokenize"))
    producer.flush(30)
    dl = tmp_path / "dl.jsonl"
    _invoke(["consume", "--dead-letter", "--from-beginning", "--max", "1", "--output", str(dl)], settings)
    [row] = [msgspec.json.decode(line) for line in dl.read_text().splitlines()]
    assert (row["key"], row["error"], row["stage"]) == ("x", "invalid event: not JSON", "tokenize")
    assert row["value_base64"] == "/yBub3QganNvbg=="


def test_produce_without_a_broker_is_a_one_line_error(monkeypatch):
    from domaintok.cli import main

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert main(["produce", "--synthetic", "finance", "--users", "2", "--events", "5"]) == 2


def test_consume_rejects_an_unknown_output_suffix():
    result = CliRunner().invoke(cli, ["consume", "--output", "x.csv"], env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert result.exit_code == 2 and "must end in .parquet or .jsonl" in result.output
