"""Shared fixtures: fresh random seeds (printed on failure), a CLI runner with a fixed width."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed():
    """Seed torch and numpy's legacy global RNG freshly for every test; the seed is printed so a
    failure can be replayed with MERGE_CLI_TEST_SEED."""
    import os

    seed = int(os.environ.get("MERGE_CLI_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"test seed: {seed} (replay with MERGE_CLI_TEST_SEED={seed})")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def cli():
    """Invoke the Typer app in-process with a fixed terminal width and no colour."""
    from typer.testing import CliRunner

    from merge_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), env={"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"})

    return invoke
