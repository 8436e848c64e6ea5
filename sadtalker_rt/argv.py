"""The command line as typed, made ready for typer, and kept for the reports that name the command that made them."""
from __future__ import annotations

import re
import shlex

FREE_VIEW_OPTIONS = ("--input-yaw", "--input-pitch", "--input-roll")

_recorded: list[str] = []


def normalize_argv(argv: list[str]) -> list[str]:
    """``--synthetic-weights`` takes an optional seed (a bare flag means seed 0); ``--debug`` may stand anywhere;
    ``--input-yaw/pitch/roll`` take one or more integers."""
    out = ["--debug"] if "--debug" in argv else []
    argv = [a for a in argv if a != "--debug"]
    joining = False             # the official spelling `--input-yaw 0 30 -20`: later integers join the first value
    for i, arg in enumerate(argv):
        if joining and re.fullmatch(r"[+-]?\d+", arg):
            out[-1] += f",{arg}"
            continue
        joining = i > 0 and argv[i - 1] in FREE_VIEW_OPTIONS
        if arg == "--synthetic-weights":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or not nxt.lstrip("-").isdigit():
                out.append("--synthetic-weights=0")
                continue
        out.append(arg)
    return out


def record(args: list[str]) -> None:
    _recorded[:] = args


def recorded_command() -> str:
    """The command being run, shell-quoted, as reports record it."""
    return "sadtalker-rt " + shlex.join(_recorded)
