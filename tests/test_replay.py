import numpy as np
import pytest
import torch

from workbench.replay import ReplayBuffer, make_replay_buffer


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


def _trajectory(rng, steps, n_envs, obs_dim=3):
    """(obs, next_obs) pairs where episodes end at random: next obs then is not the next."""
    obs = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
    for _ in range(steps):
        nxt = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
        ended = rng.random(n_envs) < 0.2
        reset = np.where(ended[:, None], rng.normal(size=nxt.shape), nxt).astype(np.float32)
        yield obs, nxt, ended
        obs = reset


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("steps", [7, 40])  # part-filled, and wrapped around several times
def test_state_dict_round_trip_continues_exactly(tmp_path, compact, steps):
    """Save mid-stream (through a weights_only file), load into a fresh buffer: the rest of
    the stream adds and samples exactly as in the buffer that never stopped."""
    rng = np.random.default_rng(0)
    stream = list(_trajectory(rng, steps + 10, n_envs=2))

    def add(buf, item):
        obs, nxt, ended = item
        acts = np.full((2, 1), obs[0, 0], np.float32)
        buf.add(obs, acts, obs[:, 0], nxt, ended, np.zeros(2, bool))

    whole = make_replay_buffer(24, 3, 1, seed=5, compact=compact)
    for item in stream[:steps]:
        add(whole, item)
        whole.sample(4)
    state = whole.state_dict()
    assert state["rows"]["obs"].shape[0] == len(whole)  # the filled rows, not the capacity
    torch.save(state, tmp_path / "replay.pt")
    resumed = make_replay_buffer(24, 3, 1, seed=99, compact=compact)
    resumed.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=True))
    for item in stream[steps:]:
        add(whole, item)
        add(resumed, item)
        a, b = whole.sample(8), resumed.sample(8)
        for name in vars(a):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_state_dict_refuses_another_shape():
    buf = make_replay_buffer(10, 3, 1, compact=True)
    with pytest.raises(ValueError, match="does not fit"):
        make_replay_buffer(20, 3, 1, compact=True).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        make_replay_buffer(10, 3, 1, compact=False).load_state_dict(buf.state_dict())


@pytest.mark.parametrize("compact", [False, True])
def test_stacked_buffers_gather_each_members_own_batch(compact):
    """A population's buffers as rows of stacked storage: one gather gives each member the
    batch its own buffer gives (side-stored and newest next observations included, after
    wrapping around); a member without indices gets another's rows; a new member can take
    a slot; each buffer still adds, samples and checkpoints on its own."""
    from workbench.replay import StackedReplay

    def add(buf, item):
        obs, nxt, ended = item
        buf.add(obs, np.full((2, 1), obs[0, 0], np.float32), obs[:, 0], nxt, ended, ended)

    def fill(seed, steps):
        twins = [make_replay_buffer(24, 3, 1, seed=seed, compact=compact) for _ in range(2)]
        for item in _trajectory(np.random.default_rng(seed), steps, n_envs=2):
            for buf in twins:
                add(buf, item)
        return twins

    members, alone = zip(*(fill(seed, 5 + 9 * seed) for seed in range(3)), strict=True)
    stacked = StackedReplay(list(members))
    for member in members:  # adds keep going into the stacked rows
        add(member, next(_trajectory(np.random.default_rng(7), 1, n_envs=2)))
    for buf in alone:
        add(buf, next(_trajectory(np.random.default_rng(7), 1, n_envs=2)))

    def check(indices, owners):
        got = stacked.gather(indices)
        for k, owner in enumerate(owners):
            i = indices[k] if indices[k] is not None else indices[owner]
            want = alone[owner].gather(i)
            for name in vars(want):
                assert torch.equal(getattr(got, name)[k], getattr(want, name)), (k, name)

    for _ in range(5):
        check([m.sample_indices(16) for m in members], [0, 1, 2])
    check([None, members[1].sample_indices(16), members[2].sample_indices(16)], [1, 1, 2])
    assert members[2].state_dict()["rows"]["obs"].shape[0] == len(members[2])

    newcomer, newcomer_alone = fill(5, 4)
    stacked.replace(0, newcomer)
    members, alone = (newcomer, *members[1:]), (newcomer_alone, *alone[1:])
    check([m.sample_indices(16) for m in members], [0, 1, 2])
    with pytest.raises(ValueError, match="member 1: its replay buffer does not fit"):
        stacked.replace(1, make_replay_buffer(30, 3, 1, compact=compact))
