"""Kafka security end to end on Apache Kafka: SASL (PLAIN, SCRAM-SHA-256/512) over plaintext and TLS, mutual TLS,
with a CA, broker and client certificates made here by openssl. Every client the project has authenticates
(confluent producer/consumer, aiokafka, the CLI, the Faust tokenizer worker, the encoder worker); a wrong password
or CA is refused in one line; no password or private key shows up in logs, reprs, errors or Prometheus metrics.
One broker for the module, with a listener per protocol.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from localkafka.broker import ApacheKafkaBroker, BrokerTls, ensure_topics, free_port
from streams.clients import EmbeddingConsumer, EventProducer
from streams.records import EmbeddingRecord, encode_record
from streams.settings import KafkaAuthError, KafkaSettings

pytestmark = [pytest.mark.integration, pytest.mark.requires_apache("SASL and TLS listeners are set up on Apache Kafka")]

USER = "domaintok-test"
PASSWORD = f"pw-{uuid.uuid4().hex}"  # fresh each run: found in a log, it can only have come from this run
CLI = [sys.executable, "-c", "import sys; from domaintok.cli import main; sys.exit(main())"]


# -- certificates and the broker ---------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path, ca_name: str = "domaintok test CA") -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1/localhost and a client certificate, all PEM (keys unencrypted
    PKCS#8), valid for two days. Returns name -> path: ca, ca_key, broker_keystore (key + cert), client_cert,
    client_key."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    for name, ext in (("broker", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{name}.ext").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=domaintok-{name}", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=directory)
    keystore = directory / "broker-keystore.pem"
    keystore.write_bytes((directory / "broker.key").read_bytes() + (directory / "broker.crt").read_bytes())
    return {"ca": directory / "ca.pem", "ca_key": directory / "ca.key", "broker_keystore": keystore,
            "client_cert": directory / "client.crt", "client_key": directory / "client.key"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_broker(pki):
    broker = ApacheKafkaBroker(sasl_users={USER: PASSWORD}, tls=BrokerTls(pki["broker_keystore"], pki["ca"]))
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def secure_settings(broker, pki, protocol: str, mechanism: str | None = None, *, password: str = PASSWORD,
                    partitions: int = 2) -> KafkaSettings:
    """Settings for one listener with fresh topic names: SASL credentials on SASL_*, the CA on *SSL, and the
    client certificate on SSL (its listener requires one)."""
    prefix = f"sec-{uuid.uuid4().hex[:8]}"
    security: dict = {}
    if protocol.startswith("SASL_"):
        security.update(sasl_mechanism=mechanism, sasl_username=USER, sasl_password=password)
    if protocol.endswith("SSL"):
        security["ssl_cafile"] = str(pki["ca"])
    if protocol == "SSL":
        security.update(ssl_certfile=str(pki["client_cert"]), ssl_keyfile=str(pki["client_key"]))
    base = KafkaSettings(topic_events=f"{prefix}.events", topic_sequences=f"{prefix}.sequences",
                         topic_embeddings=f"{prefix}.embeddings", topic_dead_letter=f"{prefix}.dead-letter",
                         partitions=partitions)
    return broker.client_settings(protocol, base=base, **security)


def secrets_of(pki) -> list[str]:
    """Strings that must never be printed: the password and a line from the middle of each private key."""
    out = [PASSWORD]
    for name in ("ca_key", "client_key", "broker_keystore"):
        lines = pki[name].read_text().splitlines()
        out.append(lines[len(lines) // 3])
    return out


def assert_no_secret(text: str, pki, where: str) -> None:
    for secret in secrets_of(pki):
        assert secret not in text, f"a secret ({secret[:6]}...) appears in {where}"


def _cli(args: list[str], settings: KafkaSettings, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DOMAINTOK_TOPIC"))}
    env.update(settings.to_env())
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


# -- every client on every listener -------------------------------------------------------------------------------

LISTENERS = [("SASL_PLAINTEXT", "PLAIN"), ("SASL_PLAINTEXT", "SCRAM-SHA-256"), ("SASL_SSL", "SCRAM-SHA-512"),
             ("SASL_SSL", "PLAIN"), ("SSL", None)]


@pytest.mark.parametrize("protocol,mechanism", LISTENERS, ids=[f"{p}-{m or 'mTLS'}" for p, m in LISTENERS])
def test_confluent_clients_authenticate(secure_broker, pki, protocol, mechanism):
    settings = secure_settings(secure_broker, pki, protocol, mechanism)
    ensure_topics(settings)
    sent = [EmbeddingRecord(user_id=f"u{i}", embedding=[i / 8, -1.0], n_events=i + 1, last_event_ts=i,
                            model_version="m", produced_at=i, source_ts_ms=i) for i in range(25)]
    with EventProducer(settings, topic=settings.topic_embeddings) as producer:
        for rec in sent:
            producer.send(encode_record(rec), rec.user_id.encode())
    with EmbeddingConsumer(settings, group_id=f"g-{uuid.uuid4().hex[:8]}") as reader:
        got = list(reader.records(max_records=len(sent), idle_timeout=20))
        reader.commit()
    assert sorted(got, key=lambda r: r.n_events) == sent


@pytest.mark.parametrize("protocol,mechanism", [("SASL_SSL", "SCRAM-SHA-256"), ("SSL", None)])
def test_aiokafka_and_faust_settings_authenticate(secure_broker, pki, protocol, mechanism):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from faust.auth import SASLCredentials, SSLCredentials

    settings = secure_settings(secure_broker, pki, protocol, mechanism)
    ensure_topics(settings, [settings.topic_events], partitions=1)

    async def round_trip() -> list[bytes]:
        producer = AIOKafkaProducer(**settings.aiokafka_kwargs())
        await producer.start()
        try:
            for i in range(5):
                await producer.send_and_wait(settings.topic_events, f"event-{i}".encode(), key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(settings.topic_events, auto_offset_reset="earliest", **settings.aiokafka_kwargs())
        await consumer.start()
        try:
            got: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(got) < 5 and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got += [r.value for r in records]
            return got
        finally:
            await consumer.stop()

    assert asyncio.run(round_trip()) == [f"event-{i}".encode() for i in range(5)]
    faust = settings.faust_settings()
    creds = faust["broker_credentials"]
    if protocol == "SSL":
        assert isinstance(creds, SSLCredentials) and creds.context is not None
    else:
        assert isinstance(creds, SASLCredentials) and creds.mechanism.value == mechanism
        assert creds.protocol.value == "SASL_SSL" and creds.ssl_context is not None
    assert_no_secret(repr(faust) + repr(creds), pki, "faust settings repr")


def test_check_connection_fails_fast_on_a_wrong_password(secure_broker, pki):
    from streams.clients import check_connection

    check_connection(secure_settings(secure_broker, pki, "SASL_SSL", "SCRAM-SHA-512"))
    with pytest.raises(KafkaAuthError, match="Kafka authentication failed"):
        check_connection(secure_settings(secure_broker, pki, "SASL_SSL", "SCRAM-SHA-512", password="nope"))


def test_no_secret_in_reprs_or_errors(pki):
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                             sasl_username=USER, sasl_password=PASSWORD, ssl_cafile=str(pki["ca"]),
                             ssl_certfile=str(pki["client_cert"]), ssl_keyfile=str(pki["client_key"]),
                             ssl_key_password=PASSWORD)
    shown = repr(settings) + str(settings) + settings.describe_auth() + repr(settings.faust_credentials())
    assert_no_secret(shown, pki, "reprs")
    assert "sasl_password='***'" in repr(settings) and "ssl_key_password='***'" in repr(settings)
    assert settings.to_env()["KAFKA_SASL_PASSWORD"] == PASSWORD  # child processes do get it

    class Refused:
        def code(self):
            from confluent_kafka import KafkaError

            return KafkaError._AUTHENTICATION

        def str(self):
            return "sasl_ssl://127.0.0.1:9/bootstrap: SASL authentication error: Invalid username or password (after 3ms in state AUTH_REQ)"

    with pytest.raises(KafkaAuthError) as info:
        settings.raise_on_auth_error(Refused())
    message = str(info.value)
    assert "\n" not in message and f"user '{USER}'" in message and "Invalid username or password" in message
    assert_no_secret(message, pki, "the error")


# -- the pipeline over SASL_SSL -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from localkafka.demo import build_artifacts

    work = tmp_path_factory.mktemp("secure-pipeline")
    _, tok, tok_dir, model_dir = build_artifacts(work, "ecommerce", 30, 600, seed=5)
    return work, tok, tok_dir, model_dir


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (IPv4 and IPv6) with a socket listening on `port`, from /proc/net/tcp*."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in list(fh)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    if len(raw) == 4:
                        found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                    else:
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _scrape(port: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_pipeline_over_sasl_ssl(secure_broker, pki, artifacts, tmp_path):
    """CLI producer -> Faust tokenizer worker -> encoder worker -> CLI consumer, all on SASL_SSL + SCRAM-SHA-256."""
    import pyarrow.parquet as pq

    from localkafka.demo import start_encoder, start_tokenizer, stop_process, wait_ready

    work, tok, tok_dir, model_dir = artifacts
    settings = secure_settings(secure_broker, pki, "SASL_SSL", "SCRAM-SHA-256")
    ensure_topics(settings)
    tok_port, enc_port = free_port(), free_port()
    logs = {"tokenizer": tmp_path / "tokenizer.log", "encoder": tmp_path / "encoder.log"}
    app_id = f"sec-{uuid.uuid4().hex[:8]}"
    procs = [start_tokenizer(settings, tok_dir, app_id, logs["tokenizer"], DOMAINTOK_METRICS_PORT=str(tok_port)),
             start_encoder(settings, model_dir, f"enc-{app_id}", logs["encoder"], "--metrics-port", str(enc_port),
                           "--tokenizer", str(tok_dir))]
    outputs = []
    try:
        wait_ready(procs[0], logs["tokenizer"])
        events = tmp_path / "events.parquet"
        produced = _cli(["produce", "--synthetic", "ecommerce", "--users", "30", "--events", "600", "--seed", "9",
                         "--save-parquet", str(events), "--tokenizer", str(tok_dir), "--quiet"], settings)
        outputs.append(produced.stdout + produced.stderr)
        assert produced.returncode == 0, produced.stderr
        users = pq.read_table(events).column("user_id").to_pylist()
        expected = dict(collections.Counter(users))
        with EmbeddingConsumer(settings) as reader:  # wait until every user's final embedding is out
            best: dict[str, int] = {}
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(best.get(u, 0) < n for u, n in expected.items()):
                for rec in reader.poll_batch(2000, timeout=0.5):
                    best[rec.user_id] = max(best.get(rec.user_id, 0), rec.n_events)
        assert best == expected
        saved = tmp_path / "embeddings.parquet"
        consumed = _cli(["consume", "--from-beginning", "--timeout", "3", "--output", str(saved)], settings)
        outputs.append(consumed.stdout + consumed.stderr)
        assert consumed.returncode == 0, consumed.stderr
        table = pq.read_table(saved)
        assert dict(zip(table.column("user_id").to_pylist(), table.column("n_events").to_pylist())) == expected
        metrics_text = _scrape(tok_port) + _scrape(enc_port)
        assert "domaintok_events_in_total" in metrics_text and "domaintok_records_out_total" in metrics_text
        for port in (tok_port, enc_port):  # Prometheus endpoints on loopback only
            assert _listening_addresses(port) == {"127.0.0.1"}
        assert all(p.poll() is None for p in procs)
    finally:
        for proc in procs:
            stop_process(proc)
    for name, path in logs.items():
        assert_no_secret(path.read_text(errors="replace"), pki, f"the {name} worker log")
    assert_no_secret("\n".join(outputs), pki, "CLI output")
    assert_no_secret(metrics_text, pki, "Prometheus metrics")
    assert_no_secret((secure_broker.state_dir / "server.log").read_text(errors="replace"), pki, "the broker log")


# -- refused credentials: one line, quickly -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol,mechanism", [("SASL_PLAINTEXT", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-512")])
def test_wrong_password_is_one_clear_line(secure_broker, pki, artifacts, protocol, mechanism):
    _, _, tok_dir, model_dir = artifacts
    wrong = f"wrong-{uuid.uuid4().hex}"
    settings = secure_settings(secure_broker, pki, protocol, mechanism, password=wrong)
    runs = {
        "produce": ["produce", "--synthetic", "ecommerce", "--events", "10", "--users", "2", "--quiet"],
        "consume": ["consume", "--timeout", "5"],
        "worker encode": ["worker", "encode", "--model", str(model_dir), "--max-idle", "20", "--device", "cpu"],
        # checked before Faust starts (in Faust a refused login is a traceback)
        "worker tokenize": ["worker", "tokenize", "--tokenizer", str(tok_dir)],
    }
    for name, args in runs.items():
        started = time.monotonic()
        proc = _cli(args, settings, timeout=90)
        seconds = time.monotonic() - started
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert err[-1].startswith(f"domaintok {name.split()[0]}: error: Kafka authentication failed for user '{USER}'")
        assert mechanism in err[-1] and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        if name != "worker encode":  # the encoder logs its start; the others print nothing else
            assert len(err) == 1, (name, proc.stderr)
        assert wrong not in proc.stdout + proc.stderr and PASSWORD not in proc.stdout + proc.stderr
        assert seconds < 60, (name, seconds)


def test_unknown_ca_and_missing_client_certificate_are_refused(secure_broker, pki, tmp_path):
    other = make_pki(tmp_path / "other", ca_name="some other CA")
    wrong_ca = secure_settings(secure_broker, pki, "SASL_SSL", "SCRAM-SHA-256").replace(ssl_cafile=str(other["ca"]))
    no_cert = secure_settings(secure_broker, pki, "SSL").replace(ssl_certfile=None, ssl_keyfile=None)
    for settings, needle in ((wrong_ca, "certificate verify failed"), (no_cert, "alert")):
        started = time.monotonic()
        with pytest.raises(KafkaAuthError, match=f"Kafka TLS handshake failed .*{needle}"):
            ensure_topics(settings, timeout=20)
        assert time.monotonic() - started < 15


# -- local-only endpoints -------------------------------------------------------------------------------------------


def test_metrics_endpoint_binds_loopback_by_default(monkeypatch):
    from streams import metrics

    monkeypatch.delenv("DOMAINTOK_METRICS_HOST", raising=False)
    port = free_port()
    metrics.serve(port)
    assert _listening_addresses(port) == {"127.0.0.1"}
    assert "domaintok_batch_seconds" in _scrape(port, timeout=5)


def test_faust_web_binds_loopback(monkeypatch, retail_tokenizer):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.setenv("DOMAINTOK_TOKENIZER_DIR", str(retail_tokenizer))
    monkeypatch.setenv("DOMAINTOK_METRICS_PORT", "0")
    from domaintok.settings import Settings
    from streams.app import create_app

    app = create_app(Settings(tokenizer_dir=str(retail_tokenizer)), KafkaSettings(bootstrap_servers="127.0.0.1:9"))
    assert app.conf.web_bind == "127.0.0.1" and app.conf.web_host == "127.0.0.1"


def test_worker_command_binds_faust_web_to_loopback(monkeypatch, retail_tokenizer):
    from click.testing import CliRunner

    from streams import worker

    execs = []
    monkeypatch.setattr(worker.os, "execve", lambda path, argv, env: execs.append(argv))
    # argv only: the login check before exec is tested against real brokers elsewhere in this module
    monkeypatch.setattr("streams.clients.check_connection", lambda settings, timeout=30.0: None)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    for extra in ([], ["--web-port", "16066"]):
        result = CliRunner().invoke(worker.command, ["tokenize", "--tokenizer", str(retail_tokenizer), *extra])
        assert result.exit_code == 0, result.output
    without_web, with_web = execs
    assert "--without-web" in without_web and "--web-host" not in without_web
    assert with_web[with_web.index("--web-host") + 1] == "127.0.0.1"
