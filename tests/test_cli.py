"""The ``mpt-deblur`` entry point: help for every subcommand, info, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from napari_mpt_deblur.cli import EXIT_OK, build_parser, main

SUBCOMMANDS = ["predict", "train", "finetune", "calibrate", "export", "evaluate", "benchmark", "compare", "info", "demo"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_mpt_deblur.cli", *args], capture_output=True, text=True)


def test_every_subcommand_is_declared():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"mpt-deblur {command}" in capsys.readouterr().out


def test_help_does_not_import_torch():
    code = (
        "import sys; from napari_mpt_deblur.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_info_json_reports_counts(capsys):
    assert main(["info", "--arch", "mpt", "--preset", "tiny", "--channels", "1", "--size", "128", "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    (row,) = data["architectures"]
    assert row["arch"] == "mpt" and row["preset"] == "tiny" and row["in_channels"] == 1
    assert row["parameters"] > 100_000
    # Full FLOPs count the attention products too, so they exceed 2 x conv/linear MACs.
    assert row["flops"] > 2 * row["conv_linear_macs"] > 0
    assert isinstance(data["models"], list)


def test_info_table_prints_every_preset():
    result = _run("info", "--arch", "h2t_unet", "--channels", "1", "--size", "64")
    assert result.returncode == 0, result.stderr
    for preset in ("paper", "small", "tiny"):
        assert f"h2t_unet  {preset}" in result.stdout


def test_usage_error_exit_code():
    assert _run("info", "--preset", "enormous").returncode == 2
    assert _run("nonsense").returncode == 2
