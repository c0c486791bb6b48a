"""CoLES (Babaev et al., SIGMOD 2022) as a pretraining objective, alone or beside causal LM, through the HF Trainer.

Each user in a batch gives `views` random contiguous runs of whole events, each re-prefixed with [BOS]; runs of the
same user are positives, every other run in the batch a negative (multi-positive InfoNCE on cosine similarity).

Under torchrun each rank computes InfoNCE over its own share of the global batch (negatives are the rank's users, not
every rank's) and DDP averages the gradients: with N processes CoLES sees the negatives of a single-process run with
a batch N times smaller, while causal LM is exactly the single-process loss of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer

from batch.sequence_data import CausalLMCollator, RankBatches, SequenceDataset
from domaintok.models.padded import PaddedBatch

OBJECTIVES = ("clm", "coles", "clm+coles")


@dataclass(frozen=True)
class ColesSettings:
    """The contrastive objective's knobs: views per user, their length as a share of the user's events
    (uniform in [min_fraction, max_fraction], at least one event), the softmax temperature and the weight of
    the contrastive loss beside the causal-LM loss."""

    weight: float = 1.0
    views: int = 2
    min_fraction: float = 0.3
    max_fraction: float = 0.7
    temperature: float = 0.1

    def __post_init__(self):
        if self.views < 2:
            raise ValueError(f"coles views must be at least 2, got {self.views}")
        if not 0.0 < self.min_fraction <= self.max_fraction <= 1.0:
            raise ValueError(f"coles fractions must satisfy 0 < min <= max <= 1, got {self.min_fraction}, {self.max_fraction}")
        if not self.temperature > 0 or not self.weight >= 0:
            raise ValueError("coles temperature must be positive and its weight non-negative")


def check_objective(objective: str) -> tuple[bool, bool]:
    """(uses causal LM, uses CoLES) for an objective name; ValueError on an unknown one."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return "clm" in objective.split("+"), "coles" in objective.split("+")


def sample_views(
    ids: np.ndarray, sep_token_id: int, settings: ColesSettings, rng: np.random.Generator
) -> list[np.ndarray]:
    """`settings.views` random runs of whole events of one sequence ([BOS] e1 [SEP] ... en [SEP]), each
    [BOS] + its events; a sequence without any [SEP] gives copies of itself."""
    ends = np.flatnonzero(ids == sep_token_id) + 1  # exclusive end of each event
    n = len(ends)
    if n == 0:
        return [ids] * settings.views
    starts = np.concatenate([[1], ends[:-1]])  # an event starts after [BOS] or after the previous [SEP]
    low = max(1, int(np.ceil(settings.min_fraction * n)))
    high = max(low, int(np.floor(settings.max_fraction * n)))
    counts = rng.integers(low, high + 1, size=settings.views)  # events per view
    firsts = rng.integers(0, n - counts + 1)  # first event of each view
    return [np.concatenate([ids[:1], ids[starts[f] : ends[f + c - 1]]]) for f, c in zip(firsts, counts)]


@dataclass
class ColesCollator:
    """The causal-LM batch (input_ids, and labels when `clm`) plus every user's views, right-padded:
    view_input_ids / view_attention_mask (B * views, T'), user b's views in rows b * views ... b * views + views - 1."""

    pad_token_id: int
    sep_token_id: int
    settings: ColesSettings
    clm: bool = True
    seed: int = 0
    pad_to_multiple_of: int | None = None
    rank: int = 0  # under torchrun: each rank draws its own views

    def __post_init__(self):
        self._rng = np.random.default_rng([self.seed, 7] if self.rank == 0 else [self.seed, 7, self.rank])
        self._lm = CausalLMCollator(self.pad_token_id, self.pad_to_multiple_of)

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = self._lm(items)
        if not self.clm:
            del batch["labels"]  # no LM loss; input_ids stay so the Trainer counts the users' tokens
        views = [v for item in items for v in sample_views(item["input_ids"], self.sep_token_id, self.settings, self._rng)]
        padded = PaddedBatch.from_sequences(views, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        batch["view_input_ids"] = padded.input_ids  # (B * views, T')
        batch["view_attention_mask"] = padded.attention_mask  # (B * views, T')
        return batch


def coles_loss(embeddings: torch.Tensor, views: int, temperature: float) -> torch.Tensor:
    """Multi-positive InfoNCE over (N, H) embeddings in groups of `views` consecutive rows (one user each): cosine
    similarity of L2-normalised embeddings over `temperature`, each row's positives the other rows of its group,
    negatives every other row (NT-Xent when views == 2)."""
    z = F.normalize(embeddings.float(), dim=-1)  # (N, H)
    N = z.shape[0]
    similarity = z @ z.T / temperature  # (N, N)
    self_pairs = torch.eye(N, dtype=torch.bool, device=z.device)
    group = torch.arange(N, device=z.device) // views  # (N,)
    positive = (group[:, None] == group[None, :]) & ~self_pairs  # (N, N)
    log_prob = similarity.masked_fill(self_pairs, float("-inf")).log_softmax(dim=1)  # (N, N)
    per_row = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1).clamp_min(1)  # (N,)
    return -per_row.mean()


class PretrainTrainer(Trainer):
    """The HF Trainer with the pretraining objective: causal LM, CoLES, or their sum `clm + weight * coles` in one
    step; the parts' running means are logged beside `loss` (as clm_loss / coles_loss), averaged over ranks.

    Data: a `RankBatches` train set is served as it is planned (each rank its own shard, the same number of batches
    on every rank), not re-sharded or dispatched by accelerate; a `SequenceDataset` eval set is read whole by every
    rank in batches of `per_device_eval_batch_size`, so eval_loss (batch losses weighted by rows) is the
    single-process value whatever the ranks.
    """

    def __init__(self, *args, objective: str = "clm", coles: ColesSettings | None = None,
                 train_augment: Callable[[list], list] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_augment = train_augment  # items -> items, for training batches only (e.g. ActionPiece SPR)
        self.use_clm, self.use_coles = check_objective(objective)
        self.coles = coles or ColesSettings()
        self._parts: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, RankBatches):
            if self.train_augment is not None:
                raise ValueError("train_augment needs RankBatches training data")
            return super().get_train_dataloader()
        from accelerate.data_loader import DataLoaderShard

        # accelerate's DataLoaderShard without a device or a sharding wrapper: it forwards set_epoch to the data
        # and `skip_first_batches` (resuming mid-epoch) keeps it one; the Trainer moves batches to the device.
        collate, augment = self.data_collator, self.train_augment
        return DataLoaderShard(
            self.train_dataset, batch_size=None,
            collate_fn=collate if augment is None else (lambda items: collate(augment(items))),
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if not isinstance(dataset, SequenceDataset):
            return super().get_eval_dataloader(eval_dataset)
        return DataLoader(dataset, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator,
                          num_workers=0, pin_memory=self.args.dataloader_pin_memory)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.use_coles:
            result = self._objective_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not model.training:
            # The Trainer weighs every eval batch as a full one, the smaller last one too: log() reports eval_loss
            # weighted by each batch's rows instead, as its parts are.
            loss = result[0] if return_outputs else result
            self._record("loss", loss.detach(), False, inputs["input_ids"].shape[0])
        return result

    def _objective_loss(self, model, inputs, return_outputs, num_items_in_batch):
        inputs = dict(inputs)
        rows = inputs["input_ids"].shape[0]
        if not self.use_clm:
            inputs["input_ids"] = None  # views only: the model skips the language model
        if self.use_clm and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        coles = coles_loss(outputs.view_embeddings, self.coles.views, self.coles.temperature)
        self._record("coles_loss", coles, model.training, rows)
        loss = coles * self.coles.weight
        if model.training and num_items_in_batch is not None and self.use_clm:
            # The Trainer leaves a token-normalised loss unscaled under gradient accumulation; a mean is not.
            loss = loss / self.current_gradient_accumulation_steps
        if self.use_clm:
            clm = outputs.loss
            if model.training and num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every rank's tokens and DDP averages gradients: scale by the ranks as
                # Trainer.compute_loss does, so the step's gradient is the global per-token loss's.
                clm = clm * self.accelerator.num_processes
            # outputs.loss is this micro-batch's share of the accumulated step's per-token loss
            steps = self.current_gradient_accumulation_steps if model.training and num_items_in_batch is not None else 1
            self._record("clm_loss", clm * steps, model.training, rows)
            loss = clm + loss
        return (loss, outputs) if return_outputs else loss

    def _record(self, name: str, value: torch.Tensor, training: bool, rows: int) -> None:
        # Weighted by rows, as the Trainer weighs eval_loss (per sample); training logs average over steps.
        key = name if training else f"eval_{name}"
        self._parts.setdefault(key, []).append((value.detach(), 1 if training else rows))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        evaluating = any(k.startswith("eval_") for k in logs)
        for key in [k for k in self._parts if k.startswith("eval_") == evaluating]:
            parts = self._parts.pop(key)
            if parts:
                values = torch.stack([v for v, _ in parts]).float()
                weights = torch.tensor([w for _, w in parts], dtype=torch.float32, device=values.device)
                mean = (values * weights).sum() / weights.sum()
                # Every rank logs at the same steps (the Trainer gathers the loss there too): average over ranks.
                logs[key] = float(self.accelerator.reduce(mean, reduction="mean"))
        super().log(logs, *args, **kwargs)


__all__ = ["OBJECTIVES", "ColesCollator", "ColesSettings", "PretrainTrainer", "check_objective", "coles_loss", "sample_views"]
