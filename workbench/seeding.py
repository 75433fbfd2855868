"""Every random stream of a run, each derived from the run seed on its own.

Two generators seeded with the same number emit the same words in lockstep (sample j of a
replay batch would drive sample j's target smoothing noise), and seeds ``s + i`` overlap
across runs (env 1 of seed 0 would replay env 0 of seed 1). So every source draws from its
own ``numpy.random.SeedSequence`` child of the run seed, keyed by the stream's name and,
for per-env streams, the env index: independent within a run and across seeds.
"""

from __future__ import annotations

import random

import numpy as np
import torch

_TAG = 0x5742  # "WB": keeps these streams apart from a plain SeedSequence(seed)

# Append only: a stream's index is part of its key, so reordering would change every run.
STREAMS = (
    "init",  # torch's global generator: network initialization
    "python",  # Python's random module
    "numpy",  # NumPy's legacy global generator
    "replay",  # replay-buffer sampling
    "target_noise",  # TD3's target policy smoothing noise
    "random_actions",  # uniform actions before learning starts
    "explore_noise",  # action noise (Gaussian, OU)
    "explore_epsilon",  # epsilon-random actions
    "explore_param",  # parameter-space noise
    "envs",  # each training env's episodes (keyed by env index)
    "eval",  # evaluation episodes
)


def sequence(seed: int, stream: str, *key: int) -> np.random.SeedSequence:
    """The SeedSequence of ``stream`` (and e.g. an env index) for run seed ``seed``."""
    return np.random.SeedSequence(int(seed), spawn_key=(_TAG, STREAMS.index(stream), *key))


def integer(seed: int, stream: str, *key: int, bits: int = 63) -> int:
    """A non-negative integer seed for APIs that take one (torch, gymnasium)."""
    word = int(sequence(seed, stream, *key).generate_state(1, np.uint64)[0])
    return word >> (64 - bits)


def numpy_rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(sequence(seed, stream))


def torch_generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(integer(seed, stream))
    return generator


def env_seeds(seed: int, n_envs: int) -> list[int]:
    """Each training env's base seed (its episodes are seeded from it and their number)."""
    return [integer(seed, "envs", i) for i in range(n_envs)]


def eval_seed(seed: int) -> int:
    return integer(seed, "eval", bits=32)


def seed_globals(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (torch's initializes the networks)."""
    random.seed(integer(seed, "python"))
    np.random.seed(integer(seed, "numpy", bits=32))
    torch.manual_seed(integer(seed, "init"))
