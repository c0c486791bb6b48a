"""What a user who installs the package meets: the public names of `import domaintok` (lazy, torch-free), the
shipped schemas found by name from an installed wheel, and declared dependency bounds that the tested environment
satisfies."""

from __future__ import annotations

import datetime as dt
import importlib
import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from packaging.requirements import Requirement

import domaintok

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _python(code_or_args: str | list[str], *, cwd: Path, pythonpath: Path | None = None) -> str:
    """Run the test's interpreter in a fresh process (`-c code` or the given args); stdout, failing on exit != 0."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    return proc.stdout


# -- the public API of `import domaintok` ----------------------------------------------------------------------------


def test_public_names_are_listed_and_resolve_to_their_modules():
    assert set(domaintok.__all__) >= {"DomainTokenizer", "DomainSchema", "load_schema", "DomaintokError",
                                      "DomainTransformerConfig", "DomainTransformerModel",
                                      "DomainTransformerForCausalLM", "JointFusionModel"}
    assert set(domaintok.__all__) <= set(dir(domaintok))
    for name, module in domaintok._EXPORTS.items():
        assert getattr(domaintok, name) is getattr(importlib.import_module(module), name)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        domaintok.no_such_name  # noqa: B018


def test_import_domaintok_and_its_tokenizer_side_never_import_torch(tmp_path):
    out = _python(
        "import sys, domaintok\n"
        "assert domaintok.DomainTokenizer.__name__ == 'DomainTokenizer'\n"
        "assert domaintok.load_schema('online_retail').name == 'online_retail'\n"
        "assert {'DomainTokenizer', 'DomainTransformerModel'} <= set(dir(domaintok))\n"
        "print('torch' in sys.modules)",
        cwd=tmp_path,
    )
    assert out.strip() == "False"


# -- the installed wheel --------------------------------------------------------------------------------------------

RETAIL_COLUMNS = pa.schema([
    ("Invoice", pa.string()), ("StockCode", pa.string()), ("Description", pa.string()), ("Quantity", pa.int64()),
    ("InvoiceDate", pa.timestamp("us")), ("Price", pa.float64()), ("CustomerID", pa.int64()), ("Country", pa.string()),
])


def _retail_events(path: Path, n: int = 300) -> Path:
    """A small parquet file with the Online Retail columns: 10 customers, a few products, one cancellation in 20."""
    start = dt.datetime(2011, 1, 3, 9)
    words = ["RED", "HEART", "LANTERN", "MUG", "CANDLE", "BAG", "VINTAGE", "TIN"]
    rows = {
        "Invoice": [("C" if i % 20 == 0 else "") + str(536000 + i // 3) for i in range(n)],
        "StockCode": [f"{85000 + i % 17}" for i in range(n)],
        "Description": [f"{words[i % 8]} {words[(i * 3) % 8]} {words[(i * 5) % 7]}" for i in range(n)],
        "Quantity": [(-1 if i % 20 == 0 else 1) * (1 + i % 12) for i in range(n)],
        "InvoiceDate": [start + dt.timedelta(hours=7 * i) for i in range(n)],
        "Price": [0.85 + (i % 9) * 1.25 for i in range(n)],
        "CustomerID": [17850 + i % 10 for i in range(n)],
        "Country": ["United Kingdom" if i % 4 else "France" for i in range(n)],
    }
    pq.write_table(pa.table(rows, schema=RETAIL_COLUMNS), path)
    return path


def _copy_sources(dest: Path) -> Path:
    """The files a build reads: pyproject.toml, the readme and the packages it includes (not build/ leftovers)."""
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest)
    shutil.copy2(ROOT / PYPROJECT["project"]["readme"], dest)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        shutil.copytree(ROOT / package, dest / package, ignore=junk)
    return dest


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """A wheel built offline from the checkout and installed (no dependencies) into its own site directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(tmp / "src")
    pip = ["-m", "pip", "--disable-pip-version-check", "--no-input"]
    _python([*pip, "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
            cwd=tmp)
    [wheel] = (tmp / "dist").glob("domaintok-*.whl")
    site = tmp / "site"
    _python([*pip, "install", "--no-index", "--no-deps", "--target", str(site), str(wheel)], cwd=tmp)
    return site


@pytest.mark.slow
def test_installed_wheel_fits_a_shipped_schema_by_name_from_anywhere(installed_wheel, tmp_path):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    site = str(installed_wheel)
    # The checkout is installed editable too: the wheel's copy must be the one imported.
    _python(
        "import domaintok, domaintok.schema, batch.fit\n"
        f"site = {site!r}\n"
        "assert domaintok.__file__.startswith(site), domaintok.__file__\n"
        "assert batch.fit.__file__.startswith(site), batch.fit.__file__\n"
        "assert str(domaintok.schema.SCHEMAS_DIR).startswith(site), domaintok.schema.SCHEMAS_DIR\n"
        "assert domaintok.schema.shipped_schema_names() == ['ecommerce', 'finance', 'online_retail', 'online_retail_compact']",
        cwd=workdir, pythonpath=installed_wheel,
    )
    events = _retail_events(tmp_path / "retail.parquet")
    output = tmp_path / "tok"
    out = _python(["-m", "domaintok.cli", "fit", "--schema", "online_retail", "--input", str(events),
                   "--output", str(output)], cwd=workdir, pythonpath=installed_wheel)
    assert out.startswith("fit online_retail: 300 events, 10 users")
    assert (output / "domaintok_tokenizer.json").is_file()


# -- dependency bounds ------------------------------------------------------------------------------------------------


def test_the_environment_satisfies_every_declared_lower_bound():
    # A bound above what is installed would be untested; one below it is checked by reading the code (pyproject).
    unmet = []
    optional = PYPROJECT["project"]["optional-dependencies"]
    for spec in PYPROJECT["project"]["dependencies"] + [d for extra in optional.values() for d in extra]:
        requirement = Requirement(spec)
        if requirement.name == "domaintok":
            continue  # `all` names the other extras
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            unmet.append(f"{spec}: not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{spec}: installed {installed}")
    assert not unmet, unmet


# -- extras: a tokenizer worker installs neither torch nor LightGBM -------------------------------------------------

BLOCK_TRAIN = """
import sys
from domaintok.cli import EXTRA_OF_MODULE
BLOCKED = {m for m, extra in EXTRA_OF_MODULE.items() if extra == "train"}
for name in BLOCKED:
    sys.modules[name] = None  # as if not installed: `import` raises ModuleNotFoundError, find_spec gives None
"""


def test_extras_split_the_dependencies():
    core = {Requirement(d).name for d in PYPROJECT["project"]["dependencies"]}
    extras = {k: {Requirement(d).name for d in v} for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    assert not core & {"torch", "lightgbm", "onnx", "faust-streaming", "confluent-kafka"}
    assert {"torch", "lightgbm", "scikit-learn", "onnx"} <= extras["train"]
    assert {"faust-streaming", "confluent-kafka", "prometheus-client"} <= extras["stream"]
    assert PYPROJECT["project"]["optional-dependencies"]["all"] == ["domaintok[train,stream,spark]"]


@pytest.mark.slow
def test_fit_tokenize_and_the_tokenizer_worker_need_no_train_extra(tmp_path):
    """With torch, LightGBM, scikit-learn, onnx... made uninstallable, the core + stream paths still work, and a
    command that needs the train extra says which one to install."""
    events = _retail_events(tmp_path / "retail.parquet")
    out = _python(BLOCK_TRAIN + f"""
from domaintok.cli import main
assert main(["fit", "--schema", "online_retail", "--input", {str(events)!r}, "--output", {str(tmp_path / 'tok')!r}]) == 0
assert main(["tokenize", "--tokenizer", {str(tmp_path / 'tok')!r}, "--input", {str(events)!r},
             "--output", {str(tmp_path / 'seq.parquet')!r}]) == 0
import streams.app, streams.tokenizer_agent, streams.produce, streams.consume
from streams.tokenizer_agent import load_tokenizer
assert load_tokenizer({str(tmp_path / 'tok')!r}).fingerprint
assert main(["pretrain", "--sequences", {str(tmp_path / 'seq.parquet')!r}, "--tokenizer", {str(tmp_path / 'tok')!r},
             "--output", {str(tmp_path / 'model')!r}, "--preset", "tiny"]) == 2
assert main(["evaluate", "--help"]) == 2
print(sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in BLOCKED and mod is not None))
""", cwd=tmp_path)
    assert out.strip().splitlines()[-1] == "[]"


def test_a_missing_extra_is_named_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TRAIN + "from domaintok.cli import main\nsys.exit(main(['evaluate', '--help']))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("is not installed: pip install 'domaintok[train]'")
