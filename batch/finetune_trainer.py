"""Fine-tuning's training loop on the HF Trainer: one Trainer per stage, the run's state across stages.

A stage (the fusion run, or the tabular-only stage of staged fusion) is one `FusionTrainer.train()`: AdamW with the
encoder/head learning-rate split and no weight decay on biases and norms, warm-up then cosine decay to 10%, gradient
clipping at 1, bf16 on GPUs that have it, DistributedDataParallel under torchrun / accelerate launch. Every
`eval_every` steps (and at a stage's last step) it evaluates on valid, `EarlyStopping` (a TrainerCallback) decides
whether the stage goes on, and a checkpoint is saved: the Trainer's (weights, optimizer, scheduler, RNG) plus the
run's own state (`fusion_run.json`: history, best evaluation, early-stopping counters; `best.safetensors`: the best
weights so far), so `--resume` continues a killed run where its last evaluation left it, in whichever stage.

`FusionRun` holds what spans stages: the evaluations, the best one (kept across stages, so staged fusion is never
worse on valid than its tabular stage) and its weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from domaintok.artifacts import atomic_file
from domaintok.errors import ArtifactError

RUN_STATE = "fusion_run.json"
BEST_WEIGHTS = "best.safetensors"
_STAGE_DIR = re.compile(r"stage-(\d+)-\w+$")
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)$")


class FusionBatches(IterableDataset):
    """One rank's training batches of one stage, for a DataLoader with `batch_size=None`: every rank draws the same
    global batches (an order fixed by seed, stage and epoch, so a resumed run draws what the killed one would have)
    and takes its slice, with the weight that makes DDP's average of the ranks' gradients the global batch's mean."""

    def __init__(self, rows: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int, stage_index: int, ranks):
        super().__init__()
        self.rows, self.lengths, self.batch_size = rows, lengths, batch_size
        self.seed, self.stage_index, self.ranks = seed, stage_index, ranks
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.stage_index, self.epoch])
        from batch.finetune import _batches

        for rows in _batches(rng.permutation(self.rows), self.lengths, self.batch_size, rng):
            mine, weight = self.ranks.share(rows)
            # `share`: this slice's part of the global batch's mean loss (0 for a rank that runs a row at weight 0)
            yield {"rows": mine, "weight": weight, "share": len(mine) / len(rows) if weight else 0.0}


@dataclass
class FusionCollator:
    """A batch spec of FusionBatches -> the model's inputs (right-padded token ids, tabular tensors, labels)."""

    sequences: list
    numeric: torch.Tensor
    categorical: torch.Tensor
    labels: torch.Tensor
    pad_token_id: int

    def __call__(self, spec: dict) -> dict:
        from domaintok.models.padded import PaddedBatch

        rows = spec["rows"]
        batch = PaddedBatch.from_sequences([self.sequences[i] for i in rows], pad_token_id=self.pad_token_id)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "numeric": self.numeric[rows],
                "categorical": self.categorical[rows], "labels": self.labels[rows], "weight": spec["weight"],
                "share": spec["share"]}


@dataclass
class StageStop:
    """Early-stopping state of the running stage: its own best score, evaluations in a row without beating it."""

    best: float = -math.inf
    bad_evals: int = 0
    stopped: bool = False


@dataclass
class Best:
    """The best valid evaluation of the run so far (across stages); its weights live in FusionRun.best_state."""

    score: float = -math.inf
    step: int = 0
    stage: str = ""


@dataclass
class RunState:
    """What fusion_run.json keeps: enough to continue a run from any of its checkpoints."""

    history: list = field(default_factory=list)
    best: Best = field(default_factory=Best)
    stages: list = field(default_factory=list)
    stopped_early: list = field(default_factory=list)
    step: int = 0  # optimizer steps of the run (all stages)
    stage_done: bool = False
    stop: StageStop = field(default_factory=StageStop)
    settings: dict = field(default_factory=dict)  # the options that shape training (RESUME_MUST_MATCH)

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        return cls(history=data["history"], best=Best(**data["best"]), stages=data["stages"],
                   stopped_early=data["stopped_early"], step=data["step"], stage_done=data["stage_done"],
                   stop=StageStop(**data["stop"]), settings=data["settings"])


# What a resumed run must share with the run it continues (the rest, e.g. the output path, may change).
RESUME_MUST_MATCH = (
    "model", "sequences", "labels", "features", "task", "label_column", "split", "valid_fraction", "test_fraction",
    "lora", "lora_r", "lora_alpha", "epochs", "max_steps", "batch_size", "encoder_lr", "head_lr", "weight_decay",
    "warmup", "warmup_steps", "metric", "patience", "min_epochs", "min_delta", "evals_per_epoch", "max_length",
    "dropout", "sequence_dropout", "lm_weight", "sequence_gate", "staged", "stage1_epochs", "stage1_patience",
    "stage2_from", "stage2", "embedding_layernorm", "use_sequence", "seed",
)


def training_settings(settings) -> dict:
    """The RESUME_MUST_MATCH options of a FinetuneSettings, as JSON values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items() if k in RESUME_MUST_MATCH}


class EarlyStopping(TrainerCallback):
    """Stops a stage at the first evaluation after `patience` evaluations in a row that failed to beat the stage's
    best valid score by more than `min_delta`, but not before `min_steps` steps nor at the stage's last step. The
    score is `eval_score` (the selection metric, higher is better); the state lives in the run (saved with it)."""

    def __init__(self, run: FusionRun, patience: int, min_delta: float, min_steps: int):
        self.run, self.patience, self.min_delta, self.min_steps = run, patience, min_delta, min_steps

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        stop = self.run.state.stop
        score = metrics["eval_score"]
        # Patience follows this stage's own best: a second stage gets its run even below the first's score.
        improved = score > stop.best + self.min_delta
        stop.best = max(stop.best, score)
        stop.bad_evals = 0 if improved else stop.bad_evals + 1
        if stop.bad_evals > self.patience and state.global_step >= self.min_steps and state.global_step < state.max_steps:
            stop.stopped = True
            control.should_training_stop = True
        return control


class SaveRunState(TrainerCallback):
    """Completes each checkpoint the Trainer saves with the run's state and best weights (rank 0), then removes the
    run's older checkpoints: the newest complete one is always on disk, whenever the process is killed."""

    def __init__(self, run: FusionRun):
        self.run = run

    def on_save(self, args, state, control, **kwargs):
        run = self.run
        run.state.stage_done = bool(control.should_training_stop)
        if run.ranks.main:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            run.write_state(directory)
            for older in run.checkpoint_dir.glob("stage-*/checkpoint-*"):
                if older != directory:
                    shutil.rmtree(older, ignore_errors=True)
        return control


class FusionTrainer(Trainer):
    """The HF Trainer over FusionBatches: the loss weighted by the rank's share of the global batch, evaluation on
    valid through the run (every rank predicts a slice, all gather), so every rank takes the same decisions."""

    def __init__(self, *args, run: FusionRun, stage: str, stage_start: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.run, self.stage = run, stage
        self.stage_start = stage_start  # the run's step count when this stage started
        self._loss_sum, self._loss_steps = 0.0, 0

    def get_train_dataloader(self):
        from accelerate.data_loader import DataLoaderShard

        # Not re-sharded by accelerate: each rank's FusionBatches already yields its slice. DataLoaderShard forwards
        # set_epoch to the data, and `skip_first_batches` (resuming mid-epoch) keeps it one.
        return DataLoaderShard(self.train_dataset, batch_size=None, collate_fn=self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        weight, share = inputs.pop("weight"), inputs.pop("share")
        outputs = model(**inputs)
        if model.training:
            self._loss_sum += outputs.loss.detach().item() * share
            self._loss_steps += 1
        loss = outputs.loss * weight  # DDP averages the ranks' gradients: the global batch's mean loss
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Kept in the Trainer's state, not printed: the run's own evaluations go to metrics.json.
        self.state.log_history.append({**logs, "step": self.state.global_step})

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval") -> dict:
        run = self.run
        train_loss = run.ranks.all_sum(self._loss_sum) / max(1, self._loss_steps)
        self._loss_sum, self._loss_steps = 0.0, 0
        step = run.state.step = self.stage_start + self.state.global_step
        metrics, score = run.evaluate_valid()
        run.record(self.stage, step, train_loss, score, metrics)
        logged = {"eval_score": score, **{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, float)}}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, logged)
        return logged


class FusionRun:
    """The fine-tuning run over one joined data set: its stages, evaluations, best weights and checkpoints."""

    def __init__(self, model, settings, sequences, numeric, categorical, y, rows, device, pad: int, ranks,
                 checkpoint_dir: Path):
        from batch.finetune import resolve_metric

        self.model, self.s = model, settings
        self.ranks, self.device, self.pad = ranks, device, pad
        self.sequences, self.numeric, self.categorical = sequences, numeric, categorical
        self.y, self.rows = y, rows
        self.labels = torch.from_numpy(np.array(y, copy=True))  # Arrow buffers are read-only
        self.lengths = np.fromiter((len(q) for q in sequences), dtype=np.int64, count=len(sequences))
        self.metric = resolve_metric(settings.task, settings.metric)
        self.checkpoint_dir = checkpoint_dir
        self.state = RunState(settings=training_settings(settings))
        self.best_state: dict | None = None
        # (stage index, the stage's steps at the checkpoint, checkpoint) to continue from
        self.resume_from: tuple[int, int, Path] | None = None
        self.bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    # --- evaluation and selection --------------------------------------------------------------------------------

    def evaluate(self, rows: np.ndarray) -> tuple[dict, np.ndarray]:
        """Metrics and predictions over `rows`; with several processes each predicts its slice and all gather them."""
        from batch.finetune import predict, task_metrics

        mine = np.array_split(np.arange(len(rows)), self.ranks.world)[self.ranks.rank]
        local = rows[mine]
        pred = predict(self.model, [self.sequences[i] for i in local], self.numeric[local], self.categorical[local],
                       self.s.batch_size, self.device)
        if self.ranks.world > 1:
            pred = np.concatenate([p for p in self.ranks.gather(pred) if len(p)])  # slices in rank order: rows' order
        return task_metrics(self.s.task, self.y[rows], pred), pred

    def evaluate_valid(self) -> tuple[dict, float]:
        from batch.finetune import selection_score

        metrics, _ = self.evaluate(self.rows["valid"])
        return metrics, selection_score(self.s.task, metrics, self.metric)

    def record(self, stage: str, step: int, train_loss: float, score: float, metrics: dict) -> None:
        """One evaluation in the history; the weights kept when it is the best of the run."""
        self.state.history.append({"step": step, "stage": stage, "train_loss": train_loss, "score": score,
                                   "valid": metrics})
        if score > self.state.best.score:
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.state.best = Best(score=score, step=step, stage=stage)

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    # --- stages ----------------------------------------------------------------------------------------------------

    def run_stage(self, index: int, stage: str, epochs: int, patience: int, encoder_lr: float) -> None:
        """Train every trainable parameter for up to `epochs` epochs (or max_steps) as stage `index`, evaluating on
        valid `evals_per_epoch` times an epoch. A stage a resumed run already finished is skipped."""
        resume, steps_done = None, 0  # steps the stage had done at the checkpoint resumed from
        if self.resume_from is not None:
            resume_index, resume_steps, checkpoint = self.resume_from
            if index < resume_index or (index == resume_index and self.state.stage_done):
                return
            if index == resume_index:
                resume, steps_done = str(checkpoint), resume_steps
        s = self.s
        steps_per_epoch = math.ceil(len(self.rows["train"]) / s.batch_size)
        total = steps_per_epoch * epochs if s.max_steps is None else min(s.max_steps, steps_per_epoch * epochs)
        warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup * total)
        eval_every = max(1, steps_per_epoch // max(1, s.evals_per_epoch))
        if resume is None:
            self.state.stages.append(stage)
            self.state.stage_done, self.state.stop = False, StageStop()
        # the run's step count when this stage started (a resumed stage: when it started before the kill)
        trainer = self._trainer(index, stage, self.state.step - steps_done, total, warmup, eval_every, encoder_lr)
        trainer.add_callback(EarlyStopping(self, patience, s.min_delta, math.ceil(s.min_epochs * steps_per_epoch)))
        trainer.add_callback(SaveRunState(self))
        with _quiet_saves():
            trainer.train(resume_from_checkpoint=resume)
        self.state.step = trainer.stage_start + trainer.state.global_step
        self.state.stopped_early.append(self.state.stop.stopped)
        self.state.stage_done = True
        self.resume_from = None
        if self.ranks.world > 1:
            # Drop the stage's DDP wrapper (and the gradient hooks it set) before the next changes what trains.
            import gc

            trainer.model_wrapped = trainer.model
            del trainer
            gc.collect()

    def _trainer(self, index: int, stage: str, stage_start: int, total: int, warmup: int, eval_every: int,
                 encoder_lr: float):
        from transformers.trainer_callback import PrinterCallback

        from batch.finetune import param_groups, warmup_cosine

        s = self.s
        args = TrainingArguments(
            output_dir=str(self.checkpoint_dir / f"stage-{index}-{stage}"),
            max_steps=total,
            per_device_train_batch_size=s.batch_size,
            max_grad_norm=1.0,
            bf16=self.bf16,
            use_cpu=self.device.type != "cuda",
            seed=s.seed + self.ranks.rank,  # the same weights everywhere (built before), each rank its own dropout
            ddp_find_unused_parameters=False,
            logging_strategy="no",
            eval_strategy="steps",
            eval_steps=eval_every,
            save_strategy="steps",
            save_steps=eval_every,  # a checkpoint after every evaluation (and at the last step); SaveRunState
            # keeps the newest only
            report_to="none",
            disable_tqdm=not s.progress or not self.ranks.main,
            dataloader_num_workers=0,
            average_tokens_across_devices=False,
        )
        optimizer = torch.optim.AdamW(param_groups(self.model, encoder_lr, s.head_lr, s.weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
        data = FusionBatches(self.rows["train"], self.lengths, s.batch_size, s.seed, index, self.ranks)
        collator = FusionCollator(self.sequences, self.numeric, self.categorical, self.labels, self.pad)
        trainer = FusionTrainer(model=self.model, args=args, train_dataset=data, eval_dataset=self.rows["valid"],
                                data_collator=collator, optimizers=(optimizer, scheduler), run=self, stage=stage,
                                stage_start=stage_start)
        trainer.remove_callback(PrinterCallback)  # metrics go to metrics.json, not to stdout
        return trainer

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def write_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.best_state is not None:
            save_file({k: v.contiguous() for k, v in self.best_state.items()}, str(directory / BEST_WEIGHTS))
        # Written last, through a rename: a checkpoint with a run state is complete.
        with atomic_file(directory / RUN_STATE) as tmp:
            tmp.write_text(json.dumps(asdict(self.state), default=float) + "\n")

    def load_latest(self) -> None:
        """Continue from the newest checkpoint under checkpoint_dir: the run's state and best weights; the Trainer
        reloads the rest (weights, optimizer, scheduler, RNG) when its stage runs."""
        from safetensors.torch import load_file

        found = []
        for stage_dir in self.checkpoint_dir.iterdir():
            stage = _STAGE_DIR.search(stage_dir.name)
            for checkpoint in stage_dir.glob("checkpoint-*") if stage else ():
                number = _CHECKPOINT_DIR.search(checkpoint.name)
                if number and (checkpoint / RUN_STATE).is_file():
                    found.append((int(stage.group(1)), int(number.group(1)), checkpoint))
        if not found:
            raise ArtifactError(f"{self.checkpoint_dir}: no complete checkpoint to resume from")
        index, steps, checkpoint = max(found)
        self.state = RunState.from_json(json.loads((checkpoint / RUN_STATE).read_text()))
        if self.state.stage_done and len(self.state.stopped_early) < len(self.state.stages):
            self.state.stopped_early.append(self.state.stop.stopped)  # the stage ended at this checkpoint
        if (checkpoint / BEST_WEIGHTS).is_file():
            self.best_state = load_file(str(checkpoint / BEST_WEIGHTS))
        self.resume_from = (index, steps, checkpoint)
        now = training_settings(self.s)
        changed = [k for k in RESUME_MUST_MATCH if self.state.settings.get(k) != now[k]]
        if changed:
            raise ArtifactError(f"{checkpoint}: --resume with other options than the run it continues: "
                                + ", ".join(f"{k} {self.state.settings.get(k)!r} -> {now[k]!r}" for k in changed))


@contextmanager
def _quiet_saves():
    """No "Writing model shards" bar at every checkpoint: the training bar is the one to watch."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


__all__ = ["FusionRun", "FusionTrainer", "FusionBatches", "FusionCollator", "EarlyStopping", "SaveRunState"]
