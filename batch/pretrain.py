"""`domaintok pretrain`: pretraining of the domain transformer on sequences.parquet with the HF Trainer: causal LM,
CoLES (batch/contrastive.py) or both.

Streams sequences (batch/sequence_data.py), writes a self-contained model dir: safetensors weights + config, the
tokenizer files, metrics.json and loss_curve.png. Trainer checkpoints (for --resume) live beside it, not in it.

Distributed: under `torchrun` or `accelerate launch` every process reads its own shard of the training sequences
and `--batch-size` stays the global batch (split across processes), so the schedule (`max_steps`, warm-up) and the
loss per step are those of a single-process run with the same batch; only rank 0 writes the model dir.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import click
import numpy as np

from batch.checkpoints import CheckpointDirs, checked_checkpoint_dir
from batch.distributed import all_gather, is_rank_zero, leave_process_group
from domaintok.artifacts import atomic_dir
from domaintok.errors import ArtifactError, DomaintokError

# Peak learning rates by size: smaller models tolerate (and need) larger steps.
DEFAULT_LR = {"tiny": 1e-3, "small": 1e-3, "24m": 6e-4, "330m": 3e-4}
# Preset names, listed here so the CLI's choices need no torch/transformers import (a test keeps them equal to PRESETS).
PRESET_NAMES = ("tiny", "small", "24m", "330m")
# Files the model writes into its directory; a tokenizer file of the same name would be overwritten.
MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json", "metrics.json", "loss_curve.png"}


@dataclass(frozen=True)
class TokenizerInfo:
    """What the model needs from the fitted tokenizer: vocabulary size, special ids, fingerprint, window."""

    path: Path
    vocab_size: int
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int | None
    sep_token_id: int | None
    fingerprint: str | None
    max_length: int | None
    domain: object | None = field(default=None, repr=False, compare=False)  # the fitted DomainTokenizer, when there

    @cached_property
    def merged_parts(self) -> tuple[int, list[list[int]]] | None:
        """ActionPiece: (the first merged id, each merged id's original ids); None without merges."""
        ap = self.domain.merges if self.domain is not None else None
        return (ap.base, [list(ids) for ids in ap.merged_parts]) if ap and ap.n_merges else None


def read_tokenizer(path: str | Path) -> TokenizerInfo:
    """Read a tokenizer directory: the fitted `DomainTokenizer` when present, else the plain HF tokenizer in it."""
    from domaintok.tokenizer import ARTIFACT_FILE, DomainTokenizer

    path = Path(path)
    if (path / ARTIFACT_FILE).is_file():
        tok = DomainTokenizer.from_pretrained(path)
        return TokenizerInfo(
            path=path, vocab_size=int(tok.vocab_size), pad_token_id=int(tok.pad_token_id),
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, sep_token_id=tok.sep_token_id,
            fingerprint=tok.fingerprint, max_length=tok.max_length, domain=tok,
        )
    # A plain HF tokenizer dir (no fitted domain state) still gives vocabulary and special ids; no fingerprint.
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a tokenizer directory ({type(exc).__name__})") from None
    if hf.pad_token_id is None:
        raise ArtifactError(f"{path}: tokenizer has no [PAD] token")
    extra = getattr(hf, "init_kwargs", {})
    max_length = hf.model_max_length if isinstance(hf.model_max_length, int) and hf.model_max_length < 1e6 else None
    return TokenizerInfo(
        path=path, vocab_size=len(hf), pad_token_id=hf.pad_token_id, bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id, sep_token_id=hf.sep_token_id, fingerprint=extra.get("fingerprint"),
        max_length=max_length,
    )


def copy_tokenizer_files(tokenizer_dir: Path, model_dir: Path) -> list[str]:
    """Copy the tokenizer's files beside the weights so the model dir alone serves AutoTokenizer/DomainTokenizer."""
    copied = []
    for source in sorted(tokenizer_dir.iterdir()):
        if source.name in MODEL_FILES:
            raise ArtifactError(f"{source}: tokenizer file would overwrite the model's own {source.name}")
        target = model_dir / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        copied.append(source.name)
    return copied


@dataclass
class PretrainSettings(CheckpointDirs):
    """Every knob of a pretraining run (the CLI's options)."""

    sequences: Path
    tokenizer: Path
    output: Path
    preset: str = "tiny"
    context_length: int | None = None
    windows: str = "newest"
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    lr: float | None = None
    warmup: float = 0.05
    weight_decay: float = 0.1
    eval_fraction: float = 0.05
    eval_max_sequences: int = 2_000
    save_steps: int | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    seed: int = 0
    gradient_checkpointing: bool = False
    compile: bool = False
    overrides: dict = field(default_factory=dict)
    objective: str = "clm"
    coles_weight: float = 1.0
    coles_views: int = 2
    coles_min_fraction: float = 0.3
    coles_max_fraction: float = 0.7
    coles_temperature: float = 0.1
    pooling: str | None = None
    logging_steps: int | None = None
    eval_steps: int | None = None
    threads: int | None = None
    actionpiece_spr: float = 0.0  # share of training windows re-segmented by random set permutations (SPR)
    actionpiece_compose: bool = False  # merged tokens embedded as their own row + the mean of their parts' rows


def pretrain(settings: PretrainSettings) -> dict:
    """Run a pretraining job end to end; returns the metrics also written to <output>/metrics.json."""
    import torch
    from transformers import AutoTokenizer

    from batch.contrastive import PretrainTrainer
    from domaintok.models import DomainTransformerForCausalLM

    s = settings
    state, echo = _process_group()
    world, rank, cuda = state.num_processes, state.process_index, torch.cuda.is_available()
    if s.batch_size < world:
        raise DomaintokError(f"--batch-size is the global batch: {s.batch_size} cannot be split over {world} processes")
    use_clm, coles = _objective(s)
    tok = read_tokenizer(s.tokenizer)
    if coles is not None and tok.sep_token_id is None:
        raise DomaintokError(f"{s.tokenizer}: objective {s.objective!r} needs a [SEP] token to cut events")
    context_length, source, lengths = _context(s, tok, echo)
    if s.threads:
        torch.set_num_threads(s.threads)
    checkpoint_dir = checked_checkpoint_dir(s.resolved_checkpoint_dir(), s.resume)
    config = _build_config(
        s, vocab_size=tok.vocab_size, max_position_embeddings=context_length, tokenizer_fingerprint=tok.fingerprint,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        sep_token_id=tok.sep_token_id, **({"pooling": s.pooling} if s.pooling else {}),
        **_composition(s, tok), **s.overrides,
    )
    torch.manual_seed(s.seed)
    model = DomainTransformerForCausalLM(config)
    data = _data(s, tok, context_length, world, rank, echo)
    augment = _spr_augment(s, tok, context_length, rank)
    args = _training_args(s, checkpoint_dir, data, cuda)
    trainer = PretrainTrainer(
        model=model,
        args=args,
        train_dataset=data.train_batches,
        eval_dataset=data.eval_set if data.n_eval else None,
        data_collator=_collator(tok, use_clm, coles, s.seed, rank, cuda),
        # With the tokenizer's pad id the Trainer counts real tokens (`non_padding`) and saves it in checkpoints.
        processing_class=AutoTokenizer.from_pretrained(s.tokenizer),
        objective=s.objective,
        coles=coles,
        train_augment=augment,
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if s.resume else None)
    train_seconds = time.perf_counter() - started
    # The eval schedule may already have evaluated the final step; evaluate again only when it did not.
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        final_eval = evals[-1]
    else:
        final_eval = trainer.evaluate() if data.n_eval else {}
    stats = _all_reduce_stats(data.train_set.stats, state) if world > 1 else data.train_set.stats
    metrics = _metrics(s, tok, config, model, trainer, args, data, final_eval, stats, train_seconds,
                       context_length, source, lengths, world)
    # FSDP shards the weights over ranks: gathering the full state dict is collective, so every rank takes part.
    full_state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if state.is_main_process:
        _write_model_dir(s, trainer, metrics, full_state)
    state.wait_for_everyone()  # no rank returns before the model dir is in place
    return metrics


def _spr_augment(s: PretrainSettings, tok: TokenizerInfo, context_length: int, rank: int):
    """With --actionpiece-spr RATE: items -> items, each training window re-segmented by random set permutations
    with probability RATE (fresh draws each batch, from a generator seeded by the seed and rank); else None."""
    if not s.actionpiece_spr:
        return None
    if not 0 < s.actionpiece_spr <= 1:
        raise DomaintokError(f"--actionpiece-spr: a share of the training windows in (0, 1], got {s.actionpiece_spr}")
    from domaintok.set_permutation import SetPermutation

    _require_merges("--actionpiece-spr", s, tok)
    spr = SetPermutation.from_tokenizer(tok.domain)
    rng = np.random.default_rng([s.seed, rank, 0x5B2])

    def augment(items: list[dict]) -> list[dict]:
        windows = spr.apply([item["input_ids"] for item in items], rng, context_length, rate=s.actionpiece_spr)
        return [{**item, "input_ids": ids} for item, ids in zip(items, windows, strict=True)]

    return augment


def _require_merges(option: str, s: PretrainSettings, tok: TokenizerInfo) -> None:
    """Refuse an ActionPiece option for a tokenizer without merges (none fitted, or a plain HF tokenizer dir)."""
    if tok.merged_parts is None:
        raise DomaintokError(f"{option}: tokenizer {s.tokenizer} has no ActionPiece merges "
                             "(schema `actionpiece: {merges: N}`)")


def _composition(s: PretrainSettings, tok: TokenizerInfo) -> dict:
    """With --actionpiece-compose: the config fields that embed each merged token with its parts (see
    DomainTransformerConfig); refused for a tokenizer without merges."""
    if not s.actionpiece_compose:
        return {}
    _require_merges("--actionpiece-compose", s, tok)
    base, parts = tok.merged_parts
    return {"merged_tokens_base": base, "merged_tokens_parts": parts}


def _process_group():
    """This process's accelerate state (joining the process group when started by torchrun / accelerate launch:
    gloo on CPU, NCCL on GPU; TrainingArguments rebuilds it over the same group) and an echo for rank 0 only."""
    import torch
    from accelerate import PartialState

    cuda = torch.cuda.is_available()
    if not cuda:
        # accelerate names the device of a multi-CPU run "cpu:0", which torch.load cannot map tensors to: the
        # Trainer would fail to reload the optimizer on --resume. Its state (rebuilt by TrainingArguments) takes
        # the device from this variable instead.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    state = PartialState(cpu=not cuda)
    return state, (click.echo if state.is_main_process else (lambda *args, **kwargs: None))


def _objective(s: PretrainSettings):
    """(use causal LM, ColesSettings or None), after refusing combinations that cannot work."""
    from batch.contrastive import ColesSettings, check_objective

    use_clm, use_coles = check_objective(s.objective)
    if s.windows not in ("newest", "all"):
        raise DomaintokError(f"windows must be newest or all, got {s.windows!r}")
    if use_coles and s.windows == "all":
        raise DomaintokError("--windows all trains on several windows of one user, which CoLES would take for "
                             "different users (false negatives): use --windows newest with coles objectives")
    coles = ColesSettings(
        weight=s.coles_weight, views=s.coles_views, min_fraction=s.coles_min_fraction,
        max_fraction=s.coles_max_fraction, temperature=s.coles_temperature,
    ) if use_coles else None
    return use_clm, coles


def _context(s: PretrainSettings, tok: TokenizerInfo, echo) -> tuple[int, str, dict]:
    """The context length, where it came from, and the sequences' lengths against it (warned when users lose most of
    their history to it)."""
    from batch.sequence_data import context_warning, length_summary

    context_length = s.context_length or tok.max_length or 1024
    source = "--context-length" if s.context_length else "the tokenizer's max_length" if tok.max_length else "default"
    echo(f"pretrain: context {context_length:,} tokens ({source})", err=True)
    lengths = length_summary(s.sequences, context_length)
    warning = context_warning("pretrain", context_length, lengths) if s.windows == "newest" else None
    if warning:
        echo(warning, err=True)
    return context_length, source, lengths


@dataclass
class _Data:
    train_set: Any
    eval_set: Any
    train_batches: Any
    n_train: int
    n_eval: int
    per_device: int
    max_steps: int


def _data(s: PretrainSettings, tok: TokenizerInfo, context_length: int, world: int, rank: int, echo) -> _Data:
    """This rank's shard of the training sequences in batches (every rank runs the same number per epoch), the eval
    split (evaluated whole by every rank in global batches: the single-process eval_loss) and the step count."""
    from batch.sequence_data import SequenceDataset, count_sequences, rank_batches

    # --batch-size is global: each of the `world` processes takes its share of every step's batch.
    per_device = math.ceil(s.batch_size / world)
    common = dict(
        path=s.sequences, context_length=context_length, sep_token_id=tok.sep_token_id,
        eval_fraction=s.eval_fraction, seed=s.seed, windows=s.windows,
    )
    train_set = SequenceDataset(split="train", shuffle=True, batch_size=per_device, num_shards=world,
                                shard_index=rank, **common)
    eval_set = SequenceDataset(split="eval", shuffle=False, max_sequences=s.eval_max_sequences,
                               batch_size=s.batch_size, **common)
    counting = dict(windows=s.windows, context_length=context_length, sep_token_id=tok.sep_token_id)
    n_eval = min(count_sequences(s.sequences, "eval", s.eval_fraction, **counting), s.eval_max_sequences)
    # Each rank counts the items of its own shard (one read of it) and learns the others' counts.
    try:
        train_batches = rank_batches(train_set, s.batch_size, all_gather if world > 1 else None)
    except ValueError as exc:  # a shard with fewer items than the epoch has steps
        raise DomaintokError(f"{s.sequences}: {exc}") from None
    n_train = train_batches.total_items
    if s.windows == "all":
        echo(f"pretrain: every window of each user's history: {n_train:,} training windows", err=True)
    if n_train == 0:
        raise DomaintokError(f"{s.sequences}: no training sequences (empty file, or every user in the eval split)")
    steps_per_epoch = math.ceil(len(train_batches) / s.grad_accum)
    max_steps = s.max_steps or max(1, math.ceil(steps_per_epoch * s.epochs))
    return _Data(train_set, eval_set, train_batches, n_train, n_eval, per_device, max_steps)


def _training_args(s: PretrainSettings, checkpoint_dir: Path, data: _Data, cuda: bool):
    import torch
    from transformers import TrainingArguments

    max_steps = data.max_steps
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=max_steps,
        per_device_train_batch_size=data.per_device,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr or DEFAULT_LR.get(s.preset, 3e-4),
        lr_scheduler_type="cosine",
        warmup_steps=s.warmup,
        weight_decay=s.weight_decay,  # the Trainer leaves biases and LayerNorm weights out of it
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        tf32=cuda or None,
        use_cpu=not cuda,
        torch_compile=s.compile,
        gradient_checkpointing=s.gradient_checkpointing,
        ddp_find_unused_parameters=False,  # every objective uses every parameter (checked for clm, coles, both)
        logging_strategy="steps",
        logging_steps=s.logging_steps or max(1, max_steps // 50),
        logging_first_step=True,
        eval_strategy="steps" if data.n_eval else "no",
        eval_steps=s.eval_steps or max(1, max_steps // 5),
        save_strategy="steps",
        save_steps=s.save_steps or max(1, max_steps // 5),
        save_total_limit=2,
        seed=s.seed,
        dataloader_num_workers=0,  # stats below are counted in-process; parquet decoding is not the bottleneck
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )


def _collator(tok: TokenizerInfo, use_clm: bool, coles, seed: int, rank: int, cuda: bool):
    from batch.contrastive import ColesCollator
    from batch.sequence_data import CausalLMCollator

    pad_multiple = 8 if cuda else None
    if coles is not None:
        return ColesCollator(pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, settings=coles, clm=use_clm,
                             seed=seed, pad_to_multiple_of=pad_multiple, rank=rank)
    return CausalLMCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=pad_multiple)


def _metrics(s, tok, config, model, trainer, args, data: _Data, final_eval: dict, stats, train_seconds: float,
             context_length: int, source: str, lengths: dict, world: int) -> dict:
    """metrics.json: what was trained, how long, how well, on what."""
    import torch

    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    n_embedding = model.model.embed_tokens.weight.numel()
    # Real (non-pad) tokens trained in this session: batches skipped while resuming are not counted.
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    # The Trainer's own average divides by every step, resumed ones included; report the final tenth instead.
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    final_window = train_losses[-max(1, len(train_losses) // 10) :]
    return {
        "preset": s.preset,
        "architecture": config.architecture(),
        "overrides": dict(s.overrides),
        "objective": s.objective,
        "actionpiece_spr": s.actionpiece_spr,
        "actionpiece_compose": config.merged_tokens_parts is not None,
        "pooling": config.pooling,
        "parameters": n_params,
        "non_embedding_parameters": n_params - n_embedding,
        "vocab_size": tok.vocab_size,
        "context_length": context_length,
        "context_length_source": source,
        "windows": s.windows,
        "train_items": data.n_train,
        "median_sequence_tokens": lengths["median_tokens"],
        "users_truncated_fraction": lengths["users_truncated_fraction"],
        "tokens_cut_fraction": lengths["tokens_cut_fraction"],
        "train_sequences": data.n_train,
        "eval_sequences": data.n_eval,
        "steps": int(trainer.state.global_step),
        "max_steps": data.max_steps,
        "batch_size": s.batch_size,
        "processes": world,
        "per_device_batch_size": data.per_device,
        "grad_accum": s.grad_accum,
        "train_loss": sum(final_window) / len(final_window) if final_window else None,
        "eval_loss": final_eval.get("eval_loss"),
        **_final_parts(trainer.state.log_history, final_eval),
        "train_seconds": train_seconds,
        "train_tokens": int(tokens),
        "tokens_per_second": tokens / train_seconds if train_seconds else None,
        "padding_fraction": stats.padding_fraction,
        "truncated_sequences": stats.truncated,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "bf16": bool(args.bf16),
        "resumed": s.resume,
        "tokenizer_fingerprint": tok.fingerprint,
        "log_history": trainer.state.log_history,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
    }


def _write_model_dir(s: PretrainSettings, trainer, metrics: dict, state_dict: dict | None = None) -> None:
    """The model directory, built aside and swapped in (rerun-safe): weights, config, tokenizer, metrics, plot."""
    with atomic_dir(s.output) as tmp:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict)  # safetensors + config.json only
        # transformers writes the weights through a private temp file (mode 0600); containers running the workers
        # as another user must be able to read them, so apply the usual umask-derived mode.
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():
            file.chmod(0o666 & ~umask)
        copy_tokenizer_files(s.tokenizer, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        plot_loss_curve(trainer.state.log_history, tmp / "loss_curve.png", title=f"domaintok pretrain ({s.preset})")


def _all_reduce_stats(stats, state):
    """The data stream's counters summed over ranks."""
    import torch

    from batch.sequence_data import StreamStats

    names = ("sequences", "tokens", "padded_slots", "truncated")
    total = torch.tensor([getattr(stats, n) for n in names], dtype=torch.int64, device=state.device)
    torch.distributed.all_reduce(total)
    return StreamStats(**dict(zip(names, total.tolist())))


def _build_config(s: PretrainSettings, **kwargs):
    """The model config of a run: preset, tokenizer-given values and overrides; a one-line error when impossible."""
    from domaintok.models import DomainTransformerConfig

    try:
        return DomainTransformerConfig.from_preset(s.preset, **kwargs)
    except ValueError as exc:  # e.g. heads not dividing the width, an unknown preset
        raise DomaintokError(f"model size: {exc}") from None


def _final_parts(log_history: list[dict], final_eval: dict) -> dict:
    """The objective's parts at the end (clm_loss / coles_loss over the final tenth of logs, and on eval)."""
    out = {}
    for name in ("clm_loss", "coles_loss"):
        values = [e[name] for e in log_history if name in e]
        if values:
            window = values[-max(1, len(values) // 10) :]
            out[f"train_{name}"] = sum(window) / len(window)
        if f"eval_{name}" in final_eval:
            out[f"eval_{name}"] = final_eval[f"eval_{name}"]
    return out


def plot_loss_curve(log_history: list[dict], path: Path, title: str) -> None:
    """Train (and eval, when present) loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@click.command("pretrain")
@click.option("--sequences", type=click.Path(exists=True, path_type=Path), required=True,
              help="sequences.parquet from `domaintok tokenize` (user_id, input_ids, ...), or the directory of parquet "
                   "files `tokenize --engine spark` writes.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Fitted tokenizer directory (`domaintok fit`).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model directory to write (replaced if it exists).")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="tiny", show_default=True,
              help="Model size: tiny 2x32, small 2x64 (the README's evaluation size), 24m 24x256, 330m 24x1024.")
@click.option("--hidden-size", type=click.IntRange(min=1), default=None, help="Override the preset's width.")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Override the preset's number of blocks.")
@click.option("--heads", type=click.IntRange(min=1), default=None, help="Override the preset's attention heads.")
@click.option("--intermediate-size", type=click.IntRange(min=1), default=None, help="Override the preset's MLP width.")
@click.option("--objective", type=click.Choice(["clm", "coles", "clm+coles"]), default="clm", show_default=True,
              help="Causal LM, CoLES (contrastive: sub-sequences of a user are positives), or both summed.")
@click.option("--coles-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the CoLES loss in clm+coles.")
@click.option("--coles-temperature", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True)
@click.option("--pooling", type=click.Choice(["last", "mean"]), default=None,
              help="User embedding: the last token's state or the mean over tokens (default: last).")
@click.option("--context-length", type=click.IntRange(min=2), default=None,
              help="Tokens per sequence (default: the tokenizer's max_length); longer users keep their newest events.")
@click.option("--windows", type=click.Choice(["newest", "all"]), default="newest", show_default=True,
              help="newest: each user's newest window once per epoch; all: the whole history cut into context-sized "
                   "windows of whole events (tokenize with a --max-length covering it). clm only.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sequences per micro-batch over all processes (under torchrun / accelerate launch each process "
                   "takes its share).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate (default by preset: tiny 1e-3, 24m 6e-4, 330m 3e-4).")
@click.option("--eval-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="Share of users (by hash of user_id) held out for eval.")
@click.option("--save-steps", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Trainer checkpoints (default: <output>.checkpoints beside the model dir).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the checkpoint dir.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's, one per core). On a shared or busy machine 1 is often "
                   "much faster for the tiny and small presets (README: pretraining throughput).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (GPU).")
@click.option("--actionpiece-spr", type=click.FloatRange(0, 1), default=0.0, metavar="RATE",
              help="With an ActionPiece tokenizer: this share of the training windows get random segmentations of "
                   "their events (set permutation regularization) instead of the deterministic one; eval and later "
                   "jobs keep the deterministic ids. Default 0: off.")
@click.option("--actionpiece-compose", is_flag=True,
              help="With an ActionPiece tokenizer: each merged token enters the model as its own embedding plus the "
                   "mean of the embeddings of the original tokens it stands for (saved in config.json; fine-tuning, "
                   "embedding and serving use it too). Default: off.")
def command(sequences, tokenizer, output, preset, hidden_size, layers, heads, intermediate_size, objective,
            coles_weight, coles_temperature, pooling, context_length, windows, max_steps, epochs, batch_size, grad_accum, lr,
            eval_fraction, save_steps, checkpoint_dir, resume, seed, gradient_checkpointing, threads, compile_,
            actionpiece_spr, actionpiece_compose):
    """Pretrain the domain transformer (causal LM, CoLES, or both) on tokenized sequences.

    Writes OUTPUT/ with model.safetensors + config.json, the tokenizer files, metrics.json (train/eval loss,
    tokens/s, padding fraction, parameters) and loss_curve.png. bf16 on GPU; CPU works for the tiny preset.
    Runs distributed under `torchrun --nproc_per_node N $(which domaintok) pretrain ...` or `accelerate launch`.
    """
    settings = PretrainSettings(
        sequences=sequences, tokenizer=tokenizer, output=output, preset=preset, context_length=context_length,
        windows=windows, max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        eval_fraction=eval_fraction, save_steps=save_steps, checkpoint_dir=checkpoint_dir, resume=resume,
        seed=seed, gradient_checkpointing=gradient_checkpointing, compile=compile_,
        overrides=architecture_overrides(hidden_size, layers, heads, intermediate_size),
        objective=objective, coles_weight=coles_weight, coles_temperature=coles_temperature, pooling=pooling,
        threads=threads, actionpiece_spr=actionpiece_spr, actionpiece_compose=actionpiece_compose,
    )
    try:
        metrics = pretrain(settings)
    finally:
        leave_process_group()
    if not is_rank_zero():
        return
    eval_loss = metrics["eval_loss"]
    arch = metrics["architecture"]
    click.echo(
        f"pretrained {metrics['preset']} ({arch['num_hidden_layers']} x {arch['hidden_size']}, {metrics['objective']}, "
        f"context {metrics['context_length']:,}) {metrics['parameters']:,} parameters for {metrics['steps']} steps: "
        f"train loss {metrics['train_loss']:.4f}, eval loss "
        f"{'n/a' if eval_loss is None else f'{eval_loss:.4f}'}, {metrics['tokens_per_second']:,.0f} tokens/s, "
        f"padding {metrics['padding_fraction']:.1%} -> {output}"
    )


def architecture_overrides(hidden_size=None, layers=None, heads=None, intermediate_size=None) -> dict[str, int]:
    """The CLI's size options as config overrides (only those given)."""
    given = {"hidden_size": hidden_size, "num_hidden_layers": layers, "num_attention_heads": heads,
             "intermediate_size": intermediate_size}
    return {key: value for key, value in given.items() if value is not None}
