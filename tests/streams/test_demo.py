"""`domaintok demo --duration`: a short run on the embedded broker prints embeddings and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_demo_short_run_completes_every_user():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from localkafka.demo import command; sys.exit(command())",
         "--duration", "4", "--rate", "300", "--users", "30"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "30/30 users complete" in proc.stdout
    assert proc.stdout.count("n_events=") == 3
    # no orphan workers: nothing still runs the demo's Faust app or encoder
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "streams.app" not in ps and "demo-encoder" not in ps
