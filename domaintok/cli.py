"""The `domaintok` console script: a click group whose commands are plugged in by entry point.

Commands live with the code they drive (`batch.*`, `streams.*`) and are found through the
`domaintok.commands` entry-point group, so this package never imports `batch` or `streams`. A command is
imported only when it runs (or when the top-level help lists it). Errors a user can act on print one line and
exit 2.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import click

from domaintok.errors import DomaintokError

ENTRY_POINT_GROUP = "domaintok.commands"
# top-level modules of the optional dependencies (pyproject.toml) -> the extra that installs them
EXTRA_OF_MODULE = {
    **dict.fromkeys(["torch", "accelerate", "peft", "matplotlib", "lightgbm", "sklearn", "scipy", "onnx",
                     "onnxruntime", "onnxscript"], "train"),
    **dict.fromkeys(["faust", "mode", "confluent_kafka", "aiokafka", "cramjam", "calfkit", "prometheus_client",
                     "uvloop"], "stream"),
    "pyspark": "spark",
}


class PluginGroup(click.Group):
    """A group whose subcommands are entry points, loaded on first use."""

    def _entry_points(self):
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._entry_points()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        ep = self._entry_points().get(name)
        if ep is None:
            return None
        try:
            command = ep.load()
        except ModuleNotFoundError as exc:
            if missing_extra(exc) is None:
                raise
            raise DomaintokError(f"`domaintok {name}` {missing_extra(exc)}") from None
        if not isinstance(command, click.Command):
            raise TypeError(f"entry point {ep.value!r} is not a click command")
        self.add_command(command, name)
        return command

    def format_commands(self, ctx, formatter):
        # The top-level help must not die because one plugin fails to import: show why instead.
        rows = []
        for name in self.list_commands(ctx):
            try:
                command = self.get_command(ctx, name)
            except Exception as exc:  # noqa: BLE001 - reported in the help text itself
                rows.append((name, f"(unavailable: {type(exc).__name__}: {exc})"))
                continue
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="domaintok", prog_name="domaintok")
def cli():
    """domaintok: foundation models over domain events.

    Offline: fit a tokenizer on parquet, tokenize, pretrain, fine-tune, embed, evaluate.
    Online: a Kafka broker, tokenizer and encoder workers, producer and consumer clients, a one-command demo.
    """


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """'needs X, which is not installed: pip install ...' when X comes with one of our extras; None otherwise."""
    extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
    if extra is None:
        return None
    return f"needs {exc.name}, which is not installed: pip install 'domaintok[{extra}]'"


def _fail(prog: str, message: str) -> int:
    # One line, whatever the message carried: a user reads the first line only.
    line = " ".join(str(message).split())
    click.echo(f"{prog}: error: {line}", err=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return (and, as a console script, exit with) the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = "domaintok" + (f" {args[0]}" if args and not args[0].startswith("-") else "")
    try:
        rv = cli.main(args=args, prog_name="domaintok", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:  # usage errors, bad parameters, missing files
        return _fail(prog, exc.format_message())
    except DomaintokError as exc:
        return _fail(prog, str(exc))
    except ModuleNotFoundError as exc:  # a command whose extra is not installed: say which one
        if missing_extra(exc) is None:
            raise
        return _fail(prog, missing_extra(exc))
    except OSError as exc:  # a path the command could not read or write: say which, not a traceback
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return _fail(prog, f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
