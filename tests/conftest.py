"""Test-session settings: tiny data and tiny models run single-threaded.

Tests never depend on speed, but torch's OpenMP threads spin-wait: on a small machine that is
also running something else (a CI neighbour, a training run), two spinning threads can make a
tiny training step hundreds of times slower.  One passive thread keeps every test fast anywhere.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _dock_settings(tmp_path, monkeypatch):
    """Each test's docks start from their defaults: persisted settings go to a fresh folder."""
    monkeypatch.setenv("NAPARI_CDINN_SETTINGS_DIR", str(tmp_path / "settings"))
