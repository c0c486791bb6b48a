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
    from rich.live import Live
    from rich.table import Table

    from localkafka.broker import EmbeddedBroker
    from streams.topics import ensure_topics
    from streams.clients import EmbeddingConsumer, EventProducer

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
        try:
            procs.append(start_tokenizer(settings, tok_dir, "demo-tokenizer", work / "tokenizer.log",
                                         DOMAINTOK_MAX_LENGTH=str(max_length), DOMAINTOK_BATCH_WITHIN=str(within)))
            procs.append(start_encoder(settings, model_dir, "demo-encoder", work / "encoder.log"))
            with console.status("starting the tokenizer and encoder workers"):
                wait_ready(procs[0], work / "tokenizer.log")
            stats = {"produced": 0}
            stop = threading.Event()

            def produce() -> None:
                with EventProducer(settings, fingerprint=tok.fingerprint, **producer_overrides()) as producer:
                    t0 = time.monotonic()
                    step = max(rate // 20, 1)
                    for start in range(0, len(rows), step):
                        if stop.is_set():
                            break
                        producer.send_many(rows[start : start + step])
                        stats["produced"] = start + step
                        delay = t0 + (start + step) / rate - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    stats["produced"] = min(stats["produced"], len(rows))

            latest: dict[str, object] = {}
            latencies: list[float] = []
            thread = threading.Thread(target=produce, daemon=True)
            reader = EmbeddingConsumer(settings)
            t_start = time.monotonic()
            thread.start()

            def view() -> Table:
                elapsed = max(time.monotonic() - t_start, 1e-9)
                lat = np.array(latencies[-5000:]) if latencies else np.zeros(1)
                table = Table(title="domaintok demo")
                for col in ("elapsed s", "events sent", "events/s", "embeddings", "users", "p50 ms", "p99 ms"):
                    table.add_column(col, justify="right")
                table.add_row(f"{elapsed:.0f}", str(stats["produced"]), f"{stats['produced'] / elapsed:.0f}",
                              str(len(latencies)), str(len(latest)),
                              f"{np.percentile(lat, 50) * 1000:.0f}", f"{np.percentile(lat, 99) * 1000:.0f}")
                return table

            expected = {}
            deadline = t_start + duration + 60
            with Live(view(), console=console, refresh_per_second=4) as live:
                while time.monotonic() < deadline:
                    for rec in reader.poll_batch(2000, timeout=0.25):
                        latencies.append(time.time() - rec.source_ts_ms / 1000)
                        cur = latest.get(rec.user_id)
                        if cur is None or rec.n_events >= cur.n_events:
                            latest[rec.user_id] = rec
                    live.update(view())
                    if any(p.poll() is not None for p in procs):
                        tails = "".join(
                            "".join(l for l in (work / f).read_text().splitlines(True) if "Error" in l or "error" in l)[-3000:]
                            for f in ("tokenizer.log", "encoder.log"))
                        raise click.ClickException(f"a worker exited early:\n{tails}")
                    if not thread.is_alive() and not expected:
                        users_of = events.column(tok.schema.user_id).cast("string").to_pylist() if tok.schema.user_id in events.column_names else []
                        expected = {u: users_of.count(u) for u in set(users_of)} or {"": -1}
                    if expected and all(getattr(latest.get(u), "n_events", 0) >= n for u, n in expected.items()):
                        break
            reader.close()
            stop.set()
            done = sum(1 for u, n in expected.items() if getattr(latest.get(u), "n_events", 0) >= n)
            console.print(f"{len(latest)} users embedded; {done}/{len(expected)} users complete (n_events = events sent)")
            for rec in list(latest.values())[:show]:
                vec = np.asarray(rec.embedding)
                console.print(f"user {rec.user_id}: n_events={rec.n_events} dim={len(vec)} "
                              f"[{', '.join(f'{x:+.3f}' for x in vec[:6])}, ...] model={rec.model_version}")
        finally:
            for proc in reversed(procs):
                stop_process(proc)
