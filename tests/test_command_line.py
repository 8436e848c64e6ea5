"""The command line's own pieces: argument normalisation, the recorded command, report folders checked before
any work, and the one-line, one-exit-code ending of every failure."""
from __future__ import annotations

import pytest

from sadtalker_rt.argv import normalize_argv, record, recorded_command
from sadtalker_rt.cli import main


def test_argv_normalisation():
    assert normalize_argv(["run", "--synthetic-weights", "a.png"]) == ["run", "--synthetic-weights=0", "a.png"]
    assert normalize_argv(["run", "--synthetic-weights", "3"]) == ["run", "--synthetic-weights", "3"]
    assert normalize_argv(["run", "--debug", "x"]) == ["--debug", "run", "x"]
    assert normalize_argv(["run", "--input-yaw", "0", "30", "-20", "a.png"]) == ["run", "--input-yaw", "0,30,-20",
                                                                                  "a.png"]


def test_recorded_command_is_shell_quoted():
    record(["bench", "--image", "my photo.png"])
    assert recorded_command() == "sadtalker-rt bench --image 'my photo.png'"


@pytest.mark.parametrize("args", [
    ["bench-enhancer", "--synthetic-weights", "--json", "{missing}/report.json"],
    ["triton-bench", "triton://127.0.0.1:9", "--markdown", "{missing}/report.md"],
    ["bench", "--synthetic-weights", "--streaming", "--json", "{missing}/report.json"],
])
def test_report_folders_are_checked_before_any_work(tmp_path, capfd, args):
    missing = tmp_path / "no" / "such"
    with pytest.raises(SystemExit) as exit_:
        main([a.format(missing=missing) for a in args])
    err = capfd.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot write {missing}") and "is not a directory" in err
    assert not (tmp_path / "no").exists()


def test_unknown_option_is_a_usage_error(capfd):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--no-such-option"])
    assert exit_.value.code == 2 and capfd.readouterr().err.startswith("error: ")
