"""Test-session settings: tiny data and tiny models run single-threaded.

Tests never depend on speed, but torch's OpenMP threads spin-wait: on a small machine that is
also running something else (a CI neighbour, a training run), two spinning threads can make a
tiny training step hundreds of times slower.  One passive thread keeps every test fast anywhere.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

torch.set_num_threads(1)
