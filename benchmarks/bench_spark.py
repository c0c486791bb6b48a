"""Benchmark of the Spark engine (batch/spark.py) against the single-node jobs, in one run on the same input: tokenize
events/s (and the one-Python-call-per-user `groupBy(...).applyInArrow` layout it was chosen over), embed users/s
with the largest difference of the embeddings, and what fitting on a sample of users changes.

Run: .venv/bin/python benchmarks/bench_spark.py [--master local[2]] [--repeats 2] [--skip-grouped] [--skip-embed]
     [--fractions 0.1,0.25,0.5]
Input: both Online Retail files (../shared/data/online_retail), read as they are (two spellings).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.spark import (
    USER,
    embed_to_parquet,
    events_frame,
    fit_on_sample,
    spark_session,
    tokenize_to_parquet,
)
from domaintok.tokenizer import DomainTokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "online_retail"
FILES = [DATA / "online_retail_II_sheet2009-2010.parquet", DATA / "online_retail_I_2010-2011.parquet"]


def best(fn, repeats: int):
    """(fastest seconds, last result) of `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def sorted_table(path) -> pa.Table:
    return pq.read_table(path).sort_by("user_id")


def grouped_tokenize(spark, tok_dir: Path, files, max_length: int) -> pa.Table:
    """The layout not chosen: `groupBy(user).applyInArrow`, one tokenize call per user."""
    from pyspark.sql.pandas.types import from_arrow_schema

    from domaintok.offline import SEQUENCES_SCHEMA

    tok = DomainTokenizer.from_pretrained(tok_dir)
    frame, order = events_frame(spark, tok.schema, [str(f) for f in files])
    columns = [c.name for c in tok.schema.columns]
    tok_dir = str(tok_dir)

    def one_user(table: pa.Table) -> pa.Table:  # the type hints tell pyspark which kind of function this is
        table = table.sort_by([(c, "ascending") for c in order])  # a group's rows come in no particular order
        return _load(tok_dir).tokenize(table.select(columns), max_length)

    return frame.groupBy(USER).applyInArrow(one_user, from_arrow_schema(SEQUENCES_SCHEMA)).toArrow()


_TOKENIZERS: dict[str, DomainTokenizer] = {}  # per Python worker: loaded once, not once per user


def _load(tok_dir: str) -> DomainTokenizer:
    if tok_dir not in _TOKENIZERS:
        _TOKENIZERS[tok_dir] = DomainTokenizer.from_pretrained(tok_dir)
    return _TOKENIZERS[tok_dir]


def field_agreement(full: DomainTokenizer, other: DomainTokenizer, files) -> dict[str, float]:
    """Per field: the share of events whose tokens (as strings) are the same under both tokenizers (before the
    previous-event step, which does not depend on fitting)."""
    from domaintok.event_sql import KEEP, connect, create_events_view

    con = connect(full.schema)
    view = create_events_view(con, full.schema, [str(f) for f in files])
    table = con.sql(f"SELECT * FROM {view} WHERE {KEEP}").to_arrow_table()
    con.close()
    names = [np.array(t.token_names(), dtype=object) for t in (full, other)]
    out = {}
    for i, (a, b) in enumerate(zip(full.encoders, other.encoders)):
        (ca, ia), (cb, ib) = a.encode(table[f"__f{i}"]), b.encode(table[f"__f{i}"])
        same = ca == cb
        if ia.size and same.any():
            # compare token strings event by event where the counts agree
            ea, eb = np.repeat(np.arange(len(ca)), ca), np.repeat(np.arange(len(cb)), cb)
            wrong_a = np.zeros(len(ca), bool)
            keep_a = same[ea]
            keep_b = same[eb]
            mismatch = names[0][ia[keep_a]] != names[1][ib[keep_b]]
            np.logical_or.at(wrong_a, ea[keep_a][mismatch], True)
            same &= ~wrong_a
        out[a.spec.name] = float(same.mean())
    return out


def tiny_model(tok: DomainTokenizer, out: Path, context: int) -> Path:
    import torch

    from domaintok.models.configuration_domain_transformer import DomainTransformerConfig
    from domaintok.models.modeling_domain_transformer import DomainTransformerForCausalLM

    torch.manual_seed(0)
    config = DomainTransformerConfig.from_preset(
        "tiny", tok.vocab_size, max_position_embeddings=context, dropout=0.0, sep_token_id=tok.sep_token_id,
        bos_token_id=tok.bos_token_id, tokenizer_fingerprint=tok.fingerprint,
    )
    DomainTransformerForCausalLM(config).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--skip-grouped", action="store_true", help="skip the applyInArrow layout (slow)")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--fractions", default="0.1,0.25,0.5", help="sample fractions of users to fit on ('' = none)")
    args = parser.parse_args()
    cores = int(args.master[len("local["):-1]) if args.master.startswith("local[") and args.master[6:-1].isdigit() else None
    work = Path(tempfile.mkdtemp(prefix="bench-spark-"))
    report: dict = {"input": [str(f) for f in FILES], "master": args.master, "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg()}
    try:
        started = time.perf_counter()
        full = DomainTokenizer.fit("online_retail", FILES)
        report["fit_seconds"] = time.perf_counter() - started
        tok_dir = full.save_pretrained(work / "tok")

        # ---- tokenize: single node, then Spark (a warm-up run starts the Python workers)
        single_s, stats = best(lambda: full.tokenize_to_parquet(FILES, work / "seq.parquet", args.max_length), args.repeats)
        events = stats["events"]
        started = time.perf_counter()
        spark = spark_session(args.master, app_name="bench-spark", config={"spark.ui.showConsoleProgress": "false"})
        spark.sparkContext.setLogLevel("ERROR")
        session_s = time.perf_counter() - started
        run = functools.partial(tokenize_to_parquet, spark, tok_dir, [str(f) for f in FILES], str(work / "seq_spark"),
                                args.max_length)
        started = time.perf_counter()
        run()
        first_s = time.perf_counter() - started
        spark_s, spark_stats = best(run, args.repeats)
        equal = sorted_table(work / "seq_spark").cast(pq.read_schema(work / "seq.parquet")).equals(
            sorted_table(work / "seq.parquet"))
        report["tokenize"] = {
            "events": events, "users": stats["users"], "max_length": args.max_length,
            "single_node_seconds": single_s, "single_node_events_per_s": events / single_s,
            "spark_session_start_seconds": session_s, "spark_first_run_seconds": first_s,
            "spark_seconds": spark_s, "spark_events_per_s": events / spark_s,
            "spark_events_per_s_per_core": events / spark_s / cores if cores else None,
            "spark_partitions": spark_stats["partitions"], "identical_rows": bool(equal),
        }
        print(json.dumps({"tokenize": report["tokenize"]}, indent=2), flush=True)

        if not args.skip_grouped:
            grouped_s, table = best(lambda: grouped_tokenize(spark, tok_dir, FILES, args.max_length), 1)
            report["tokenize_grouped_applyInArrow"] = {
                "seconds": grouped_s, "events_per_s": events / grouped_s,
                "identical_rows": bool(table.sort_by("user_id").cast(pq.read_schema(work / "seq.parquet")).equals(
                    sorted_table(work / "seq.parquet"))),
            }
            print(json.dumps({"grouped": report["tokenize_grouped_applyInArrow"]}, indent=2), flush=True)

        if not args.skip_embed:
            from batch.embed import embed_parquet

            model = tiny_model(full, work / "model", context=args.max_length)
            single_s, local = best(lambda: embed_parquet(model, work / "seq.parquet", work / "emb.parquet",
                                                         device="cpu", progress=False), args.repeats)
            run = functools.partial(embed_to_parquet, spark, model, str(work / "seq_spark"), str(work / "emb_spark"))
            run()
            spark_s, _ = best(run, args.repeats)
            a, b = sorted_table(work / "emb.parquet"), sorted_table(work / "emb_spark")
            diff = float(np.abs(np.array(a["embedding"].to_pylist()) - np.array(b["embedding"].to_pylist())).max())
            report["embed"] = {
                "model": "tiny (hidden 32, 2 layers), random weights", "users": local["users"],
                "single_node_users_per_s": local["users"] / single_s, "spark_users_per_s": local["users"] / spark_s,
                "max_abs_diff": diff,
            }
            print(json.dumps({"embed": report["embed"]}, indent=2), flush=True)

        fractions = [float(f) for f in args.fractions.split(",") if f]
        report["fit_on_sample"] = {}
        full_tpe = stats["tokens_per_event"]
        for fraction in fractions:
            started = time.perf_counter()
            sample = fit_on_sample(spark, "online_retail", [str(f) for f in FILES], fraction, seed=0)
            fit_s = time.perf_counter() - started
            sample_stats = sample.tokenize_to_parquet(FILES, work / "seq_sample.parquet", args.max_length)
            report["fit_on_sample"][str(fraction)] = {
                "seconds (collect + fit)": fit_s,
                "vocab_size": sample.vocab_size, "full_vocab_size": full.vocab_size,
                "tokens_per_event": sample_stats["tokens_per_event"], "full_tokens_per_event": full_tpe,
                "events_with_the_same_tokens_per_field": field_agreement(full, sample, FILES),
            }
            print(json.dumps({f"fit_on_sample {fraction}": report["fit_on_sample"][str(fraction)]}, indent=2), flush=True)
        spark.stop()
        report["load_average_after"] = os.getloadavg()
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
