"""Soak: the online path under steady load for minutes while both workers are killed (-9) at random, repeatedly.

    .venv/bin/python benchmarks/soak.py [--duration 180] [--rate 100] [--users 100] [--seed 0]

Apache Kafka (local, temporary log dir) unless KAFKA_BOOTSTRAP_SERVERS names a broker. The tokenizer (Faust) and
encoder workers run as subprocesses; every few seconds one of them, chosen at random, is killed with SIGKILL at a
random point, left down for a moment (a backlog builds) and restarted. At the end it prints events produced,
events reflected in the final embeddings (per user: the max n_events seen), lost (must be 0), duplicates,
kills survived, max consumer lag and peak RSS per worker; exit status 1 when anything was lost or wrong.
The harness is the fault-injection suite's (tests/streams/faults_support.py).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localkafka.broker import ApacheKafkaBroker  # noqa: E402
from tests.fixtures_kafka import KafkaUnderTest, create_test_topics  # noqa: E402
from tests.streams.faults_support import Artifacts, Harness, run_load  # noqa: E402


def random_kills(duration: float, rng: random.Random, every: tuple[float, float], down: tuple[float, float]):
    """The fault schedule: until production ends, kill -9 a random worker, keep it down a while, restart it."""

    def faults(harness: Harness) -> None:
        end = time.monotonic() + duration
        while time.monotonic() + every[0] < end:
            time.sleep(rng.uniform(*every))
            name = rng.choice(("tokenizer", "encoder"))
            harness.kill(name)
            time.sleep(rng.uniform(*down))
            harness.start(name)
            print(f"  {time.strftime('%H:%M:%S')} killed and restarted {name} "
                  f"(kills so far: {dict(harness.kills_by_role)})", flush=True)

    return faults


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of event production (default 180)")
    ap.add_argument("--rate", type=float, default=100.0, help="events per second (default 100)")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--kill-every", type=float, nargs=2, default=(3.0, 10.0), metavar=("MIN", "MAX"),
                    help="seconds between kills, drawn uniformly (default 3 10)")
    ap.add_argument("--down", type=float, nargs=2, default=(0.3, 2.0), metavar=("MIN", "MAX"),
                    help="seconds a killed worker stays down (default 0.3 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n_events = int(args.duration * args.rate)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="domaintok-soak-") as tmp:
        work = Path(tmp)
        print(f"building artifacts: {args.users} users, {n_events} events", flush=True)
        artifacts = Artifacts.build(work, args.users, n_events, seed=args.seed)
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        broker = None if external else ApacheKafkaBroker(state_dir=work / "kafka").start()
        try:
            kafka = KafkaUnderTest(external or broker.bootstrap_servers, "apache", broker)
            settings = create_test_topics(kafka, args.partitions)
            print(f"broker {kafka.bootstrap_servers}; producing {n_events} events at {args.rate:.0f}/s for "
                  f"{args.duration:.0f} s with random kill -9 every {args.kill_every[0]:.0f}-{args.kill_every[1]:.0f} s",
                  flush=True)
            harness = Harness(settings, artifacts)
            faults = random_kills(args.duration, rng, tuple(args.kill_every), tuple(args.down))
            outcome = run_load(harness, args.rate, faults, timeout=300)
            holes = sum(log.read_text(errors="replace").count("event=gap") for log in work.glob("*tokenizer*.log"))
        finally:
            if broker is not None:
                broker.close()
    duplicates = outcome.seq_duplicates + outcome.emb_duplicates
    rss = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(outcome.peak_rss.items()))
    print(f"events produced     {outcome.produced}")
    print(f"events reflected    {outcome.reflected}")
    print(f"lost                {outcome.lost}")
    print(f"duplicates          {duplicates} (sequences {outcome.seq_duplicates} of {outcome.seq_records}, "
          f"embeddings {outcome.emb_duplicates} of {outcome.emb_records})")
    print(f"kills survived      {outcome.kills} ({', '.join(f'{k} {v}' for k, v in sorted(harness.kills_by_role.items()))})")
    print(f"max lag             tokenizer {outcome.max_lag_tokenizer}, encoder {outcome.max_lag_encoder} records")
    print(f"peak RSS            {rss}")
    print(f"holes sought back   {holes} (events Faust handed over past the stored position: issue 596)")
    print(f"wall time           {outcome.seconds:.0f} s")
    problems = outcome.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems or outcome.lost else 0


if __name__ == "__main__":
    sys.exit(main())
