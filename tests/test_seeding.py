"""Every random stream of a run is its own: none in lockstep with another, none shared with
another seed's run."""

import itertools

import numpy as np
import torch

from workbench import seeding
from workbench.config import compose
from workbench.envs import make_vec_env
from workbench.train import build_learner


def test_streams_differ_within_a_run_and_across_seeds():
    words = {
        (seed, stream): seeding.integer(seed, stream)
        for seed in range(20)
        for stream in seeding.STREAMS
    }
    assert len(set(words.values())) == len(words)
    # a plain generator seeded with the run seed is none of them
    assert not {seed for seed in range(20)} & set(words.values())


def test_replay_sampling_and_target_noise_are_not_in_lockstep():
    """Both used to be seeded with the run seed: batch index j drove sample j's smoothing
    noise. Their first draws must now be unrelated."""
    cfg = compose(["agent=td3", "agent.actor_hidden=[8]", "agent.critic_hidden=[8]"])
    learner, replay = build_learner(cfg, 1, 3, 1, torch.device("cpu"))
    agent = learner.place(0, cfg.agent, seed=cfg.seed, normalize_obs=False)
    buffer = replay.buffer(0, cfg.seed)
    assert not torch.equal(agent.generator.get_state(), buffer.generator.get_state())
    words = [
        torch.randint(0, 2**62, (64,), generator=g) for g in (agent.generator, buffer.generator)
    ]
    assert not set(words[0].tolist()) & set(words[1].tolist())


def test_no_two_envs_of_any_two_seeds_share_a_stream():
    """With ``seed + i``, env 1 of seed 0 replayed env 0 of seed 1: runs over seeds shared
    most of their training episodes."""
    bases = [b for seed in range(64) for b in seeding.env_seeds(seed, 8)]
    assert len(set(bases)) == len(bases)
    assert seeding.env_seeds(3, 4)[:2] == seeding.env_seeds(3, 2)  # more envs: same first ones


def test_env_i_of_seed_s_does_not_replay_env_i_minus_1_of_seed_s_plus_1():
    envs = make_vec_env("Pendulum-v1", 2, seed=0)
    try:
        starts = {}
        for seed in (0, 1):
            obs, _ = envs.reset(seed=seeding.env_seeds(seed, 2))
            starts[seed] = obs
        for (s, i), (t, j) in itertools.permutations([(0, 0), (0, 1), (1, 0), (1, 1)], 2):
            assert not np.array_equal(starts[s][i], starts[t][j]), ((s, i), (t, j))
    finally:
        envs.close()


def test_seed_globals_is_reproducible():
    seeding.seed_globals(5)
    a = (torch.rand(3), np.random.rand(3))
    seeding.seed_globals(5)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
