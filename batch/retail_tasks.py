"""Online Retail benchmark tasks: events before a cutoff are the inputs, what happens in the next days the labels.

Builds, with DuckDB over both UCI files, the pre-cutoff event table, a user-hash train/valid/test split, the labels
of two tasks (binary: purchases again within the horizon; regression: log1p of net spend within it) and RFM-style
features at the cutoff, shared by LightGBM and the fusion model.
"""

from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from batch.finetune import user_split
from domaintok.errors import DomaintokError

FILE_2009 = "online_retail_II_sheet2009-2010.parquet"
FILE_2010 = "online_retail_I_2010-2011.parquet"
# Rows of the 2009-2010 file from this day on are repeated in the 2010-2011 file.
OVERLAP_START = dt.datetime(2010, 12, 1)
DEFAULT_CUTOFF = dt.datetime(2011, 9, 1)
DEFAULT_HORIZON_DAYS = 90
SPLITS = ("train", "valid", "test")
# A salt so the task split is independent of the pretraining job's own crc32 eval split.
SPLIT_SALT = "domaintok-retail-split:"

# The raw columns the online_retail schema reads (its canonical spellings), in this order.
EVENT_COLUMNS = ("Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "CustomerID", "Country")
NUMERIC_FEATURES = (
    "recency_days", "tenure_days", "frequency", "monetary", "net_amount", "avg_basket", "n_lines",
    "distinct_products", "cancel_ratio", "active_months", "invoices_30d", "invoices_90d", "invoices_180d",
    "invoices_365d", "spend_90d", "spend_365d", "mean_days_between_invoices",
)
CATEGORICAL_FEATURES = ("country",)


def data_paths(data_dir: str | Path) -> tuple[Path, Path]:
    """The two Online Retail parquet files under `data_dir` (e.g. ../shared/data/online_retail)."""
    root = Path(data_dir)
    paths = root / FILE_2009, root / FILE_2010
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DomaintokError(f"Online Retail data not found: {', '.join(missing)}")
    return paths


def create_events_view(con: duckdb.DuckDBPyConnection, data_dir: str | Path) -> None:
    """Create the temp table `retail_events`: both files in the schema's column spellings, the overlap dropped,
    only rows with a customer id, plus user_id (VARCHAR like '17850') and amount = Quantity * Price."""
    older, newer = data_paths(data_dir)
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE retail_raw AS
        SELECT CAST("Invoice" AS VARCHAR) AS "Invoice", CAST("StockCode" AS VARCHAR) AS "StockCode",
               CAST("Description" AS VARCHAR) AS "Description", CAST("Quantity" AS BIGINT) AS "Quantity",
               CAST("InvoiceDate" AS TIMESTAMP) AS "InvoiceDate", CAST("Price" AS DOUBLE) AS "Price",
               CAST("Customer ID" AS BIGINT) AS "CustomerID", CAST("Country" AS VARCHAR) AS "Country"
        FROM read_parquet($older)
        WHERE CAST("InvoiceDate" AS TIMESTAMP) < $overlap
        UNION ALL
        SELECT CAST("InvoiceNo" AS VARCHAR), CAST("StockCode" AS VARCHAR), CAST("Description" AS VARCHAR),
               CAST("Quantity" AS BIGINT), CAST("InvoiceDate" AS TIMESTAMP), CAST("UnitPrice" AS DOUBLE),
               CAST("CustomerID" AS BIGINT), CAST("Country" AS VARCHAR)
        FROM read_parquet($newer)
        """,
        {"older": str(older), "newer": str(newer), "overlap": OVERLAP_START},
    )
    con.execute(
        """
        CREATE OR REPLACE TEMP VIEW retail_events AS
        SELECT *, CAST("CustomerID" AS VARCHAR) AS user_id, "Quantity" * "Price" AS amount,
               starts_with("Invoice", 'C') AS is_cancel
        FROM retail_raw WHERE "CustomerID" IS NOT NULL
        """
    )


@dataclass
class RetailTasks:
    """Everything one evaluation needs, all computed as of `cutoff`.

    events: pre-cutoff line items of the task's users (raw schema columns; the tokenizer and text baseline read it).
    labels: user_id, split, label (int 0/1: a non-cancelled invoice in (cutoff, cutoff + horizon]),
        spend (float: log1p of max(0, net amount in the horizon)), label_ts (the cutoff).
    features: user_id + NUMERIC_FEATURES + CATEGORICAL_FEATURES, from pre-cutoff events only.
    """

    cutoff: dt.datetime
    horizon_days: int
    events: pa.Table
    labels: pa.Table
    features: pa.Table

    def users_in(self, *splits: str) -> set[str]:
        users = self.labels.column("user_id").to_pylist()
        split = self.labels.column("split").to_pylist()
        return {u for u, s in zip(users, split) if s in splits}

    def events_of(self, users: set[str]) -> pa.Table:
        """The pre-cutoff events of `users` (e.g. train + valid only, for fitting the tokenizer and pretraining)."""
        ids = self.events.column("CustomerID").to_numpy(zero_copy_only=False)
        keep = np.fromiter((str(i) in users for i in ids), dtype=bool, count=len(ids))
        return self.events.filter(pa.array(keep))

    def summary(self) -> dict:
        split = np.asarray(self.labels.column("split").to_pylist())
        label = self.labels.column("label").to_numpy()
        return {
            "cutoff": self.cutoff.isoformat(),
            "horizon_days": self.horizon_days,
            "events": self.events.num_rows,
            "users": self.labels.num_rows,
            **{f"users_{s}": int((split == s).sum()) for s in SPLITS},
            **{f"positive_rate_{s}": float(label[split == s].mean()) if (split == s).any() else None for s in SPLITS},
        }


def build_retail_tasks(
    data_dir: str | Path,
    cutoff: dt.datetime = DEFAULT_CUTOFF,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
    max_users: int | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> RetailTasks:
    """Build events, labels and features for every customer with at least one line item before `cutoff`.

    `max_users` keeps a deterministic subset (smallest split hashes first, across all splits) for quick runs.
    """
    con = con or duckdb.connect()
    create_events_view(con, data_dir)
    horizon_end = cutoff + dt.timedelta(days=horizon_days)
    params = {"cutoff": cutoff, "horizon_end": horizon_end}
    users = con.execute(
        "SELECT DISTINCT user_id FROM retail_events WHERE \"InvoiceDate\" < $cutoff ORDER BY user_id",
        {"cutoff": cutoff},
    ).fetchall()
    users = [u for (u,) in users]
    if not users:
        raise DomaintokError(f"no customer has events before the cutoff {cutoff:%Y-%m-%d}")
    if max_users is not None and len(users) > max_users:
        users = sorted(users, key=lambda u: zlib.crc32(u.encode()))[:max_users]
    con.register("task_users", pa.table({
        "user_id": pa.array(users, pa.string()),
        "split": pa.array([user_split(u, valid_fraction, test_fraction, salt=SPLIT_SALT) for u in users], pa.string()),
    }))

    events = con.sql(
        f"""
        SELECT {", ".join(f'e."{c}"' for c in EVENT_COLUMNS)}
        FROM retail_events e JOIN task_users USING (user_id)
        WHERE e."InvoiceDate" < $cutoff
        ORDER BY e.user_id, e."InvoiceDate"
        """,
        params={"cutoff": cutoff},
    ).to_arrow_table()

    labels = con.sql(
        """
        SELECT u.user_id, u.split,
               CAST(coalesce(bool_or(NOT e.is_cancel), false) AS INTEGER) AS label,
               ln(1 + greatest(coalesce(sum(e.amount), 0), 0)) AS spend,
               CAST($cutoff AS TIMESTAMP) AS label_ts
        FROM task_users u
        LEFT JOIN retail_events e
          ON e.user_id = u.user_id AND e."InvoiceDate" >= $cutoff AND e."InvoiceDate" < $horizon_end
        GROUP BY u.user_id, u.split
        ORDER BY u.user_id
        """,
        params=params,
    ).to_arrow_table()

    features = con.sql(
        """
        WITH past AS (
            SELECT e.*, date_diff('day', e."InvoiceDate", CAST($cutoff AS TIMESTAMP)) AS age_days
            FROM retail_events e JOIN task_users USING (user_id) WHERE e."InvoiceDate" < $cutoff
        ), per_user AS (
            SELECT user_id,
                   min(age_days) FILTER (WHERE NOT is_cancel) AS recency_days,
                   max(age_days) AS tenure_days,
                   count(DISTINCT "Invoice") FILTER (WHERE NOT is_cancel) AS frequency,
                   coalesce(sum(amount) FILTER (WHERE NOT is_cancel), 0) AS monetary,
                   sum(amount) AS net_amount,
                   count(*) AS n_lines,
                   count(DISTINCT "StockCode") AS distinct_products,
                   avg(CAST(is_cancel AS DOUBLE)) AS cancel_ratio,
                   count(DISTINCT date_trunc('month', "InvoiceDate")) AS active_months,
                   count(DISTINCT "Invoice") FILTER (WHERE NOT is_cancel AND age_days < 30) AS invoices_30d,
                   count(DISTINCT "Invoice") FILTER (WHERE NOT is_cancel AND age_days < 90) AS invoices_90d,
                   count(DISTINCT "Invoice") FILTER (WHERE NOT is_cancel AND age_days < 180) AS invoices_180d,
                   count(DISTINCT "Invoice") FILTER (WHERE NOT is_cancel AND age_days < 365) AS invoices_365d,
                   coalesce(sum(amount) FILTER (WHERE age_days < 90), 0) AS spend_90d,
                   coalesce(sum(amount) FILTER (WHERE age_days < 365), 0) AS spend_365d,
                   mode("Country") AS country
            FROM past GROUP BY user_id
        )
        SELECT user_id,
               CAST(recency_days AS DOUBLE) AS recency_days, CAST(tenure_days AS DOUBLE) AS tenure_days,
               CAST(frequency AS DOUBLE) AS frequency, monetary, net_amount,
               monetary / greatest(frequency, 1) AS avg_basket,
               CAST(n_lines AS DOUBLE) AS n_lines, CAST(distinct_products AS DOUBLE) AS distinct_products,
               cancel_ratio, CAST(active_months AS DOUBLE) AS active_months,
               CAST(invoices_30d AS DOUBLE) AS invoices_30d, CAST(invoices_90d AS DOUBLE) AS invoices_90d,
               CAST(invoices_180d AS DOUBLE) AS invoices_180d, CAST(invoices_365d AS DOUBLE) AS invoices_365d,
               spend_90d, spend_365d,
               CAST(tenure_days AS DOUBLE) / greatest(frequency, 1) AS mean_days_between_invoices,
               country
        FROM per_user ORDER BY user_id
        """,
        params={"cutoff": cutoff},
    ).to_arrow_table()
    return RetailTasks(cutoff=cutoff, horizon_days=horizon_days, events=events, labels=labels, features=features)


__all__ = [
    "RetailTasks",
    "build_retail_tasks",
    "create_events_view",
    "data_paths",
    "NUMERIC_FEATURES",
    "CATEGORICAL_FEATURES",
    "EVENT_COLUMNS",
    "DEFAULT_CUTOFF",
    "DEFAULT_HORIZON_DAYS",
]
