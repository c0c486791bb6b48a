"""The Online Retail evaluation in one command: domain tokens vs text serialization + BPE vs LightGBM.

`python benchmarks/eval_retail.py` runs the full CPU preset (every customer, both tasks; about 6 minutes on 2 cores)
and prints results.md; `--quick` runs the tiny smoke version. Same code path as `domaintok evaluate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from batch.evaluate import DEFAULT_DATA_DIR, EVAL_PRESETS, TASK_NAMES, EvaluateSettings, run_evaluation
from domaintok.errors import DomaintokError


@click.command()
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR,
              show_default=True, help="Directory holding both Online Retail parquet files.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval_retail"),
              show_default=True)
@click.option("--preset", type=click.Choice(sorted(EVAL_PRESETS)), default="small", show_default=True)
@click.option("--task", "tasks", type=click.Choice(TASK_NAMES), multiple=True, default=TASK_NAMES,
              show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Pretraining steps (overrides the preset).")
@click.option("--quick", is_flag=True, help="The tiny preset on 400 customers (under 3 minutes).")
@click.option("--seed", type=int, default=0, show_default=True)
def main(data_dir, output, preset, tasks, max_steps, quick, seed):
    """Run the whole Online Retail comparison and print results.md."""
    settings = EvaluateSettings(
        data_dir=data_dir, output=output, preset="tiny" if quick else preset, max_steps=max_steps,
        tasks=tuple(tasks), seed=seed, bootstrap=200 if quick else 1000, progress=not quick,
        log=lambda m: click.echo(m, err=True),
    )
    try:
        run_evaluation(settings)
    except DomaintokError as exc:
        click.echo(f"eval_retail: error: {exc}", err=True)
        sys.exit(2)
    click.echo((Path(output) / "results.md").read_text())


if __name__ == "__main__":
    main()
