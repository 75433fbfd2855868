import numpy as np
import torch

from workbench.replay import ReplayBuffer


def _add(buf, start, n, n_envs=1):
    for i in range(start, start + n):
        rows = np.arange(n_envs) + i * n_envs
        buf.add(
            obs=np.stack([np.full(2, r, np.float32) for r in rows]),
            actions=np.zeros((n_envs, 1), np.float32),
            rewards=rows.astype(np.float32),
            next_obs=np.stack([np.full(2, r + 0.5, np.float32) for r in rows]),
            terminated=rows % 3 == 0,
            truncated=rows % 5 == 0,
        )


def test_wraps_around_and_keeps_the_newest():
    buf = ReplayBuffer(5, obs_dim=2, action_dim=1)
    _add(buf, 0, 7)
    assert len(buf) == 5
    assert buf.pos == 2
    assert sorted(buf.rewards.tolist()) == [2, 3, 4, 5, 6]
    # obs, next_obs, flags stay aligned row by row after wrapping
    assert torch.equal(buf.next_obs[:, 0], buf.obs[:, 0] + 0.5)
    r = buf.rewards.long()
    assert torch.equal(buf.terminated, r % 3 == 0)
    assert torch.equal(buf.truncated, r % 5 == 0)


def test_batched_add_from_vector_envs_wraps():
    buf = ReplayBuffer(10, obs_dim=2, action_dim=1)
    _add(buf, 0, 6, n_envs=4)  # 24 rows into 10 slots
    assert len(buf) == 10
    assert sorted(buf.rewards.long().tolist()) == list(range(14, 24))


def test_terminated_and_truncated_are_stored_apart():
    buf = ReplayBuffer(16, obs_dim=2, action_dim=1)
    _add(buf, 0, 16)
    batch = buf.sample(256)
    r = batch.rewards.long()
    assert torch.equal(batch.terminated.bool(), r % 3 == 0)
    assert torch.equal(batch.truncated.bool(), r % 5 == 0)
    assert batch.terminated.dtype == torch.float32


def test_sampling_is_seeded_and_within_the_filled_part():
    a, b = ReplayBuffer(100, 2, 1, seed=3), ReplayBuffer(100, 2, 1, seed=3)
    _add(a, 0, 10)
    _add(b, 0, 10)
    sa, sb = a.sample(64), b.sample(64)
    assert torch.equal(sa.rewards, sb.rewards)
    assert sa.rewards.max() < 10
    assert sa.obs.shape == (64, 2) and sa.actions.shape == (64, 1)


def test_footprint_is_reported():
    buf = ReplayBuffer(1000, obs_dim=26, action_dim=6)
    assert buf.nbytes == 1000 * (26 * 4 * 2 + 6 * 4 + 4 + 2)
