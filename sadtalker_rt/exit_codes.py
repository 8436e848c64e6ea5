"""How a command ends: every failure the user can cause as one line on stderr and an exit code per class of
problem (``sadtalker_rt.errors``); ``--debug`` shows the traceback instead."""
from __future__ import annotations

import sys

import typer

from .errors import SadTalkerError, UsageError

INTERRUPTED = 130


def run_app(app: typer.Typer, args: list[str], debug: bool = False) -> None:
    """Run ``app`` on ``args`` and exit with the code of the outcome."""
    from typer.exceptions import TyperException   # usage errors (typer vendors click; click is not ours to import)

    try:
        code = app(args=args, prog_name="sadtalker-rt", standalone_mode=False)
        if isinstance(code, int) and code:     # typer.Exit(n) comes back as a return value here
            if code == INTERRUPTED:
                typer.echo("error: interrupted.", err=True)
            sys.exit(code)
    except SadTalkerError as err:
        if debug:
            raise
        typer.echo(f"error: {one_line(err)}", err=True)
        sys.exit(err.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except TyperException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        sys.exit(UsageError.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted.", err=True)
        sys.exit(INTERRUPTED)
    except MemoryError:
        typer.echo("error: out of memory; try a smaller --batch-size or --size 256.", err=True)
        sys.exit(1)
    except Exception as err:  # a bug of ours: still one line, the traceback behind --debug
        if debug:
            raise
        typer.echo(f"error: internal error ({type(err).__name__}: {one_line(err)}); run with --debug for the "
                   "traceback.", err=True)
        sys.exit(1)


def one_line(err: BaseException) -> str:
    return str(err).replace("\r", "\\r").replace("\n", "\\n")
