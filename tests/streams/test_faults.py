"""Fault injection on the online path against Apache Kafka: kill -9, SIGTERM, broker restart, rebalance, backpressure.

Each test runs the real workers as subprocesses under a steady load and checks, through what a consumer keeping
the max n_events per user sees, that every produced event is reflected: no user missing, n_events == events
produced per user, the final window equals the offline tokenization, sequence counts never go backwards.
Duplicates (at-least-once re-sends) are counted, printed and bounded. The PositionGuard unit tests at the end
need no broker.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

from localkafka.broker import ApacheKafkaBroker
from streams.positions import PositionGuard, position_key
from tests.fixtures_kafka import KafkaUnderTest, create_test_topics
from tests.streams.faults_support import Artifacts, Harness, kill_loop, run_load

N_USERS = 60
N_EVENTS = 4000
KILLS = 5
# Rates are set so that production lasts about as long as each test's faults: every fault lands under load.


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return Artifacts.build(tmp_path_factory.mktemp("faults"), N_USERS, N_EVENTS)


def _check(outcome, max_duplicates: int) -> None:
    print(outcome.report())
    assert not outcome.problems(), outcome.problems()
    assert outcome.reflected == outcome.produced == N_EVENTS
    duplicates = outcome.seq_duplicates + outcome.emb_duplicates
    assert duplicates <= max_duplicates, f"{duplicates} duplicates > {max_duplicates}: {outcome.report()}"


# -- worker crashes --------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("kill -9 recovery relies on Table changelog recovery and committed offsets")
def test_tokenizer_kill9_with_backlog_loses_nothing(kafka_settings, artifacts):
    """faust-streaming issue 596 territory: restarts with a backlog waiting and a Table to recover."""
    rng = random.Random(1)
    harness = Harness(kafka_settings, artifacts)
    outcome = run_load(harness, 100, lambda h: kill_loop(h, "tokenizer", KILLS, rng, up=(1.0, 4.0)))
    assert outcome.kills == KILLS
    _check(outcome, max_duplicates=N_USERS * (KILLS + 1) * 2)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("kill -9 recovery relies on committed consumer-group offsets")
def test_encoder_kill9_with_backlog_loses_nothing(kafka_settings, artifacts):
    rng = random.Random(2)
    harness = Harness(kafka_settings, artifacts)
    outcome = run_load(harness, 60, lambda h: kill_loop(h, "encoder", KILLS, rng, up=(0.5, 2.0)))
    assert outcome.kills == KILLS
    _check(outcome, max_duplicates=N_USERS * (KILLS + 1) * 2)


# -- graceful restarts -----------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("graceful leave-group and commit on SIGTERM")
def test_rolling_sigterm_restart_zero_loss_bounded_duplicates(kafka_settings, artifacts):
    rng = random.Random(3)

    def rolling(h: Harness) -> None:
        for name in ("tokenizer", "encoder"):
            time.sleep(rng.uniform(2.0, 4.0))
            h.terminate(name)
            h.start(name)

    harness = Harness(kafka_settings, artifacts)
    outcome = run_load(harness, 150, rolling)
    assert outcome.terms == 2
    # a graceful stop commits what it delivered: at most one batch per user is sent again per restart
    _check(outcome, max_duplicates=N_USERS * 2)


# -- broker restart --------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("a broker restart with a persistent log dir (the embedded broker keeps data in memory)")
def test_broker_restart_under_load_workers_reconnect(tmp_path, artifacts, kafka):
    broker = ApacheKafkaBroker(state_dir=tmp_path / "kafka").start()
    try:
        settings = create_test_topics(KafkaUnderTest(broker.bootstrap_servers, "apache", broker))

        def restart_broker(h: Harness) -> None:
            time.sleep(5)
            broker.restart()  # SIGTERM (controlled shutdown), then start on the same port and log dir
            time.sleep(5)

        outcome = run_load(Harness(settings, artifacts), 150, restart_broker, timeout=150)
        _check(outcome, max_duplicates=N_USERS * 6)
    finally:
        broker.close()


# -- rebalance -------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("group rebalances with Table partitions moving between workers")
def test_second_tokenizer_joins_and_leaves_windows_stay_correct(kafka_settings, artifacts):
    def join_leave(h: Harness) -> None:
        time.sleep(2)
        h.start("tokenizer2")  # join: half the partitions (and their Table changelog) move to it
        time.sleep(4)
        h.terminate("tokenizer2")  # graceful leave: they move back
        time.sleep(2)
        h.start("tokenizer2")
        time.sleep(4)
        h.kill("tokenizer2")  # crash: they move back after the session timeout

    harness = Harness(kafka_settings, artifacts)
    outcome = run_load(harness, 150, join_leave)
    # the windows check in problems(): each user's final window equals the offline tokenization of its events
    _check(outcome, max_duplicates=N_USERS * 8)


# -- backpressure ----------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("consumer-group lag read from committed offsets")
def test_slow_encoder_lag_grows_then_drains_memory_bounded(kafka_settings, artifacts):
    # the throttled encoder takes at most 32 sequences per 0.2 s (~160/s); the tokenizer emits up to ~300/s
    harness = Harness(kafka_settings, artifacts, encoder_args=("--batch-size", "32", "--throttle", "0.2"))
    outcome = run_load(harness, 400, lambda h: None, timeout=180)
    _check(outcome, max_duplicates=N_USERS * 2)
    samples = harness.watcher.lag_samples
    encoder_lag = [s[2] for s in samples]
    print(f"encoder lag: max {max(encoder_lag)}, last {encoder_lag[-1]}")
    assert max(encoder_lag) >= 300, "the throttled encoder never fell behind: the test does not test backpressure"
    assert encoder_lag[-1] == 0, "the backlog did not drain"
    # memory bounded: the encoder's anonymous memory (heap and queues: where a backlog would sit) while far behind
    # stays within 200 MiB of what it was before it fell behind. VmRSS is reported too; it also counts file-backed
    # library pages (once seen 220 MiB up in a loaded full-suite run). The heap itself grows with the largest batch
    # shape seen (glibc keeps freed memory: 468 -> 622 MiB in one passing run), so this bound stays the tightest.
    rss = harness.watcher.rss_by_lag("encoder")
    anon = harness.watcher.rss_by_lag("encoder", anon=True)
    print(f"encoder RSS at low lag {rss[0] / 2**20:.0f} MiB, at high lag {rss[1] / 2**20:.0f} MiB; "
          f"anonymous {anon[0] / 2**20:.0f} -> {anon[1] / 2**20:.0f} MiB")
    assert anon[0] > 0 and anon[1] > 0, "no RSS samples: the memory check would be vacuous"
    assert anon[1] - anon[0] < 200 * 2**20, f"anonymous memory grew {(anon[1] - anon[0]) / 2**20:.0f} MiB under lag"


# -- PositionGuard (no broker) ---------------------------------------------------------------------------------


@dataclass
class _Msg:
    partition: int
    offset: int


def test_position_keys_land_on_their_partition():
    from aiokafka.partitioner import murmur2

    for partitions in (1, 4, 8, 12):
        for p in range(partitions):
            key = position_key(p, partitions)
            assert (murmur2(key) & 0x7FFFFFFF) % partitions == p and key.startswith(b"\x00")


def test_guard_skips_replays_and_in_batch_redeliveries():
    table: dict[bytes, bytes] = {}
    guard = PositionGuard(table, 2)
    first = guard.screen([_Msg(0, 0), _Msg(0, 1), _Msg(1, 0), _Msg(0, 1)], now=0.0)  # offset 1 redelivered
    assert [(m.partition, m.offset) for m in first.keep] == [(0, 0), (0, 1), (1, 0)] and first.replayed == 1
    guard.record(first.keep)
    assert guard.stored(0) == 1 and guard.stored(1) == 0
    again = guard.screen([_Msg(0, 0), _Msg(0, 1), _Msg(0, 2)], now=1.0)
    assert [m.offset for m in again.keep] == [2] and again.replayed == 2 and not again.seeks


def test_guard_seeks_back_over_a_hole_and_drops_until_it_is_filled():
    table: dict[bytes, bytes] = {}
    guard = PositionGuard(table, 1, retry_after=2.0, max_seeks=3)
    guard.record([_Msg(0, 9)])
    hole = guard.screen([_Msg(0, 14), _Msg(0, 15)], now=0.0)  # 10..13 skipped by the consumer
    assert hole.keep == [] and hole.dropped == 2 and hole.seeks == {0: 10} and hole.arrived == {0: 14}
    stale = guard.screen([_Msg(0, 16)], now=0.5)  # fetched before the seek: dropped, no second seek yet
    assert stale.keep == [] and stale.seeks == {}
    filled = guard.screen([_Msg(0, 10), _Msg(0, 11)], now=1.0)
    assert [m.offset for m in filled.keep] == [10, 11] and not filled.seeks


def test_guard_accepts_a_hole_that_survives_repeated_seeks():
    """Offsets that do not exist (transaction markers, compaction) must not stall the partition forever."""
    table: dict[bytes, bytes] = {}
    guard = PositionGuard(table, 1, retry_after=1.0, max_seeks=2)
    guard.record([_Msg(0, 4)])
    assert guard.screen([_Msg(0, 6)], now=0.0).seeks == {0: 5}
    assert guard.screen([_Msg(0, 6)], now=1.5).seeks == {0: 5}
    last = guard.screen([_Msg(0, 6)], now=3.0)
    assert [m.offset for m in last.keep] == [6] and last.accepted_holes == [(0, 5, 5)]


def test_guard_asks_the_broker_and_never_gives_up_offsets_that_exist():
    """With `first_offset`, a hole is passed over exactly when the broker holds none of its offsets: a seek that did
    not take (a CI run lost 535 events that way) is retried for as long as it takes."""
    table: dict[bytes, bytes] = {}
    on_broker = {0: 5}  # partition -> first offset at or after the hole's start that the broker holds
    asked = []

    def first_offset(partition, offset):
        asked.append((partition, offset))
        return on_broker[partition]

    guard = PositionGuard(table, 1, retry_after=1.0, max_seeks=2, first_offset=first_offset)
    guard.record([_Msg(0, 4)])
    assert guard.screen([_Msg(0, 9)], now=0.0).seeks == {0: 5} and asked == []  # first: seek back, no question
    for now in (1.5, 3.0, 4.5, 6.0):  # far past max_seeks: offset 5 exists, so it is never given up
        again = guard.screen([_Msg(0, 9)], now=now)
        assert again.keep == [] and again.seeks == {0: 5} and again.present_holes == [(0, 5, 8)]
        assert not again.accepted_holes
    assert asked == [(0, 5)] * 4
    assert guard.screen([_Msg(0, 9)], now=6.5).seeks == {}  # within retry_after of the last seek: no question
    on_broker[0] = 9  # 5..8 are gone from the log (markers, retention): accepted, and exactly that range
    last = guard.screen([_Msg(0, 9), _Msg(0, 10)], now=8.0)
    assert [m.offset for m in last.keep] == [9, 10] and last.accepted_holes == [(0, 5, 8)]
    on_broker[0] = None  # the broker cannot tell: not accepted
    guard.record(last.keep)
    assert guard.screen([_Msg(0, 13)], now=9.0).seeks == {0: 11}
    unsure = guard.screen([_Msg(0, 13)], now=10.5)
    assert unsure.keep == [] and unsure.seeks == {0: 11} and not unsure.accepted_holes


@pytest.mark.integration
@pytest.mark.requires_apache("transaction markers: offsets that exist in no consumer's view")
def test_the_tokenizers_hole_check_sees_transaction_markers_and_records(kafka_settings):
    """TokenizeWorker.first_offset against a real broker: a transaction's commit marker takes an offset that no
    consumer receives; the check reports the next record past it, and a record's own offset where one exists."""
    from types import SimpleNamespace

    from confluent_kafka import Producer

    from streams.app import TokenizeWorker

    producer = Producer(kafka_settings.confluent_common() | {"transactional.id": f"tx-{kafka_settings.topic_events}"})
    producer.init_transactions(30)
    for n in range(2):
        producer.begin_transaction()
        producer.produce(kafka_settings.topic_events, key=b"u1", value=f"event {n}".encode(), partition=0)
        producer.commit_transaction(30)  # record at 2n, commit marker at 2n + 1
    worker = SimpleNamespace(settings=kafka_settings, app=SimpleNamespace(conf=SimpleNamespace(id="hole-check-test")))
    first_offset = TokenizeWorker.first_offset.__get__(worker)
    assert first_offset(0, 0) == 0
    assert first_offset(0, 1) == 2  # offset 1 is the first transaction's marker: absent for every consumer
    assert first_offset(0, 2) == 2
