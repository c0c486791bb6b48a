"""Fine-tuning checkpoints: a run killed with SIGKILL in either stage of staged fusion and continued with --resume
ends exactly where the uninterrupted run ends (same evaluations, same selected step, same predictions); the
checkpoint directory is refused or removed as documented."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.finetune import finetune
from batch.finetune_trainer import RUN_STATE
from domaintok.cli import main
from domaintok.errors import ArtifactError

from .test_finetune_options import _settings, tiny  # noqa: F401  (the module fixture)

# Long enough to be killed mid-stage: 30 evaluations (and checkpoints) a stage, head dropout on (RNG restored).
LONG = dict(epochs=30, stage1_epochs=30, patience=100, stage1_patience=100, dropout=0.1)


def _cli_args(root: Path, out: Path) -> list[str]:
    args = ["finetune", "--model", str(root / "model"), "--sequences", str(root / "seq.parquet"), "--labels",
            str(root / "labels.parquet"), "--features", str(root / "features.parquet"), "--output", str(out),
            "--batch-size", "16"]
    return args + [f"--{k.replace('_', '-')}={v}" for k, v in LONG.items()]


def _complete_checkpoints(checkpoints: Path, stage: str) -> list[Path]:
    return [p for p in checkpoints.glob(f"stage-*-{stage}/checkpoint-*") if (p / RUN_STATE).is_file()]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("reference") / "ft"
    return finetune(_settings(tiny, out, **LONG)), out


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("stage", ["fusion", "tabular"])
def test_killed_run_resumes_to_the_uninterrupted_result(tiny, reference, tmp_path, stage):  # noqa: F811
    expected, expected_dir = reference
    out = tmp_path / "ft"
    checkpoints = out.with_name("ft.checkpoints")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "domaintok.cli", *_cli_args(tiny, out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _complete_checkpoints(checkpoints, stage):
        assert process.poll() is None, f"finetune ended before a {stage} checkpoint: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()  # killed before writing its output
    # the newest complete checkpoint (a kill during the removal of the older one can leave both)
    latest = max((p for p in checkpoints.glob("stage-*/checkpoint-*") if (p / RUN_STATE).is_file()),
                 key=lambda p: (p.parent.name, int(p.name.split("-")[1])))
    saved = json.loads((latest / RUN_STATE).read_text())
    assert not saved["stage_done"] and saved["stages"][-1] == stage  # killed in the middle of that stage

    with pytest.raises(ArtifactError, match="checkpoints exist; pass --resume"):
        finetune(_settings(tiny, out, **LONG))
    with pytest.raises(ArtifactError, match="other options than the run it continues: head_lr 0.001 -> 0.002"):
        finetune(_settings(tiny, out, **{**LONG, "head_lr": 2e-3}, resume=True))
    assert main([*_cli_args(tiny, out), "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())

    assert resumed["resumed"] and resumed["stages"] == expected["stages"] == ["fusion", "tabular"]
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in expected["history"]]
    for a, b in zip(resumed["history"], expected["history"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    assert (resumed["best_step"], resumed["best_stage"], resumed["steps"]) == (
        expected["best_step"], expected["best_stage"], expected["steps"])
    assert resumed["test"]["auc"] == pytest.approx(expected["test"]["auc"], abs=1e-6)
    assert pq.read_table(out / "predictions.parquet").column("prediction").to_pylist() == pytest.approx(
        pq.read_table(expected_dir / "predictions.parquet").column("prediction").to_pylist(), abs=1e-6)
    assert not checkpoints.exists()  # removed once the output is written


@pytest.mark.slow
def test_checkpoints_kept_on_request_and_resume_needs_them(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "ft"
    with pytest.raises(ArtifactError, match="no checkpoint to resume from"):
        finetune(_settings(tiny, out, resume=True))
    finetune(_settings(tiny, out, keep_checkpoints=True))
    kept = list(out.with_name("ft.checkpoints").glob("stage-*/checkpoint-*"))
    assert len(kept) == 1 and json.loads((kept[0] / RUN_STATE).read_text())["stage_done"]  # the newest only
    with pytest.raises(ArtifactError, match="checkpoints exist"):
        finetune(_settings(tiny, tmp_path / "ft"))
    custom = tmp_path / "elsewhere"
    m = finetune(_settings(tiny, tmp_path / "ft2", checkpoint_dir=custom))
    assert m["steps"] > 0 and not custom.exists()


def test_every_option_is_classified_for_resume():
    """A new FinetuneSettings option must say whether a resumed run may change it."""
    from dataclasses import fields

    from batch.finetune import FinetuneSettings
    from batch.finetune_trainer import RESUME_MUST_MATCH

    may_change = {"output", "checkpoint_dir", "resume", "keep_checkpoints", "progress", "device"}
    assert set(RESUME_MUST_MATCH) | may_change == {f.name for f in fields(FinetuneSettings)}
    assert not set(RESUME_MUST_MATCH) & may_change
