"""Where a command's report goes: JSON and markdown files where asked (their folders checked before the work
starts) and the markdown on the terminal."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import typer

from .errors import UsageError


def check_report_paths(*paths: Optional[Path]) -> None:
    for path in paths:
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"cannot write {path}: {path.parent} is not a directory.")


def write_reports(report: dict, markdown: str, json_out: Optional[Path], markdown_out: Optional[Path] = None,
                  write_json: Optional[Callable[[dict, Path], None]] = None) -> None:
    """``write_json``: the report's own JSON writer (e.g. one that follows a schema); plain JSON otherwise."""
    if json_out is not None:
        (write_json or _write_plain_json)(report, json_out)
    if markdown_out is not None:
        markdown_out.write_text(markdown)
    typer.echo(markdown)


def _write_plain_json(report: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
