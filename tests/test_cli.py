"""The console script: every plugged-in command answers --help, and user errors are one line with exit 2."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import click
import pytest

from domaintok import cli
from domaintok.errors import DomaintokError

COMMANDS = sorted(ep.name for ep in entry_points(group=cli.ENTRY_POINT_GROUP))


def test_every_planned_command_is_registered():
    assert set(COMMANDS) >= {
        "fit", "tokenize", "pretrain", "finetune", "embed", "export-onnx", "evaluate",
        "broker", "worker", "produce", "consume", "demo",
    }


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help(name, capsys):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: domaintok {name}")
    # A command's help says what it does, not just its options.
    assert len(out.split("Options:")[0].strip().splitlines()) >= 3


def test_top_level_help_lists_every_command_and_none_is_broken(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out
    assert "unavailable" not in out


def test_unknown_command_is_one_line_exit_2(capsys):
    assert cli.main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "no-such-command" in err


def test_missing_input_file_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.parquet"
    code = cli.main(["tokenize", "--tokenizer", str(tmp_path), "--input", str(missing), "--output", str(tmp_path / "o.parquet")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "domaintok tokenize: error:" in err


def test_domain_error_is_one_line(monkeypatch, capsys):
    @click.command("explode")
    def explode():
        """Fail the way a command fails on bad input."""
        raise DomaintokError("schema 'x.yaml': field 'amount': source column 'amt' not in input\n(second line)")

    monkeypatch.setitem(cli.cli.commands, "explode", explode)
    assert cli.main(["explode"]) == 2
    err = capsys.readouterr().err
    assert err == "domaintok explode: error: schema 'x.yaml': field 'amount': source column 'amt' not in input (second line)\n"


def test_unwritable_path_is_one_line(monkeypatch, tmp_path, capsys):
    @click.command("write")
    def write():
        """Fail the way a command fails on a path it cannot write."""
        open(tmp_path / "a-file", "w").close()
        open(tmp_path / "a-file" / "under-a-file.parquet", "w")

    monkeypatch.setitem(cli.cli.commands, "write", write)
    assert cli.main(["write"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("domaintok write: error: Not a directory: ") and "under-a-file" in err


def test_console_script_exit_code():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from domaintok.cli import main; sys.exit(main(['--version']))"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0 and "domaintok" in proc.stdout
