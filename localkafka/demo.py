"""`domaintok demo`: the whole online path on one machine with nothing configured, in about a minute.

Embedded broker, synthetic events, a freshly fitted tokenizer and a tiny untrained model, both workers as
subprocesses, events produced at a fixed rate, a live summary, a few embeddings, then a clean shutdown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from streams.settings import KafkaSettings


def build_artifacts(workdir: Path, domain: str, n_users: int, n_events: int, seed: int = 0):
    """Synthetic events (pyarrow Table, time order), a fitted tokenizer dir and a tiny untrained model dir."""
    from domaintok.models import DomainTransformerConfig, DomainTransformerForCausalLM
    from domaintok.synthetic import generate_events, write_events_parquet
    from domaintok.tokenizer import DomainTokenizer

    import torch

    events = generate_events(domain, n_users, n_events, seed=seed)
    parquet = workdir / "events.parquet"
    write_events_parquet(events, parquet)
    tok = DomainTokenizer.fit(domain, parquet)
    tok_dir = tok.save_pretrained(workdir / "tokenizer")
    config = DomainTransformerConfig.from_preset(
        "tiny", vocab_size=tok.vocab_size, max_position_embeddings=max(tok.max_length, 64),
        tokenizer_fingerprint=tok.fingerprint, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, sep_token_id=tok.sep_token_id,
    )
    torch.manual_seed(seed)
    model_dir = workdir / "model"
    DomainTransformerForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    return events, tok, Path(tok_dir), model_dir


def worker_env(settings: KafkaSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DOMAINTOK_TOPIC"))}
    env.update(settings.to_env())
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_tokenizer(settings: KafkaSettings, tok_dir: Path, app_id: str, log_path: Path, **extra: str) -> subprocess.Popen:
    """The Faust tokenizer worker as a subprocess (its own session, so a kill reaches only it)."""
    env = worker_env(settings, DOMAINTOK_TOKENIZER_DIR=str(tok_dir), DOMAINTOK_APP_ID=app_id, **extra)
    argv = [sys.executable, "-m", "faust", "--loop", "uvloop", "-A", "streams.app", "worker", "-l", "info",
            "--without-web"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_encoder(settings: KafkaSettings, model_dir: Path, group_id: str, log_path: Path, *args: str) -> subprocess.Popen:
    env = worker_env(settings)
    argv = [sys.executable, "-c", "import sys; from streams.worker import command; sys.exit(command())", "encode",
            "--model", str(model_dir), "--group-id", group_id, *args]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, log_path: Path, marker: str = "[^Worker]: Ready", timeout: float = 90.0) -> None:
    """Block until the worker's log shows `marker` (Faust prints it once partitions are assigned and tables recovered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {log_path}")
        if log_path.exists() and marker in log_path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"worker not ready after {timeout:.0f} s; see {log_path}")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, wait, then SIGKILL: never leaves the process behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode


def producer_overrides() -> dict[str, str]:
    """aiokafka (under Faust) reads lz4 batches only with `cramjam` installed; without it, produce uncompressed."""
    from aiokafka.codec import has_lz4

    return {} if has_lz4() else {"compression.type": "none"}


def event_rows(events, tok) -> list:
    """The events as the tokenizer's wire structs, in table order."""
    import msgspec

    struct = tok.event_struct
    return [msgspec.convert(r, struct, strict=False) for r in events.to_pylist()]


class PacedProducer(threading.Thread):
    """Sends the rows at `rate` events per second (20 slices a second) until all are sent or `stop` is set."""

    def __init__(self, settings: KafkaSettings, fingerprint: str, rows: list, rate: int):
        super().__init__(daemon=True)
        self.settings, self.fingerprint, self.rows, self.rate = settings, fingerprint, rows, rate
        self.produced = 0
        self.stop = threading.Event()

    def run(self) -> None:
        from streams.clients import EventProducer

        with EventProducer(self.settings, fingerprint=self.fingerprint, **producer_overrides()) as producer:
            t0 = time.monotonic()
            step = max(self.rate // 20, 1)
            for start in range(0, len(self.rows), step):
                if self.stop.is_set():
                    break
                producer.send_many(self.rows[start : start + step])
                self.produced = min(start + step, len(self.rows))
                delay = t0 + (start + step) / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)


class EmbeddingWatch:
    """What the embeddings topic has delivered: each user's newest embedding and the end-to-end latencies."""

    def __init__(self) -> None:
        self.latest: dict[str, object] = {}
        self.latencies: list[float] = []
        self.started = time.monotonic()

    def add(self, rec) -> None:
        self.latencies.append(time.time() - rec.source_ts_ms / 1000)
        cur = self.latest.get(rec.user_id)
        if cur is None or rec.n_events >= cur.n_events:
            self.latest[rec.user_id] = rec

    def complete(self, expected: dict[str, int]) -> int:
        """Users whose newest embedding counts every event sent for them."""
        return sum(1 for u, n in expected.items() if getattr(self.latest.get(u), "n_events", 0) >= n)

    def table(self, produced: int):
        from rich.table import Table

        elapsed = max(time.monotonic() - self.started, 1e-9)
        lat = np.array(self.latencies[-5000:]) if self.latencies else np.zeros(1)
        table = Table(title="domaintok demo")
        for col in ("elapsed s", "events sent", "events/s", "embeddings", "users", "p50 ms", "p99 ms"):
            table.add_column(col, justify="right")
        table.add_row(f"{elapsed:.0f}", str(produced), f"{produced / elapsed:.0f}", str(len(self.latencies)),
                      str(len(self.latest)), f"{np.percentile(lat, 50) * 1000:.0f}",
                      f"{np.percentile(lat, 99) * 1000:.0f}")
        return table


def expected_counts(events, tok) -> dict[str, int]:
    """Events sent per user (what each user's final embedding must count); {"": -1} when the ids are not known."""
    column = tok.schema.user_id
    users_of = events.column(column).cast("string").to_pylist() if column in events.column_names else []
    return {u: users_of.count(u) for u in set(users_of)} or {"": -1}


def worker_failure(procs: list[subprocess.Popen], work: Path) -> str | None:
    """The error lines of the workers' logs when one of them has exited, else None."""
    if all(p.poll() is None for p in procs):
        return None
    tails = "".join(
        "".join(line for line in (work / f).read_text().splitlines(True) if "Error" in line or "error" in line)[-3000:]
        for f in ("tokenizer.log", "encoder.log"))
    return f"a worker exited early:\n{tails}"


def watch_until_complete(reader, producer: PacedProducer, procs, work: Path, events, tok, console,
                         deadline: float) -> tuple[EmbeddingWatch, dict[str, int]]:
    """Poll embeddings with a live table until every user's embedding counts all its events (or the deadline)."""
    from rich.live import Live

    watch, expected = EmbeddingWatch(), {}
    with Live(watch.table(0), console=console, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            for rec in reader.poll_batch(2000, timeout=0.25):
                watch.add(rec)
            live.update(watch.table(producer.produced))
            failure = worker_failure(procs, work)
            if failure:
                raise click.ClickException(failure)
            if not producer.is_alive() and not expected:
                expected = expected_counts(events, tok)
            if expected and watch.complete(expected) == len(expected):
                break
    return watch, expected


def print_embeddings(console, watch: EmbeddingWatch, expected: dict[str, int], show: int) -> None:
    console.print(f"{len(watch.latest)} users embedded; {watch.complete(expected)}/{len(expected)} users complete "
                  "(n_events = events sent)")
    for rec in list(watch.latest.values())[:show]:
        vec = np.asarray(rec.embedding)
        console.print(f"user {rec.user_id}: n_events={rec.n_events} dim={len(vec)} "
                      f"[{', '.join(f'{x:+.3f}' for x in vec[:6])}, ...] model={rec.model_version}")


@click.command("demo")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds of event production.")
@click.option("--rate", type=int, default=1000, show_default=True, help="Events per second.")
@click.option("--users", type=int, default=200, show_default=True, help="Number of synthetic users.")
@click.option("--domain", type=click.Choice(["ecommerce", "finance"]), default="ecommerce", show_default=True)
@click.option("--show", type=int, default=3, show_default=True, help="Embeddings to print at the end.")
@click.option("--max-length", type=int, default=128, show_default=True,
              help="Tokens per user window (DOMAINTOK_MAX_LENGTH): the CPU encoder's work per embedding grows with it.")
@click.option("--within", type=float, default=0.05, show_default=True,
              help="Seconds an event may wait for its tokenizer micro-batch (DOMAINTOK_BATCH_WITHIN).")
def command(duration: float, rate: int, users: int, domain: str, show: int, max_length: int, within: float) -> None:
    """Run the online pipeline locally (embedded broker, synthetic events, tiny model) and show live numbers."""
    from rich.console import Console

    from localkafka.broker import EmbeddedBroker
    from streams.clients import EmbeddingConsumer
    from streams.topics import ensure_topics

    console = Console()
    n_events = max(int(duration * rate), 1)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="domaintok-demo-") as tmp, EmbeddedBroker() as broker:
        work = Path(tmp)
        settings = KafkaSettings(partitions=4).with_bootstrap(broker.bootstrap_servers)
        ensure_topics(settings)
        with console.status("fitting a tokenizer and building a tiny model"):
            events, tok, tok_dir, model_dir = build_artifacts(work, domain, users, n_events)
            rows = event_rows(events, tok)
        console.print(f"broker {broker.bootstrap_servers}; tokenizer {tok.fingerprint}; vocab {tok.vocab_size}")
        producer = PacedProducer(settings, tok.fingerprint, rows, rate)
        try:
            procs.append(start_tokenizer(settings, tok_dir, "demo-tokenizer", work / "tokenizer.log",
                                         DOMAINTOK_MAX_LENGTH=str(max_length), DOMAINTOK_BATCH_WITHIN=str(within)))
            procs.append(start_encoder(settings, model_dir, "demo-encoder", work / "encoder.log"))
            with console.status("starting the tokenizer and encoder workers"):
                wait_ready(procs[0], work / "tokenizer.log")
            reader = EmbeddingConsumer(settings)
            producer.start()
            watch, expected = watch_until_complete(reader, producer, procs, work, events, tok, console,
                                                   deadline=time.monotonic() + duration + 60)
            reader.close()
            print_embeddings(console, watch, expected, show)
        finally:
            producer.stop.set()
            for proc in reversed(procs):
                stop_process(proc)
