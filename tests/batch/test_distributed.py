"""Distributed pretraining and fine-tuning (torchrun, gloo on CPU).

Unit tests check the sharding of the training stream directly: every rank reads its own rows, every rank runs the
same number of batches per epoch, and across ranks each item is used exactly once an epoch. The end-to-end tests
run `python -m torch.distributed.run --nproc_per_node 2` on a tiny synthetic data set (a word-level tokenizer of 45
tokens, 192 users, the tiny preset) and compare with a single-process run of the same global batch. Starting
processes costs most of the time (imports), so one torchrun launch runs both the pretraining and the finetuning
(the real CLI, wrapped to record), and a second one resumes through the installed `domaintok` console script.

- pretrain: the items each rank trained on, the loss curve (within `PRETRAIN_CURVE_TOLERANCE`: the ranks bucket
  their own shards, so the global batches hold other users than a single process's, and only the curve's level can
  match), which processes wrote the model dir, and `--resume`;
- finetune: every process trains on a slice of the same global batches, so without dropout the run is the
  single-process run up to float rounding (`FINETUNE_TOLERANCE`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.sequence_data import SequenceDataset, batch_sizes, plan_batches, rank_batches

PAD, BOS, SEP, EOS, UNK = 0, 1, 2, 3, 4
FIRST, TOKENS = 5, 40  # ordinary tokens 5..44
N_USERS = 192
CONTEXT = 32
# Mean absolute difference of the per-step train loss, 2 processes against 1 (nats); the loss falls by several
# times this over the run (checked), and the two curves stay this close step by step.
PRETRAIN_CURVE_TOLERANCE = 0.05
FINETUNE_TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[2]


def write_users(path: Path, n_users: int = N_USERS, row_group_size: int = 24, seed: int = 0) -> list[list[int]]:
    """[BOS] + an event naming the user (two tokens, unique per user) + 1 to 8 events (a, a + 1, [SEP]): at most
    28 tokens, so no user is cut at a context of 32, and every user's sequence is distinct."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_users):
        ids = [BOS, FIRST + i % TOKENS, FIRST + (i // TOKENS) % TOKENS, SEP]
        for a in rng.integers(0, TOKENS, size=int(rng.integers(1, 9))):
            ids += [FIRST + int(a), FIRST + (int(a) + 1) % TOKENS, SEP]
        rows.append(ids)
    table = pa.table({"user_id": [f"user-{i:03d}" for i in range(n_users)],
                      "input_ids": pa.array(rows, pa.list_(pa.int32()))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return rows


def items(dataset) -> list[tuple[int, ...]]:
    return [tuple(x["input_ids"].tolist()) for x in dataset]


# --- sharding (unit) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("windows", ["newest", "all"])
def test_shards_are_disjoint_and_together_the_whole_split(tmp_path, windows):
    path = tmp_path / "seq.parquet"
    write_users(path, n_users=100, row_group_size=24)  # 5 row groups, cut mid-group by most shard counts
    context = 32 if windows == "newest" else 10
    kwargs = dict(path=path, batch_size=4, context_length=context, sep_token_id=SEP, eval_fraction=0.2,
                  windows=windows, shuffle=True, seed=3)
    for split in ("train", "eval"):
        whole = sorted(items(SequenceDataset(split=split, **kwargs)))
        for shards in (2, 3, 7):
            parts = [items(SequenceDataset(split=split, num_shards=shards, shard_index=r, **kwargs))
                     for r in range(shards)]
            assert sorted(sum(parts, [])) == whole, (split, shards)  # each item in exactly one shard
            counts = [SequenceDataset(split=split, num_shards=shards, shard_index=r, **kwargs).count_items()
                      for r in range(shards)]
            assert counts == [len(p) for p in parts]
        # DataLoader workers split a rank's shard further
        rank = SequenceDataset(split=split, num_shards=2, shard_index=1, **kwargs)
        by_worker = [tuple(ids.tolist()) for w in range(3) for ids in rank._read((w, 3))]
        assert sorted(by_worker) == sorted(items(rank))


def test_batch_sizes_fill_every_batch_and_keep_full_batches_first():
    assert batch_sizes(33, 5, 8) == [8, 8, 8, 8, 1]  # one process: the usual batches
    assert batch_sizes(16, 5, 4) == [4, 4, 4, 3, 1]  # a rank one batch short still runs 5
    assert batch_sizes(23, 5, 4) == [5, 5, 5, 4, 4]  # a rank with more than its share
    for items_, batches, size in [(17, 5, 4), (100, 7, 16), (7, 7, 1), (50, 3, 4)]:
        sizes = batch_sizes(items_, batches, size)
        assert len(sizes) == batches and sum(sizes) == items_ and min(sizes) >= 1
    with pytest.raises(ValueError):
        batch_sizes(3, 4, 8)
    with pytest.raises(ValueError, match="cannot give each of 4 processes"):
        plan_batches([[10]] * 4, 3)
    with pytest.raises(ValueError, match="fewer than one item per batch"):
        plan_batches([[40], [2]], 8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_runs_the_same_batches_and_each_item_once_an_epoch(tmp_path, world):
    path = tmp_path / "seq.parquet"
    write_users(path, n_users=150, row_group_size=16)
    global_batch = 12
    kwargs = dict(path=path, context_length=CONTEXT, sep_token_id=SEP, eval_fraction=0.2, shuffle=True, seed=1,
                  bucket_batches=2)
    per_rank = -(-global_batch // world)
    shards = [SequenceDataset(split="train", batch_size=per_rank, num_shards=world, shard_index=r, **kwargs)
              for r in range(world)]
    counts = [[shard.count_items()] for shard in shards]
    ranks = [rank_batches(shard, global_batch, gather=lambda local: counts) for shard in shards]
    train = sorted(items(SequenceDataset(split="train", batch_size=global_batch, **kwargs)))
    steps = -(-len(train) // global_batch)
    assert [len(r) for r in ranks] == [steps] * world and ranks[0].total_items == len(train)
    for epoch in (0, 1):
        for r in ranks:
            r.set_epoch(epoch)
        batches = [list(r) for r in ranks]
        assert all(len(b) == steps for b in batches)
        seen = [tuple(x["input_ids"].tolist()) for rank in batches for batch in rank for x in batch]
        assert sorted(seen) == train  # every item exactly once across the ranks
        step_sizes = [sum(len(rank[j]) for rank in batches) for j in range(steps)]
        # the global batch asked for at every step but the epoch's last ones, where the ranks' remainders meet
        assert step_sizes[: steps - 2] == [global_batch] * (steps - 2) and sum(step_sizes) == len(train)
        order = [[tuple(tuple(x["input_ids"].tolist()) for x in batch) for batch in rank] for rank in batches]
        if epoch == 1:
            assert order != first  # reshuffled
        first = order
    if world == 1:  # one process: exactly the dataset's own batches
        ranks[0].set_epoch(0)
        planned = [tuple(x["input_ids"].tolist()) for batch in ranks[0] for x in batch]
        plain = SequenceDataset(split="train", batch_size=global_batch, **kwargs)
        assert planned == items(plain)


# --- torchrun end to end ------------------------------------------------------------------------------------------

# Runs the real CLI in each torchrun process, one command after the other (each joins and leaves the process group),
# after wrapping two functions to record (1) the items each rank trains on, per epoch, and (2) which ranks write
# the pretrained model directory.
RECORDING_LAUNCHER = """
import json, os, sys
from batch import pretrain, sequence_data
from domaintok.cli import main

record, rank = os.environ["DOMAINTOK_TEST_RECORD"], int(os.environ["RANK"])
iterate, write = sequence_data.RankBatches.__iter__, pretrain._write_model_dir

def recording_iter(self):
    for batch in iterate(self):
        with open(f"{record}/items-{rank}.jsonl", "a") as out:
            out.write(json.dumps({"epoch": self.dataset.epoch, "items": [x["input_ids"].tolist() for x in batch]}) + "\\n")
        yield batch

def recording_write(*args, **kwargs):
    with open(f"{record}/writes", "a") as out:
        out.write(f"{rank}\\n")
    return write(*args, **kwargs)

sequence_data.RankBatches.__iter__ = recording_iter
pretrain._write_model_dir = recording_write
commands = json.loads(sys.argv[1])
sys.exit(max(main(command) for command in commands))
"""


def torchrun(*args, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS` on CPU (gloo), one thread a process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *map(str, args)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
               **(env or {})}
    done = subprocess.run(command, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def console_script() -> str:
    """The installed `domaintok` console script, as `torchrun ... $(which domaintok)` runs it."""
    script = Path(sys.executable).with_name("domaintok")
    if not script.is_file():
        pytest.skip(f"no console script beside {sys.executable}")
    return str(script)


def write_word_tokenizer(out: Path) -> Path:
    """A plain HF word-level tokenizer over the synthetic ids (pretrain reads vocabulary and special ids from it)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[SEP]": SEP, "[EOS]": EOS, "[UNK]": UNK,
             **{f"t{i}": i for i in range(FIRST, FIRST + TOKENS)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]",
        bos_token="[BOS]", sep_token="[SEP]", eos_token="[EOS]", unk_token="[UNK]", model_max_length=CONTEXT,
    )
    tokenizer.save_pretrained(out)
    return out


def write_finetune_inputs(root: Path, rows: list[list[int]]) -> tuple[Path, Path]:
    """Labels with an explicit split (129 train rows: the last global batch of 16 has a single row, so one process
    trains on none of it) and a numeric feature that carries part of the label."""
    rng = np.random.default_rng(1)
    users = [f"user-{i:03d}" for i in range(N_USERS)]
    events = np.array([(len(r) - 4) // 3 for r in rows])
    label = ((events > 4) ^ (rng.random(N_USERS) < 0.15)).astype(np.int64)
    split = ["train"] * 129 + ["valid"] * 32 + ["test"] * 31
    labels, features = root / "labels.parquet", root / "features.parquet"
    pq.write_table(pa.table({"user_id": users, "label": label, "split": split}), labels)
    pq.write_table(pa.table({"user_id": users, "x": rng.normal(size=N_USERS) + label}), features)
    return labels, features


def pretrain_args(root: Path, output: str, steps: int) -> list[str]:
    return [str(a) for a in [
        "pretrain", "--sequences", root / "seq.parquet", "--tokenizer", root / "tokenizer", "--output", root / output,
        "--preset", "tiny", "--context-length", CONTEXT, "--batch-size", 16, "--lr", 3e-3, "--eval-fraction", 0.2,
        "--max-steps", steps, "--save-steps", steps // 2, "--threads", 1, "--seed", 0]]


# Without dropout, so that two processes can reproduce one exactly; patience never stops a stage early.
FINETUNE_OPTIONS = dict(epochs=2, stage1_epochs=2, batch_size=16, dropout=0.0, evals_per_epoch=2, patience=10)


def finetune_args(root: Path, output: str) -> list[str]:
    return ["finetune", "--model", str(root / "encoder"), "--sequences", str(root / "seq.parquet"), "--labels",
            str(root / "labels.parquet"), "--features", str(root / "features.parquet"), "--output", str(root / output),
            *[f"--{k.replace('_', '-')}={v}" for k, v in FINETUNE_OPTIONS.items()]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process, in this process: pretrain ("one") and finetune ("ft-one"). Two processes, one torchrun launch:
    the same pretraining ("two", recorded) and the same finetuning ("ft-two"). Pretraining runs two epochs with
    checkpoints at each epoch's end; finetuning starts from a tiny encoder without dropout (pretrain's has 0.1,
    which each process would draw differently)."""
    import torch

    from domaintok.cli import main
    from domaintok.models import DomainTransformerConfig, DomainTransformerModel

    root = tmp_path_factory.mktemp("distributed")
    rows = write_users(root / "seq.parquet")
    write_word_tokenizer(root / "tokenizer")
    write_finetune_inputs(root, rows)
    torch.manual_seed(0)
    config = DomainTransformerConfig.from_preset("tiny", vocab_size=FIRST + TOKENS, pad_token_id=PAD,
                                                 bos_token_id=BOS, sep_token_id=SEP, tokenizer_fingerprint="fp",
                                                 max_position_embeddings=CONTEXT, dropout=0.0)
    DomainTransformerModel(config).save_pretrained(root / "encoder")
    train = sorted(items(SequenceDataset(path=root / "seq.parquet", split="train", batch_size=16,
                                         context_length=CONTEXT, sep_token_id=SEP, eval_fraction=0.2, shuffle=False)))
    steps = 2 * -(-len(train) // 16)
    seconds = {}
    started = time.perf_counter()
    assert main(pretrain_args(root, "one", steps)) == 0
    assert main(finetune_args(root, "ft-one")) == 0
    seconds["one"] = time.perf_counter() - started
    (root / "record").mkdir()
    (root / "launch.py").write_text(RECORDING_LAUNCHER)
    started = time.perf_counter()
    torchrun(root / "launch.py", json.dumps([pretrain_args(root, "two", steps), finetune_args(root, "ft-two")]),
             env={"DOMAINTOK_TEST_RECORD": str(root / "record")})
    seconds["two"] = time.perf_counter() - started
    metrics = {run: json.loads((root / run / "metrics.json").read_text()) for run in ("one", "two", "ft-one", "ft-two")}
    return {"root": root, "train": train, "steps": steps, "seconds": seconds, **metrics}


@pytest.mark.integration
@pytest.mark.slow
def test_pretrain_on_two_processes_matches_one(runs):
    root, train, steps, one, two = runs["root"], runs["train"], runs["steps"], runs["one"], runs["two"]
    # (1) Each rank read its own items; together, every training item exactly once an epoch.
    seen = {}
    for rank in (0, 1):
        for line in (root / "record" / f"items-{rank}.jsonl").read_text().splitlines():
            batch = json.loads(line)
            seen.setdefault((batch["epoch"], rank), []).extend(tuple(x) for x in batch["items"])
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch in (0, 1):
        assert not set(seen[epoch, 0]) & set(seen[epoch, 1])
        assert sorted(seen[epoch, 0] + seen[epoch, 1]) == train
    assert two["processes"] == 2 and two["per_device_batch_size"] == 8 and two["batch_size"] == 16
    assert two["steps"] == one["steps"] == steps and two["train_items"] == one["train_items"] == len(train)
    assert two["train_tokens"] == one["train_tokens"] == 2 * sum(len(x) for x in train)

    # (2) The loss curve of the global batch: as a single process's, within the stated tolerance.
    curve = {run: np.array([e["loss"] for e in m["log_history"] if "loss" in e]) for run, m in (("one", one), ("two", two))}
    assert len(curve["one"]) == len(curve["two"]) == steps
    difference = float(np.abs(curve["one"] - curve["two"]).mean())
    drop = float(curve["one"][:3].mean() - curve["one"][-3:].mean())
    print(f"pretrain loss curve, 1 vs 2 processes over {steps} steps: mean |difference| {difference:.4f} nats "
          f"(max {np.abs(curve['one'] - curve['two']).max():.4f}), the loss falls {drop:.3f}; eval loss "
          f"{one['eval_loss']:.4f} vs {two['eval_loss']:.4f}; pretrain + finetune {runs['seconds']['one']:.1f} s "
          f"in this process vs {runs['seconds']['two']:.1f} s for the torchrun launch")
    assert difference < PRETRAIN_CURVE_TOLERANCE and drop > 4 * PRETRAIN_CURVE_TOLERANCE
    assert abs(one["eval_loss"] - two["eval_loss"]) < PRETRAIN_CURVE_TOLERANCE

    # (3) Only rank 0 wrote the model dir, and completely.
    assert (root / "record" / "writes").read_text().split() == ["0"]
    assert {"config.json", "model.safetensors", "metrics.json", "loss_curve.png", "tokenizer.json"} <= {
        p.name for p in (root / "two").iterdir()}
    assert not list(root.glob(".two*"))


@pytest.mark.integration
@pytest.mark.slow
def test_pretrain_resumes_on_two_processes(runs):
    """--resume from the last checkpoint of the two-process run, through the installed console script."""
    root, steps, two = runs["root"], runs["steps"], runs["two"]
    checkpoints = root / "two.checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"checkpoint-{steps // 2}", f"checkpoint-{steps}"]
    args = pretrain_args(root, "two", steps + 4)
    args[args.index("--save-steps") + 1] = str(steps // 2)
    torchrun(console_script(), *args, "--resume")
    resumed = json.loads((root / "two" / "metrics.json").read_text())
    assert resumed["resumed"] and resumed["steps"] == steps + 4 and resumed["processes"] == 2
    before = [(e["step"], e["loss"]) for e in two["log_history"] if "loss" in e]
    after = [(e["step"], e["loss"]) for e in resumed["log_history"] if "loss" in e]
    assert after[:steps] == before and len(after) == steps + 4
    assert f"checkpoint-{steps + 4}" in {p.name for p in checkpoints.iterdir()}


@pytest.mark.integration
@pytest.mark.slow
def test_finetune_on_two_processes_is_the_single_process_run(runs):
    root, one, two = runs["root"], runs["ft-one"], runs["ft-two"]
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["stages"] == two["stages"] == ["fusion", "tabular"] and two["steps"] == one["steps"]
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]]
    gaps = [max(abs(a["train_loss"] - b["train_loss"]), abs(a["score"] - b["score"]))
            for a, b in zip(one["history"], two["history"])]
    print(f"finetune, 1 vs 2 processes: {len(gaps)} evaluations over {one['steps']} steps, largest difference of "
          f"train loss or valid score {max(gaps):.2e}")
    assert max(gaps) < FINETUNE_TOLERANCE
    assert (two["best_step"], two["best_stage"]) == (one["best_step"], one["best_stage"])
    for key in ("auc", "logloss", "accuracy"):
        assert two["test"][key] == pytest.approx(one["test"][key], abs=FINETUNE_TOLERANCE)
    predictions = [pq.read_table(root / run / "predictions.parquet") for run in ("ft-one", "ft-two")]
    assert predictions[0].column("user_id").to_pylist() == predictions[1].column("user_id").to_pylist()
    np.testing.assert_allclose(predictions[1].column("prediction").to_numpy(),
                               predictions[0].column("prediction").to_numpy(), atol=FINETUNE_TOLERANCE)
    assert not list(root.glob(".ft-two*"))
