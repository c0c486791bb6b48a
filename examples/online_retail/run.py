"""Run `domaintok evaluate` on UCI Online Retail + Online Retail II with examples/online_retail/tasks.yaml.

The two files overlap on 2010-12-01..2010-12-09; this script writes the 2009-2010 file's rows before 2010-12-01 to
OUTPUT/inputs/ and passes both files to the evaluation, so every line item counts once. Extra arguments go to
`domaintok evaluate` unchanged, e.g. `python examples/online_retail/run.py --preset small --folds 5`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import duckdb

from domaintok.cli import main as domaintok_main

HERE = Path(__file__).resolve().parent
OLDER = "online_retail_II_sheet2009-2010.parquet"
NEWER = "online_retail_I_2010-2011.parquet"
OVERLAP_START = "2010-12-01"


def older_before_overlap(data_dir: Path, output: Path) -> Path:
    """The 2009-2010 file without the days the 2010-2011 file repeats (its dates are 'YYYY-MM-DD HH:MM:SS' text)."""
    target = output / "inputs" / "online_retail_II_2009-2010_before_overlap.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.sql(
        "SELECT * FROM read_parquet($p) WHERE CAST(InvoiceDate AS TIMESTAMP) < CAST($start AS TIMESTAMP)",
        params={"p": str(data_dir / OLDER), "start": OVERLAP_START},
    ).write_parquet(str(target))
    return target


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=HERE.parents[1].parent / "shared" / "data" / "online_retail", show_default=True)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval_retail"),
              show_default=True)
@click.pass_context
def run(ctx, data_dir: Path, output: Path) -> None:
    """Evaluate on Online Retail (purchase and spend in the 90 days after 2011-09-01)."""
    for name in (OLDER, NEWER):
        if not (data_dir / name).is_file():
            raise click.ClickException(f"{data_dir / name}: no such file (give --data-dir)")
    older = older_before_overlap(data_dir, output)
    sys.exit(domaintok_main([
        "evaluate", "--schema", "online_retail", "--events", str(older), "--events", str(data_dir / NEWER),
        "--tasks", str(HERE / "tasks.yaml"), "--output", str(output), *ctx.args,
    ]))


if __name__ == "__main__":
    run()
