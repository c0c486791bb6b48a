"""Artifacts the workers must refuse at start, with a clear error: a tokenizer of another format version or edited by
hand, a model trained with another tokenizer (another schema) or of another model type, and any directory holding
pickles. Planted pickles and remote-code modules would leave a marker file if they ever ran: none may appear.

No broker is needed: both workers load their artifacts before they connect.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from domaintok.errors import ArtifactError

CLI = [sys.executable, "-c", "import sys; from domaintok.cli import main; sys.exit(main())"]
NO_BROKER = "127.0.0.1:9"  # nothing listens: a worker that got past loading its artifacts would hang, not pass


class _Marker:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Marker(marker)))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """An ecommerce tokenizer and a tiny model trained with it, plus a finance tokenizer (another schema)."""
    from domaintok.synthetic import generate_events, write_events_parquet
    from domaintok.tokenizer import DomainTokenizer
    from localkafka.demo import build_artifacts

    work = tmp_path_factory.mktemp("artifacts")
    _, _, tok_dir, model_dir = build_artifacts(work, "ecommerce", 20, 300, seed=1)
    finance = work / "finance.parquet"
    write_events_parquet(generate_events("finance", 20, 300, seed=1), finance)
    other_dir = DomainTokenizer.fit("finance", finance).save_pretrained(work / "finance-tokenizer")
    return Path(tok_dir), Path(model_dir), Path(other_dir)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DOMAINTOK_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=NO_BROKER, **extra)
    return env


def run_encoder(model_dir: Path, tok_dir: Path | None = None) -> subprocess.CompletedProcess:
    args = ["worker", "encode", "--model", str(model_dir), "--device", "cpu", "--max-idle", "1"]
    if tok_dir is not None:
        args += ["--tokenizer", str(tok_dir)]
    return subprocess.run([*CLI, *args], env=_env(), capture_output=True, text=True, timeout=120)


def run_tokenizer_worker(tok_dir: Path, log: Path) -> tuple[int, str]:
    """Start the Faust tokenizer worker as `domaintok worker tokenize` does; it must exit by itself."""
    argv = [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info", "--without-web"]
    with open(log, "wb") as out:
        proc = subprocess.run(argv, env=_env(DOMAINTOK_TOKENIZER_DIR=str(tok_dir)), stdout=out,
                              stderr=subprocess.STDOUT, timeout=120)
    return proc.returncode, log.read_text(errors="replace")


def assert_one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> None:
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith("domaintok worker: error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, (needle, last)


# -- pickles ------------------------------------------------------------------------------------------------------


def test_pickle_patterns_cover_the_pickle_formats():
    # One list (domaintok.artifacts) serves the tokenizer, model and fusion loaders; it must name every format that
    # unpickles on load.
    from domaintok.artifacts import PICKLE_PATTERNS

    assert PICKLE_PATTERNS == ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "opt.pth",
                                  "state.pkl", "x.pickle", "last.ckpt"])
def test_model_dir_with_a_pickle_is_refused_unread(artifacts, tmp_path, name):
    from domaintok.models.embedding import load_encoder

    _, model_dir, _ = artifacts
    model = _copy(model_dir, tmp_path / "model")
    marker = tmp_path / "unpickled"
    plant_pickle(model / name, marker)
    with pytest.raises(ArtifactError, match=f"refusing pickle weights {name}"):
        load_encoder(model, device="cpu")
    (model / "model.safetensors").unlink()  # pickle weights only: still refused, never loaded instead
    with pytest.raises(ArtifactError, match="refusing pickle weights"):
        load_encoder(model, device="cpu")
    assert not marker.exists()


def test_encoder_worker_refuses_a_pickled_model_at_start(artifacts, tmp_path):
    tok_dir, model_dir, _ = artifacts
    model = _copy(model_dir, tmp_path / "model")
    marker = tmp_path / "unpickled"
    plant_pickle(model / "pytorch_model.bin", marker)
    assert_one_line_refusal(run_encoder(model, tok_dir), "refusing pickle weights pytorch_model.bin")
    assert not marker.exists()


def test_remote_code_in_a_model_dir_is_never_imported(artifacts, tmp_path):
    from domaintok.models.embedding import load_encoder

    _, model_dir, _ = artifacts
    model = _copy(model_dir, tmp_path / "model")
    marker = tmp_path / "imported"
    (model / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_modeling.Config", "AutoModel": "evil_modeling.Model"}
    (model / "config.json").write_text(json.dumps(config))
    load_encoder(model, device="cpu")  # the domain transformer classes, never the auto_map's
    assert not marker.exists()


def test_tokenizer_dir_with_a_pickle_is_refused_unread(artifacts, tmp_path):
    from domaintok.tokenizer import DomainTokenizer
    from streams.tokenizer_agent import load_tokenizer

    tok_dir, _, _ = artifacts
    tok = _copy(tok_dir, tmp_path / "tokenizer")
    marker = tmp_path / "unpickled"
    plant_pickle(tok / "vocab.pkl", marker)
    with pytest.raises(ArtifactError, match=r"refusing pickle files vocab\.pkl"):
        load_tokenizer(tok)
    DomainTokenizer.from_pretrained(tok)  # the plain loader reads JSON only: the pickle stays unread
    assert not marker.exists()


def test_workers_refuse_a_tokenizer_dir_with_a_pickle_at_start(artifacts, tmp_path):
    tok_dir, model_dir, _ = artifacts
    tok = _copy(tok_dir, tmp_path / "tokenizer")
    marker = tmp_path / "unpickled"
    plant_pickle(tok / "vocab.pkl", marker)
    code, log = run_tokenizer_worker(tok, tmp_path / "tokenizer.log")
    assert code != 0 and "refusing pickle files vocab.pkl" in log.strip().splitlines()[-1]
    assert_one_line_refusal(run_encoder(model_dir, tok), "refusing pickle files vocab.pkl")
    assert not marker.exists()


# -- other versions, other schemas ---------------------------------------------------------------------------------


def _tamper(tok_dir: Path, dst: Path, how: str) -> Path:
    tok = _copy(tok_dir, dst)
    state_file = tok / "domaintok_tokenizer.json"
    state = json.loads(state_file.read_text())
    if how == "format_version":
        state["format_version"] += 1
    elif how == "schema_version":
        state["schema"]["version"] = int(state["schema"].get("version", 1)) + 1
    elif how == "fitted_state":
        field = next(iter(state["fields"]))
        state["fields"][field] = {"edited": True} if not state["fields"][field] else {
            k: v for k, v in list(state["fields"][field].items())[:-1]}
    state_file.write_text(json.dumps(state))
    return tok


TAMPERED = {
    "format_version": "format_version 2 != 1",
    "schema_version": "does not match its content",
    "fitted_state": "tokenizer dir",
}


@pytest.mark.parametrize("how", sorted(TAMPERED))
def test_tokenizer_worker_refuses_another_version_at_start(artifacts, tmp_path, how):
    tok_dir, _, _ = artifacts
    tok = _tamper(tok_dir, tmp_path / "tokenizer", how)
    code, log = run_tokenizer_worker(tok, tmp_path / "tokenizer.log")
    last = log.strip().splitlines()[-1]
    assert code != 0 and "Ready" not in log
    assert last.startswith(("domaintok.errors.ArtifactError: ", "domaintok.errors.SchemaError: ")), last
    assert TAMPERED[how] in last, last


def test_encoder_worker_refuses_another_tokenizer_version_at_start(artifacts, tmp_path):
    tok_dir, model_dir, _ = artifacts
    tok = _tamper(tok_dir, tmp_path / "tokenizer", "format_version")
    assert_one_line_refusal(run_encoder(model_dir, tok), "format_version 2 != 1")


def test_encoder_worker_refuses_a_model_of_another_schema(artifacts):
    from domaintok.tokenizer import DomainTokenizer

    _, model_dir, finance_dir = artifacts
    finance = DomainTokenizer.from_pretrained(finance_dir)
    assert_one_line_refusal(run_encoder(model_dir, finance_dir), "model was trained with tokenizer fingerprint",
                            finance.fingerprint)


def test_encoder_worker_refuses_another_model_type(artifacts, tmp_path):
    tok_dir, model_dir, _ = artifacts
    model = _copy(model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    assert_one_line_refusal(run_encoder(model, tok_dir), "model_type is 'gpt2'")
