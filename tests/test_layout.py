"""The dependency direction of ARCHITECTURE.md, checked on the source: domaintok imports neither streams nor
batch, and those two never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# localkafka (local brokers, the demo) is tooling on top of streams: the runtime packages never import it
FORBIDDEN = {"domaintok": {"streams", "batch", "localkafka"}, "streams": {"batch", "localkafka"},
             "batch": {"streams", "localkafka"}, "localkafka": {"batch"}}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders


def test_no_pickle_in_library_code():
    # Artifacts load without executing code: nothing in the project may unpickle.
    offenders = [
        str(p.relative_to(ROOT))
        for package in FORBIDDEN
        for p in (ROOT / package).rglob("*.py")
        if {"pickle", "dill", "joblib"} & _imported_top_levels(p)
    ]
    assert not offenders, offenders


def test_the_window_rule_lives_in_one_module():
    """[BOS] + the newest whole events that fit: defined in domaintok/window.py only. Other modules call
    truncate_window / keep_newest_events / append_events; none defines its own truncation."""
    offenders = []
    for package in FORBIDDEN:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "domaintok" / "window.py":
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    node.name.startswith("truncate") or node.name in ("keep_newest_events", "append_events")
                ):
                    offenders.append(f"{path.relative_to(ROOT)}: def {node.name}")
    assert not offenders, offenders


def test_importing_any_module_does_nothing():
    """No module acts when imported: no app built, no port opened, no exit hook registered, no settings required.
    Every module of the three packages is imported in a fresh interpreter with no Kafka or DOMAINTOK settings."""
    import os
    import subprocess
    import sys

    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in FORBIDDEN
        for p in (ROOT / package).rglob("*.py")
    )
    script = f"""
import atexit, socket, sys
import numpy, pyarrow, pyarrow.parquet, duckdb, torch, transformers, transformers.trainer, faust, confluent_kafka, aiokafka, prometheus_client  # their own exit hooks
listening = []
real_listen = socket.socket.listen
socket.socket.listen = lambda self, *a: listening.append(self.getsockname()) or real_listen(self, *a)
before = atexit._ncallbacks()
import importlib
for name in {modules!r}:
    importlib.import_module(name)
assert atexit._ncallbacks() == before, f"exit hooks registered by an import: {{atexit._ncallbacks() - before}}"
assert not listening, f"ports opened by an import: {{listening}}"
print("ok", len({modules!r}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "DOMAINTOK_"))}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_settings_are_read_from_the_environment_in_one_place():
    """DOMAINTOK_* variables are read by domaintok/settings.py (and the Kafka ones by streams/settings.py) only."""
    import re

    allowed = {"domaintok/settings.py", "streams/settings.py"}
    reads = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*["']DOMAINTOK_""")
    offenders = [
        str(path.relative_to(ROOT))
        for package in FORBIDDEN
        for path in sorted((ROOT / package).rglob("*.py"))
        if str(path.relative_to(ROOT)) not in allowed and reads.search(path.read_text())
    ]
    assert not offenders, offenders


def test_no_function_runs_past_80_lines():
    # Long jobs are written as named steps (docstring and signature included in the count).
    offenders = []
    for package in sorted(FORBIDDEN):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 80:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not offenders, offenders
