"""Every command of the one ``aejob`` CLI answers ``--help``."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from jobs.cli import app

COMMANDS = [
    [], ["clean"], ["export"], ["export-onnx"], ["compress"], ["decompress"], ["verify"], ["submit"], ["demo"],
    ["train"], ["train", "denoiser"], ["train", "codec"], ["train", "release"],
    ["bench"], ["bench", "denoise"], ["bench", "codec"], ["bench", "pipeline"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "aejob")
def test_help(cmd: list[str]) -> None:
    res = CliRunner().invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output
