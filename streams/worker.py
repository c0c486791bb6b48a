"""`domaintok worker tokenize|encode`: the two stream workers as click commands.

`tokenize` resolves its settings (options over DOMAINTOK_* variables, domaintok.settings.Settings), checks the tokenizer
and the broker, then execs the Faust worker (`streams.app`) with those settings; `encode` runs the encoder.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from domaintok.settings import Settings
from streams import logs
from streams.settings import KafkaSettings


@click.group("worker")
def command() -> None:
    """Run a stream worker (tokenize: events -> sequences; encode: sequences -> embeddings)."""


@command.command("tokenize")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False),
              help="Fitted tokenizer directory [DOMAINTOK_TOKENIZER_DIR].")
@click.option("--app-id", help="Faust app id = consumer group [DOMAINTOK_APP_ID, default domaintok-tokenizer].")
@click.option("--max-length", type=int, help="Window length in tokens [DOMAINTOK_MAX_LENGTH, default: tokenizer's].")
@click.option("--batch-size", type=int, help="Events per micro-batch [DOMAINTOK_BATCH_SIZE, 4000].")
@click.option("--batch-within", type=float, help="Seconds to fill a micro-batch [DOMAINTOK_BATCH_WITHIN, 0.2].")
@click.option("--web-port", type=int, help="Enable Faust's web server on 127.0.0.1:PORT (off by default).")
@click.option("--metrics-port", type=int, help="Prometheus /metrics on 127.0.0.1:PORT [DOMAINTOK_METRICS_PORT].")
@click.option("--commit-interval", type=float,
              help="Seconds between offset commits [DOMAINTOK_COMMIT_INTERVAL, 2.8]; a crash replays about this much.")
@click.option("--log-level", default="info", show_default=True)
def tokenize_command(tokenizer_dir, app_id, max_length, batch_size, batch_within, web_port, metrics_port,
                     commit_interval, log_level) -> None:
    """Tokenizer worker: events -> per-user windows (Faust Table) -> sequences; bad events -> dead-letter.

    Kafka settings come from KAFKA_* / DOMAINTOK_TOPIC_* variables; KAFKA_BOOTSTRAP_SERVERS is required.
    """
    from domaintok.errors import DomaintokError

    settings = Settings.from_env().override(
        tokenizer_dir=tokenizer_dir, app_id=app_id, max_length=max_length, batch_size=batch_size,
        batch_within=batch_within, web_port=web_port, metrics_port=metrics_port, commit_interval=commit_interval,
    )
    if not settings.tokenizer_dir:
        raise DomaintokError("no tokenizer: pass --tokenizer DIR or set DOMAINTOK_TOKENIZER_DIR")
    kafka = KafkaSettings.from_env()
    if not kafka.bootstrap_servers:
        raise DomaintokError("KAFKA_BOOTSTRAP_SERVERS is not set (start a broker with `domaintok broker`)")
    # Checked here, before exec: in the Faust worker a bad artifact or a refused login is a traceback and exit 1.
    from streams.clients import check_connection
    from streams.tokenizer_agent import load_tokenizer

    load_tokenizer(settings.tokenizer_dir)
    check_connection(kafka)
    # The Faust worker CLI (event loop, logging, signals, rebalances) runs the app; it reads the same settings
    # from the environment it is given (streams.app builds the app from them).
    env = {**os.environ, **settings.to_env()}
    argv = [sys.executable, "-m", "faust", "--loop", "uvloop", "-A", "streams.app", "worker", "-l", log_level]
    # Faust ignores web_enabled=False; without --without-web two workers on one host collide on port 6066.
    argv += ["--web-port", str(web_port), "--web-host", "127.0.0.1"] if web_port else ["--without-web"]
    os.execve(sys.executable, argv, env)


@command.command("encode")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Pretrained model directory (safetensors).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False),
              help="Refuse to start unless the model was trained with this tokenizer.")
@click.option("--group-id", help="Consumer group [DOMAINTOK_ENCODER_GROUP, domaintok-encoder].")
@click.option("--batch-size", type=int, help="Sequences per micro-batch at most [default: EncoderConfig's, 2048].")
@click.option("--batch-within", type=float, help="Seconds to fill a micro-batch [default: EncoderConfig's, 0.01].")
@click.option("--device", help="torch device (default: cuda when present, else cpu).")
@click.option("--metrics-port", type=int, help="Prometheus /metrics on 127.0.0.1:PORT (0 = off) [DOMAINTOK_METRICS_PORT].")
@click.option("--max-idle", type=float, help="Exit after this many seconds without records (default: run forever).")
@click.option("--throttle", type=float, help="Test/ops knob: sleep this many seconds after each batch, to make the "
              "encoder slower than its input on purpose (backpressure drills) [DOMAINTOK_ENCODER_THROTTLE, 0].")
def encode_command(model_dir, tokenizer_dir, group_id, batch_size, batch_within, device, metrics_port, max_idle,
                   throttle) -> None:
    """Encoder worker: sequences -> embeddings; commits offsets only after the embeddings are acknowledged."""
    from domaintok.errors import DomaintokError
    from streams.encoder import EncoderConfig, run_encoder

    logging.basicConfig(level=logging.INFO)
    logs.install()
    settings = KafkaSettings.from_env()
    if not settings.bootstrap_servers:
        raise DomaintokError("KAFKA_BOOTSTRAP_SERVERS is not set (start a broker with `domaintok broker`)")
    env = Settings.from_env().override(encoder_group=group_id, metrics_port=metrics_port, encoder_throttle=throttle)
    given = {"batch_size": batch_size, "batch_within": batch_within}  # unset options keep EncoderConfig's defaults
    config = EncoderConfig(model_dir=model_dir, group_id=env.encoder_group, device=device, tokenizer_dir=tokenizer_dir,
                           metrics_port=env.metrics_port, metrics_host=env.metrics_host, throttle=env.encoder_throttle,
                           **{k: v for k, v in given.items() if v is not None})
    run_encoder(config, settings, max_idle=max_idle)
