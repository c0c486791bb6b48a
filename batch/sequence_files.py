"""A `domaintok tokenize` output read as one table: a single parquet file, or a directory of them (`--engine spark`
writes one file per task). Training, fine-tuning and `embed` read either the same way; no torch here."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from domaintok.errors import DomaintokError
from domaintok.event_sql import inputs

REQUIRED_COLUMNS = ("user_id", "input_ids")


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet files of a `tokenize` output: the file itself, or a directory's `*.parquet` files in name order
    (what `--engine spark` writes, one per task, beside `_SUCCESS` and `.crc` files), by the rule every input of
    domaintok is read with (`domaintok.event_sql.inputs`)."""
    return [Path(p) for p in inputs(path)]


class SequenceFiles:
    """One table over a `tokenize` output, a single parquet file or a directory of them: its row groups numbered
    across the files in name order, so shards, bucketing and counts treat a Spark output like one file."""

    def __init__(self, path: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS):
        self.path = Path(path)
        self.files = []
        for file in parquet_files(path):
            try:
                parquet = pq.ParquetFile(file)
            except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for non-parquet
                raise DomaintokError(f"{file}: cannot read as parquet ({' '.join(str(exc).split())})") from None
            missing = [c for c in required if c not in parquet.schema_arrow.names]
            if missing:
                raise DomaintokError(
                    f"{file}: missing column(s) {', '.join(missing)} (expected a `domaintok tokenize` output)")
            self.files.append(parquet)
        # (file, row group in the file, rows) of every row group, in order
        self._groups = [(f, g, parquet.metadata.row_group(g).num_rows)
                        for f, parquet in enumerate(self.files) for g in range(parquet.num_row_groups)]

    @property
    def schema_arrow(self):
        return self.files[0].schema_arrow

    @property
    def num_rows(self) -> int:
        return sum(rows for _, _, rows in self._groups)

    @property
    def num_row_groups(self) -> int:
        return len(self._groups)

    def row_group_rows(self, group: int) -> int:
        return self._groups[group][2]

    def iter_batches(self, batch_size: int = 65_536, row_groups: list[int] | None = None,
                     columns: list[str] | None = None):
        """Record batches of the given row groups (numbered across files), or of every file in order."""
        if row_groups is None:
            for parquet in self.files:
                yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
            return
        for group in row_groups:
            f, g, _ = self._groups[group]
            yield from self.files[f].iter_batches(batch_size=batch_size, row_groups=[g], columns=columns)


__all__ = ["REQUIRED_COLUMNS", "SequenceFiles", "parquet_files"]
