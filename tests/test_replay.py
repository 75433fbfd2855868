import numpy as np
import pytest
import torch

from workbench.replay import make_replay_buffer, make_storage


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
    buf = make_replay_buffer(5, 2, 1, compact=False)
    _add(buf, 0, 7)
    assert len(buf) == 5
    assert buf.pos == 2
    rows = buf.rows
    assert sorted(rows["rewards"].tolist()) == [2, 3, 4, 5, 6]
    # obs, next_obs, flags stay aligned row by row after wrapping
    assert torch.equal(rows["next_obs"][:, 0], rows["obs"][:, 0] + 0.5)
    r = rows["rewards"].long()
    assert torch.equal(rows["terminated"], r % 3 == 0)
    assert torch.equal(rows["truncated"], r % 5 == 0)


def test_batched_add_from_vector_envs_wraps():
    buf = make_replay_buffer(10, 2, 1, compact=False)
    _add(buf, 0, 6, n_envs=4)  # 24 rows into 10 slots
    assert len(buf) == 10
    assert sorted(buf.rows["rewards"].long().tolist()) == list(range(14, 24))


def test_terminated_and_truncated_are_stored_apart():
    buf = make_replay_buffer(16, 2, 1, compact=False)
    _add(buf, 0, 16)
    batch = buf.sample(256)
    r = batch.rewards.long()
    assert torch.equal(batch.terminated.bool(), r % 3 == 0)
    assert torch.equal(batch.truncated.bool(), r % 5 == 0)
    assert batch.terminated.dtype == torch.float32


def test_sampling_is_seeded_and_within_the_filled_part():
    a, b = (make_replay_buffer(100, 2, 1, seed=3, compact=False) for _ in range(2))
    _add(a, 0, 10)
    _add(b, 0, 10)
    sa, sb = a.sample(64), b.sample(64)
    assert torch.equal(sa.rewards, sb.rewards)
    assert sa.rewards.max() < 10
    assert sa.obs.shape == (64, 2) and sa.actions.shape == (64, 1)


def test_footprint_is_reported():
    buf = make_replay_buffer(1000, 26, 6, compact=False)
    assert buf.nbytes == 1000 * (26 * 4 * 2 + 6 * 4 + 4 + 2)
    # a row of a storage of 3 counts its own row only
    row = make_storage(3, 1000, 26, 6, compact=False).buffer(1, seed=0)
    assert row.nbytes == buf.nbytes


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
def test_one_gather_gives_each_member_the_batch_of_its_own_buffer(compact):
    """K members' buffers as rows of one storage: one gather gives each member the batch a
    buffer of its own gives (side-stored and newest next observations included, after
    wrapping around); a member without indices gets another's rows; a new member can take a
    slot; each buffer still adds, samples and checkpoints on its own."""

    def add(buf, item):
        obs, nxt, ended = item
        buf.add(obs, np.full((2, 1), obs[0, 0], np.float32), obs[:, 0], nxt, ended, ended)

    storage = make_storage(3, 24, 3, 1, compact=compact)

    def fill(slot, seed, steps):
        """The buffer in ``slot`` and its twin alone, the same transitions in both."""
        member = storage.buffer(slot, seed)
        alone = make_replay_buffer(24, 3, 1, seed=seed, compact=compact)
        for item in _trajectory(np.random.default_rng(seed), steps, n_envs=2):
            add(member, item)
            add(alone, item)
        return member, alone

    members, alone = zip(*(fill(k, k, 5 + 9 * k) for k in range(3)), strict=True)

    def check(indices, owners):
        got = storage.gather(indices)
        for k, owner in enumerate(owners):
            i = indices[k] if indices[k] is not None else indices[owner]
            want = alone[owner].gather(i)
            for name in vars(want):
                assert torch.equal(getattr(got, name)[k], getattr(want, name)), (k, name)
            one = members[owner].gather(i)  # a member's own gather: the same rows
            for name in vars(want):
                assert torch.equal(getattr(one, name), getattr(want, name)), (k, name)

    for _ in range(5):
        check([m.sample_indices(16) for m in members], [0, 1, 2])
    check([None, members[1].sample_indices(16), members[2].sample_indices(16)], [1, 1, 2])
    assert members[2].state_dict()["rows"]["obs"].shape[0] == len(members[2])

    newcomer, newcomer_alone = fill(0, 5, 4)  # a new member takes slot 0, from empty
    members, alone = (newcomer, *members[1:]), (newcomer_alone, *alone[1:])
    assert len(newcomer) == 8
    check([m.sample_indices(16) for m in members], [0, 1, 2])
