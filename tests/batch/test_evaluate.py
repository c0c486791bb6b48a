"""`domaintok evaluate`: every task kind end to end on toy data with the leakage rules checked on the files the run
writes, the method table's option checks, the scores and bootstrap, the schema-derived text baseline, and
`evaluate --preset quick` on a slice of the real Online Retail data."""

from __future__ import annotations

import datetime as dt
import collections
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute in the folds test
import pyarrow.parquet as pq
import pytest

from batch import evaluate as ev
from batch.eval_report import bootstrap_relative, fast_auc, kind_metrics, macro_auc
from batch.tasks import SplitSpec, assign_split, build_labels, build_population, open_events, register_split, tasks_from_dict
from batch.text_baseline import serialize_events, text_sequences, train_text_tokenizer
from domaintok.cli import main
from domaintok.errors import DomaintokError
from tests.batch.test_tasks import CUTOFF, TOY_SCHEMA

# --- toy data: 160 users, a pattern LightGBM can learn, two marker categories that must never be fitted ----------


def toy_study(tmp_path):
    """(schema path, events path, tasks path, users, split): categories LEAKTEST appear only in test users' events
    and LEAKPOST only after the cutoff, so a fitted vocabulary holding either one leaked."""
    rng = np.random.default_rng(0)
    users = [f"c{i:03d}" for i in range(160)]
    split = assign_split(users, SplitSpec())
    rows = {"customer": [], "ts": [], "amount": [], "qty": [], "cat": []}

    def add(user, ts, amount, qty, cat):
        for key, value in zip(rows, (user, ts, amount, qty, cat)):
            rows[key].append(value)

    for i, (user, s) in enumerate(zip(users, split)):
        active = i % 2 == 0
        for _ in range(int(rng.integers(3, 12))):
            age = float(rng.uniform(0, 60 if active else 300))
            add(user, CUTOFF - dt.timedelta(days=age), float(rng.normal(20, 5)), int(rng.integers(1, 4)),
                ["a", "b", "c"][int(rng.integers(0, 3))])
        if s == "test":
            add(user, CUTOFF - dt.timedelta(days=5), 1.0, 1, "LEAKTEST")
        if active or rng.random() < 0.2:
            add(user, CUTOFF + dt.timedelta(days=float(rng.uniform(0, 25))), float(rng.normal(30, 5)), 1, "LEAKPOST")
    events = pa.table({**rows, "ts": pa.array(rows["ts"], pa.timestamp("us"))})
    pq.write_table(events, tmp_path / "events.parquet")
    segments = ["gold", "silver", "bronze"]
    pq.write_table(pa.table({"user_id": users, "segment": [segments[i % 3] for i in range(160)]}),
                   tmp_path / "segments.parquet")
    import yaml

    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(TOY_SCHEMA))
    (tmp_path / "tasks.yaml").write_text(
        "cutoff: 2024-03-01\n"
        "split: {train: 0.7, valid: 0.15, test: 0.15, seed: 0}\n"
        "tasks:\n"
        "  - {name: buys, kind: binary, label: {from: events, horizon_days: 30}}\n"
        "  - {name: spend, kind: regression, label: {from: events, horizon_days: 30, aggregate: sum, "
        "expression: amount * qty, transform: log1p}}\n"
        "  - {name: segment, kind: multiclass, label: {from: file, path: segments.parquet, column: segment}}\n"
    )
    return tmp_path / "schema.yaml", tmp_path / "events.parquet", tmp_path / "tasks.yaml", users, split


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One quick evaluation over the toy study: every method of the table, three task kinds (about 50 s on 2
    cores)."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy_eval")
    schema, events, tasks, users, split = toy_study(root)
    settings = ev.EvaluateSettings(schema=schema, events=(events,), tasks=tasks, output=root / "out",
                                   preset="quick", methods=("all",), max_steps=4, bootstrap=50, progress=False,
                                   pretrain_windows="all", log=lambda m: None)
    report = ev.run_evaluation(settings)
    return root / "out", report, users, split


@pytest.mark.slow
def test_every_method_and_task_kind_reports_finite_metrics(toy_run):
    out, report, _, _ = toy_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"].keys() == {"buys", "spend", "segment"}
    headline = {"buys": "auc", "spend": "rmse", "segment": "macro_auc"}
    for task, metric in headline.items():
        rows = on_disk["results"][task]
        assert list(rows) == list(ev.METHODS), task  # every row of the table (--methods all), in table order
        for method, row in rows.items():
            assert math.isfinite(row["test"][metric]), (task, method)
            assert row["test"]["n"] == report["fold_sizes"][0]["test"], (task, method)
            assert math.isfinite(row["vs_lightgbm"]["relative"])
            assert math.isfinite(row["valid"]), (task, method)  # the selection metric, on valid users
            if method != "lightgbm":
                ci = row["vs_lightgbm"]
                assert ci["low"] <= ci["high"], (task, method)
        assert rows["lightgbm"]["vs_lightgbm"]["relative"] == 0.0
    assert 0 <= on_disk["results"]["segment"]["domain"]["test"]["accuracy"] <= 1
    assert (out / "results.png").stat().st_size > 0
    # the as-of token and extra cutoffs are off unless asked for
    assert on_disk["settings"]["as_of_token"] is False and on_disk["settings"]["extra_cutoffs"] == 0
    markdown = (out / "results.md").read_text()
    assert "| lightgbm: LightGBM on the aggregates |" in markdown and "## segment (multiclass" in markdown
    # Both transformers have the same non-embedding size and the same pretraining budget.
    pre = on_disk["pretrain"]
    assert pre["domain"]["non_embedding_parameters"] == pre["text"]["non_embedding_parameters"]
    assert pre["domain"]["steps"] == pre["text"]["steps"] == pre["domain_coles"]["steps"] == 4
    # every window of the fit users' history for the CLM models; CoLES reads the newest window only
    models = out / "work" / "fold0" / "models"
    assert json.loads((models / "domain" / "metrics.json").read_text())["windows"] == "all"
    assert json.loads((models / "text" / "metrics.json").read_text())["windows"] == "all"
    assert json.loads((models / "domain_coles" / "metrics.json").read_text())["windows"] == "newest"


@pytest.mark.slow
def test_no_post_cutoff_event_or_test_user_reaches_fitting_or_pretraining(toy_run):
    out, _, users, split = toy_run
    work = out / "work"
    fit_users = {u for u, s in zip(users, split) if s != "test"}
    cutoff = np.datetime64(CUTOFF)

    def times(path):
        return pq.read_table(path).column("ts").cast(pa.timestamp("us")).to_numpy()

    # Inputs of every user (tokenized for fine-tuning and embeddings) stop before the cutoff.
    assert times(work / "events_inputs.parquet").max() < cutoff
    # Tokenizer fitting reads events_fit: pre-cutoff events of train+valid users only.
    fit = pq.read_table(work / "fold0" / "events_fit.parquet")
    assert set(fit.column("user").to_pylist()) == fit_users
    assert times(work / "fold0" / "events_fit.parquet").max() < cutoff
    # Pretraining sequences: train+valid users only, their whole pre-cutoff history (windows "all").
    fit_events = collections.Counter(fit.column("user").to_pylist())
    history = pq.read_table(work / "fold0" / "domain_pretrain.parquet")
    assert dict(zip(history.column("user_id").to_pylist(), history.column("n_events").to_pylist())) == fit_events
    for kind in ("domain", "text"):
        pretrain_users = set(pq.read_table(work / "fold0" / f"{kind}_pretrain.parquet").column("user_id").to_pylist())
        assert pretrain_users == fit_users, kind
        all_users = set(pq.read_table(work / "fold0" / f"{kind}_sequences.parquet").column("user_id").to_pylist())
        assert all_users == set(users), kind
    # The fitted vocabularies never saw a test user's or a post-cutoff category.
    domain_vocab = (work / "fold0" / "domain_tokenizer" / "domaintok_tokenizer.json").read_text()
    assert '"a"' in domain_vocab and "LEAKTEST" not in domain_vocab and "LEAKPOST" not in domain_vocab
    text_vocab = (work / "fold0" / "text_tokenizer" / "tokenizer.json").read_text()
    assert "LEAK" not in text_vocab
    # The aggregates see only pre-cutoff events (LEAKTEST is a test user's real pre-cutoff input).
    features = pq.read_table(work / "features.parquet")
    assert "LEAKPOST" not in set(features.column("cat_top").to_pylist())
    # Labels: the split column matches the fold's split for every user.
    labels = pq.read_table(work / "fold0" / "labels_buys.parquet")
    assert dict(zip(labels.column("user_id").to_pylist(), labels.column("split").to_pylist())) == dict(zip(users, split))


def test_folds_rotate_the_test_users_and_pool_the_bootstrap(tmp_path):
    schema, events, tasks, users, _ = toy_study(tmp_path)
    report = ev.run_evaluation(ev.EvaluateSettings(
        schema=schema, events=(events,), tasks=tasks, output=tmp_path / "out", methods=("lightgbm",), folds=3,
        bootstrap=20, progress=False, log=lambda m: None))
    tests = [set(pq.read_table(tmp_path / "out" / "work" / f"fold{k}" / "labels_buys.parquet")
                 .filter(pa.compute.equal(pa.compute.field("split"), "test")).column("user_id").to_pylist())
             for k in range(3)]
    assert all(not (tests[i] & tests[j]) for i in range(3) for j in range(i + 1, 3))
    row = report["results"]["buys"]["lightgbm"]
    assert len(row["folds"]) == 3 and row["test"]["n"] == sum(len(t) for t in tests)
    assert row["test"]["auc"] == pytest.approx(np.mean([f["auc"] for f in row["folds"]]))


def test_method_table_options_are_checked(monkeypatch):
    assert ev.selected_methods(("all",)) == list(ev.METHODS)  # the shipped table is valid today
    monkeypatch.setitem(ev.METHODS, "gated", ev.Method("x", "finetune", ("sequence",), lm="domain",
                                                        finetune={"no_such_option": 1}))
    with pytest.raises(DomaintokError, match="method 'gated': FinetuneSettings has no option 'no_such_option'"):
        ev.selected_methods(("gated",))
    monkeypatch.setitem(ev.LANGUAGE_MODELS, "odd", ev.LanguageModel("domain", {"objective_typo": "clm"}))
    monkeypatch.setitem(ev.METHODS, "odd_row", ev.Method("x", "finetune", ("sequence",), lm="odd"))
    with pytest.raises(DomaintokError, match="language model 'odd': PretrainSettings has no option 'objective_typo'"):
        ev.selected_methods(("odd_row",))
    with pytest.raises(DomaintokError, match="unknown method 'nope'"):
        ev.selected_methods(("nope",))
    assert ev.selected_methods(("domain",)) == ["lightgbm", "domain"]  # the reference always runs


def test_lm_weight_reaches_the_fine_tuned_sequence_rows_only(tmp_path):
    settings = ev.EvaluateSettings(schema="online_retail", events=(), tasks=tmp_path / "t.yaml", output=tmp_path,
                                   preset="small", lm_weight=0.5)
    p = settings.resolved_preset()
    assert p["finetune_sequence"]["lm_weight"] == 0.5 and "lm_weight" not in p["finetune_tabular"]
    ev.check_options(ev.FinetuneSettings, p["finetune_sequence"], "preset")  # a FinetuneSettings option
    assert "lm_weight" not in ev.EvaluateSettings(schema="x", events=(), tasks=tmp_path, output=tmp_path
                                                  ).resolved_preset()["finetune_sequence"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("domaintok evaluate: error: needs --schema, --events, --tasks, --output") and "\n" not in err
    schema, events, tasks, _, _ = toy_study(tmp_path)
    assert main(["evaluate", "--schema", str(schema), "--events", str(events), "--tasks", str(tasks),
                 "--output", str(tmp_path / "o"), "--methods", "lightgbm,bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("domaintok evaluate: error: unknown method 'bogus': expected one of " + ", ".join(ev.METHODS))
    assert main(["evaluate", "--schema", str(schema), "--events", str(events), "--tasks", str(tasks),
                 "--output", str(tmp_path / "o"), "--methods", "lightgbm", "--extra-cutoffs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("domaintok evaluate: error: --extra-cutoffs: task 'segment' takes its labels from a file, which "
                   "holds them at the real cutoff only")
    for option in (["--actionpiece-spr", "0.5"], ["--actionpiece-compose"]):
        assert main(["evaluate", "--schema", str(schema), "--events", str(events), "--tasks", str(tasks),
                     "--output", str(tmp_path / "o"), *option]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"domaintok evaluate: error: {option[0]}: schema ") and "no actionpiece merges" in err


def test_scores_and_bootstrap():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(y * 0.3 + rng.random(300), 1)  # ties on purpose
    assert fast_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    yc = rng.integers(0, 3, 300)
    pc_ = rng.dirichlet(np.ones(3), 300) + np.eye(3)[yc] * 0.3
    pc_ /= pc_.sum(axis=1, keepdims=True)
    assert macro_auc(yc, pc_) == pytest.approx(roc_auc_score(yc, pc_, multi_class="ovr", average="macro"))
    assert kind_metrics("multiclass", yc, pc_)["accuracy"] == pytest.approx(np.mean(pc_.argmax(1) == yc))
    better = y + rng.random(300) * 0.5
    ci = bootstrap_relative("binary", [(y, p, better)], 200, 0)
    assert 0 < ci["low"] <= ci["relative"] <= ci["high"] and ci["p_better"] == 1.0
    # Regression: lower RMSE is better; two folds pooled.
    yr = rng.normal(size=200)
    good, bad = yr + rng.normal(0, 0.1, 200), yr + rng.normal(0, 1.0, 200)
    ci = bootstrap_relative("regression", [(yr[:100], bad[:100], good[:100]), (yr[100:], bad[100:], good[100:])], 200, 0)
    assert ci["high"] < 0 and ci["p_better"] == 1.0


def test_text_serialization_comes_from_the_schema(retail_events_slice):
    serialized = serialize_events("online_retail", retail_events_slice, max_events_per_user=20)
    text = serialized.column("text").to_pylist()[0]
    sign, amount, date, description, country, quantity, stock_code = text.split(" | ")
    # Fields in schema order: the sign of the amount, the amount, the date, the text, the country, the quantity.
    assert sign == ("-" if float(amount) < 0 else "+" if float(amount) > 0 else "0")
    assert len(date) == 16 and date[4] == "-" and country and description
    assert len(amount.split(".")[1]) == 2 and str(int(quantity)) == quantity
    tokenizer = train_text_tokenizer(serialized.column("text").to_pylist(), vocab_size=400, context_length=128)
    assert tokenizer.convert_ids_to_tokens([0, 2, 4]) == ["[PAD]", "[BOS]", "[SEP]"]
    sequences = text_sequences(tokenizer, serialized, context_length=128)
    for ids in sequences.column("input_ids").to_pylist():
        assert ids[0] == 2 and ids[-1] == 4 and len(ids) <= 128
    # Round trip: the newest event's text decodes back from the end of the window.
    first_user = serialized.column("user_id").to_pylist()[0]
    newest = [t for u, t in zip(serialized.column("user_id").to_pylist(), serialized.column("text").to_pylist())
              if u == first_user][-1]
    ids = sequences.column("input_ids").to_pylist()[0]
    start = max(i for i, t in enumerate(ids[:-1]) if t in (2, 4)) + 1  # after the previous [SEP] or the [BOS]
    assert tokenizer.decode(ids[start:-1]) == newest


def test_a_retail_label_matches_the_raw_data(shared_data_dir):
    import duckdb

    from domaintok.schema import load_schema

    path = shared_data_dir / "online_retail" / "online_retail_I_2010-2011.parquet"
    con = open_events(load_schema("online_retail"), path)
    spec = tasks_from_dict({"cutoff": dt.date(2011, 6, 1), "max_users": 50, "tasks": [
        {"name": "purchase", "kind": "binary",
         "label": {"from": "events", "horizon_days": 30, "where": "NOT starts_with(Invoice, 'C')"}}]})
    users = build_population(con, spec)
    register_split(con, users, assign_split(users, spec.split))
    labels = build_labels(con, spec, spec.tasks[0])
    raw = duckdb.connect()
    for user, label in zip(labels.column("user_id").to_pylist()[:10], labels.column("label").to_pylist()):
        bought = raw.execute(
            "SELECT count(*) FROM read_parquet($p) WHERE CAST(CAST(CustomerID AS BIGINT) AS VARCHAR) = $u "
            "AND InvoiceDate >= TIMESTAMP '2011-06-01' AND InvoiceDate < TIMESTAMP '2011-07-01' "
            "AND NOT starts_with(InvoiceNo, 'C')",
            {"p": str(path), "u": user},
        ).fetchall()[0][0]
        assert label == int(bought > 0), user


@pytest.mark.slow
@pytest.mark.integration
def test_evaluate_quick_end_to_end_on_online_retail(shared_data_dir, tmp_path, capsys):
    """The real data through the CLI: one file of the example (no overlap to handle), the purchase task only,
    300 customers."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        "cutoff: 2011-09-01\nmax_users: 300\ntasks:\n"
        "  - {name: purchase, kind: binary, label: {from: events, horizon_days: 90, "
        "where: \"NOT starts_with(Invoice, 'C')\"}}\n"
    )
    out = tmp_path / "eval"
    events = shared_data_dir / "online_retail" / "online_retail_I_2010-2011.parquet"
    assert main(["evaluate", "--schema", "online_retail", "--events", str(events), "--tasks", str(tasks),
                 "--output", str(out), "--preset", "quick", "--bootstrap", "100"]) == 0
    assert "purchase (auc): lightgbm" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    purchase = report["results"]["purchase"]
    assert list(purchase) == list(ev.DEFAULT_METHODS)
    for method, row in purchase.items():
        test = row["test"]
        assert 0.0 <= test["auc"] <= 1.0 and test["logloss"] > 0, method
        assert test["n"] == report["fold_sizes"][0]["test"], method
        assert math.isfinite(row["vs_lightgbm"]["relative"]), method
    assert report["population"]["users"] == 300


def test_embedding_scores_are_cross_fitted_on_train():
    """The stacked linear score: informative where the embedding is, and out-of-fold on train rows (a model that
    scored its own training rows would hand LightGBM a feature far cleaner on train than on valid/test)."""
    from batch.eval_report import fast_auc

    rng = np.random.default_rng(0)
    n, d = 600, 64
    emb = rng.normal(size=(n, d))
    train = np.arange(n) < 400
    signal = (emb[:, :3].sum(axis=1) + rng.normal(scale=0.5, size=n) > 0).astype(float)
    scores = ev.embedding_scores("binary", emb, signal, train, 0, seed=0)
    assert scores.shape == (n, 1)
    assert fast_auc(signal[~train], scores[~train, 0]) > 0.9  # valid/test rows: a model fit on every train row
    assert fast_auc(signal[train], scores[train, 0]) > 0.9  # train rows: out-of-fold, still informative
    noise = rng.integers(0, 2, n).astype(float)  # no signal: out-of-fold train scores must not look predictive
    scores = ev.embedding_scores("binary", emb, noise, train, 0, seed=0)
    assert abs(fast_auc(noise[train], scores[train, 0]) - 0.5) < 0.1
    target = emb[:, 0] * 2 + rng.normal(scale=0.1, size=n)
    reg = ev.embedding_scores("regression", emb, target, train, 0, seed=0)
    assert np.corrcoef(reg[~train, 0], target[~train])[0, 1] > 0.95
    classes = emb[:, :3].argmax(axis=1)  # 3 classes, linearly separable
    multi = ev.embedding_scores("multiclass", emb, classes.astype(float), train, 3, seed=0)
    assert multi.shape == (n, 3) and np.allclose(multi.sum(axis=1), 1.0)
    assert (multi[~train].argmax(axis=1) == classes[~train]).mean() > 0.7


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_lightgbm_grid_keeps_the_setting_best_on_valid(kind):
    rng = np.random.default_rng(1)
    n = 900
    x = rng.normal(size=(n, 6))
    signal = x[:, 0] + 0.5 * x[:, 1] * x[:, 2] + rng.normal(scale=0.7, size=n)
    label = (signal > 0).astype(float) if kind == "binary" else signal
    split = np.array(["train"] * 600 + ["valid"] * 150 + ["test"] * 150)
    table = pa.table({"split": split, "label": label, **{f"f{j}": x[:, j] for j in range(6)}})
    columns = [f"f{j}" for j in range(6)]
    runs = [ev._lightgbm_fit(kind, table, columns, 0, 300, 0, 1, params) for params in ev.LIGHTGBM_GRID]
    sign = 1 if kind == "binary" else -1  # AUC up, RMSE down
    best = max(range(len(runs)), key=lambda i: (sign * runs[i][1]["valid"], -i))  # the first of equals wins
    pred, info = ev.lightgbm_predict(kind, table, columns, 0, 300, 0, threads=1, grid=True)
    assert info["params"] == ev.LIGHTGBM_GRID[best] and info["valid"] == runs[best][1]["valid"]
    assert np.array_equal(pred, runs[best][0])
    assert len({round(r[1]["valid"], 6) for r in runs}) > 1  # the grid changes the model
    plain, plain_info = ev.lightgbm_predict(kind, table, columns, 0, 300, 0, threads=1)
    assert "params" not in plain_info and sign * info["valid"] >= sign * plain_info["valid"] - 1e-12


# --- the as-of token and extra cutoffs ---------------------------------------------------------------------------


def test_as_of_token_goes_after_bos_and_extra_cutoffs_close_before_the_cutoff():
    from batch import as_of

    table = pa.table({"user_id": ["a", "b"], "input_ids": pa.array([[1, 5, 6, 2], [1, 7, 2]], pa.list_(pa.int32())),
                      "n_events": [1, 1], "last_event_ts": pa.array([0, 10], pa.timestamp("us", tz="UTC"))})
    out = as_of.insert_as_of(table, np.array([100, 20]), lambda gap: gap + 1000)
    assert out.column("input_ids").to_pylist() == [[1, 1100, 5, 6, 2], [1, 1010, 7, 2]]
    assert out.schema == table.schema
    with pytest.raises(DomaintokError, match="after the prediction time"):
        as_of.insert_as_of(table, np.array([100, 5]), lambda gap: gap)
    # history tokens: tenure (as of - first event) and mean gap ((newest - first) / (n_events - 1), 0 for one event)
    several = table.set_column(2, "n_events", pa.array([3, 1]))
    out = as_of.insert_as_of(several, np.array([100, 20]), lambda gap: gap + 1000, first_us=np.array([-40, 10]))
    assert out.column("input_ids").to_pylist() == [[1, 1100, 1140, 1020, 5, 6, 2], [1, 1010, 1010, 1000, 7, 2]]
    with pytest.raises(DomaintokError, match="first event is after its newest"):
        as_of.insert_as_of(several, np.array([100, 20]), lambda gap: gap, first_us=np.array([5, 10]))
    assert as_of.tagged_users(table, dt.datetime(2024, 1, 31)).column("user_id").to_pylist() == [
        "a@2024-01-31", "b@2024-01-31"]
    cutoff = dt.datetime(2024, 3, 1)
    assert as_of.extra_cutoffs(cutoff, 2, 30, [30, 7]) == [dt.datetime(2024, 1, 31), dt.datetime(2024, 1, 1)]
    with pytest.raises(DomaintokError, match="longest horizon"):
        as_of.extra_cutoffs(cutoff, 1, 20, [30])
    # London's summer time: 2024-07-01 00:00 local is 2024-06-30 23:00 UTC
    assert as_of.utc_us(dt.datetime(2024, 7, 1), "Europe/London") == int(
        dt.datetime(2024, 6, 30, 23, tzinfo=dt.timezone.utc).timestamp() * 1_000_000)


@pytest.mark.slow
def test_extra_cutoffs_and_as_of_token_end_to_end(tmp_path):
    """Extra cutoffs add train examples only, each labelled and aggregated at its own cutoff from events before the
    real one; the as-of token is the gap bin from each row's newest event to its prediction time."""
    import torch

    from batch.as_of import gap_token_function, utc_us
    from domaintok.tokenizer import DomainTokenizer

    torch.set_num_threads(1)
    schema, events, _, users, split = toy_study(tmp_path)
    raw = yaml_load(schema)
    raw["fields"][3]["params"] = {"parts": ["month", "dow"], "time_since_previous": True}
    schema.write_text(yaml_dump(raw))
    tasks = tmp_path / "tasks_events.yaml"
    tasks.write_text("\n".join((tmp_path / "tasks.yaml").read_text().splitlines()[:-1]) + "\n")  # no file label
    out = tmp_path / "out"
    report = ev.run_evaluation(ev.EvaluateSettings(
        schema=schema, events=(events,), tasks=tasks, output=out, preset="quick",
        methods=("lightgbm_emb", "text_bpe", "domain", "domain_fusion"), max_steps=2, bootstrap=20, progress=False,
        as_of_token=True, history_tokens=True, extra_cutoffs=2, extra_cutoff_days=30, log=lambda m: None))
    assert report["settings"]["extra_cutoffs"] == 2 and report["settings"]["as_of_token"] is True
    assert report["settings"]["history_tokens"] is True
    fold = out / "work" / "fold0"
    times = [CUTOFF - dt.timedelta(days=30), CUTOFF - dt.timedelta(days=60)]
    tags = {f"@{t:%Y-%m-%d}": t for t in times}
    ev_table = pq.read_table(events).to_pydict()
    split_of = dict(zip(users, split))
    labels = pq.read_table(fold / "labels_buys.parquet").to_pydict()
    spend = dict(zip(*pq.read_table(fold / "labels_spend.parquet").select(["user_id", "label"]).to_pydict().values()))
    features = {r["user_id"]: r for r in pq.read_table(out / "work" / "features.parquet").to_pylist()}
    extra = [(u, s, y) for u, s, y in zip(labels["user_id"], labels["split"], labels["label"]) if "@" in u]
    assert extra and {s for _, s, _ in extra} == {"train"}
    for tag, t in tags.items():
        assert any(u.endswith(tag) for u, _, _ in extra), tag
    for user_tag, _, y in extra:
        user, tag = user_tag.split("@")
        t = tags["@" + tag]
        assert split_of[user] == "train"
        mine = [(ts, a * q) for c, ts, a, q in zip(ev_table["customer"], ev_table["ts"], ev_table["amount"],
                                                   ev_table["qty"]) if c == user]
        # label: any event in [t, t + 30 days), all of them before the real cutoff; aggregates: events before t
        window = [v for ts, v in mine if t <= ts < t + dt.timedelta(days=30)]
        assert y == int(bool(window)) and t + dt.timedelta(days=30) <= CUTOFF
        assert spend[user_tag] == pytest.approx(math.log1p(max(sum(window), 0.0)))
        assert features[user_tag]["event_count"] == sum(ts < t for ts, _ in mine)
    # users of the real cutoff keep their split and labels
    assert {u: s for u, s in zip(labels["user_id"], labels["split"]) if "@" not in u} == split_of
    # the fine-tuning sequences: [BOS], the as-of token, the history tokens (tenure, mean time between events), whole
    # events within the context; frozen embeddings read the sequences without them
    tok = DomainTokenizer.from_pretrained(fold / "domain_tokenizer")
    gap_token = gap_token_function(tok)
    context = report["settings"]["pretrain"]["context_length"]
    seq = pq.read_table(fold / "domain_sequences_as_of.parquet")
    plain = {r["user_id"]: r for r in pq.read_table(fold / "domain_sequences.parquet").to_pylist()}
    assert set(seq.column("user_id").to_pylist()) == set(plain) == set(labels["user_id"])
    for row in seq.to_pylist():
        tag = row["user_id"].partition("@")[2]
        as_of_local = tags["@" + tag] if tag else CUTOFF
        as_of_us = utc_us(as_of_local, "UTC")
        last_us = int(row["last_event_ts"].timestamp() * 1_000_000)
        assert last_us < as_of_us
        ids = row["input_ids"]
        assert len(ids) <= context and ids[0] == plain[row["user_id"]]["input_ids"][0]
        first_us = min(utc_us(ts, "UTC") for c, ts in zip(ev_table["customer"], ev_table["ts"])
                       if c == row["user_id"].partition("@")[0])
        mean_gap = (last_us - first_us) // max(row["n_events"] - 1, 1)
        assert row["n_events"] == sum(c == row["user_id"].partition("@")[0] and utc_us(ts, "UTC") < as_of_us
                                      for c, ts in zip(ev_table["customer"], ev_table["ts"]))
        assert ids[1:4] == [int(t) for t in gap_token(np.array([as_of_us - last_us, as_of_us - first_us, mean_gap]))]
        assert ids[4:] == plain[row["user_id"]]["input_ids"][-(len(ids) - 4):]
    assert "@" in "".join(pq.read_table(fold / "text_sequences.parquet").column("user_id").to_pylist())
    # pretraining never reads an extra example
    assert not any("@" in u for u in pq.read_table(fold / "domain_pretrain.parquet").column("user_id").to_pylist())
    for method, row in report["results"]["buys"].items():
        assert math.isfinite(row["test"]["auc"]), method


def test_extra_cutoffs_refuse_file_labels_and_gaps_shorter_than_the_horizon(tmp_path):
    schema, events, tasks, _, _ = toy_study(tmp_path)
    run = lambda tasks, **kw: ev.run_evaluation(ev.EvaluateSettings(  # noqa: E731
        schema=schema, events=(events,), tasks=tasks, output=tmp_path / "out", methods=("lightgbm",), bootstrap=5,
        progress=False, log=lambda m: None, extra_cutoffs=1, **kw))
    with pytest.raises(DomaintokError, match="task 'segment' takes its labels from a file"):
        run(tasks)
    events_only = tmp_path / "tasks_events.yaml"
    events_only.write_text("\n".join(tasks.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DomaintokError, match="longest horizon"):
        run(events_only, extra_cutoff_days=10)
    with pytest.raises(DomaintokError, match="--as-of-token: the schema has no temporal field with time_since_prev"):
        run(events_only, as_of_token=True)  # the toy schema's date field emits no gap tokens
    with pytest.raises(DomaintokError, match="--history-tokens: they follow the as-of token"):
        run(events_only, history_tokens=True)


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def yaml_dump(data):
    import yaml

    return yaml.safe_dump(data)
