"""Every fast path against its plain counterpart: same seed, CPU, the tolerance stated.

- compact replay vs full replay, device vs host storage, sampling before vs after the add:
  bit for bit;
- device-side metric sums vs a host read per update: the same run, metrics within 1e-6;
- async envs stepping during the update vs waiting for them: bit for bit.

The update step itself (hand-written, batched over members, compiled or not) is held to the
autograd formulation in ``tests/test_ddpg.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.config import compose
from workbench.replay import Batch, CompactReplayBuffer, make_replay_buffer
from workbench.tracking import NullTracker
from workbench.train import train

# ----------------------------------------------------------------------------- replay


def _episodes(rng, n_envs, steps, obs_dim=3, p_end=0.2):
    """What a vector env under SAME_STEP autoreset hands the loop: (obs, ..., real next obs)."""
    obs = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
    for _ in range(steps):
        nxt = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
        term = rng.random(n_envs) < p_end / 2
        trunc = ~term & (rng.random(n_envs) < p_end / 2)
        done = term | trunc
        reset = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
        act = rng.uniform(-1, 1, size=(n_envs, 1)).astype(np.float32)
        rew = rng.normal(size=n_envs).astype(np.float32)
        yield obs, act, rew, nxt, term, trunc
        obs = np.where(done[:, None], reset, nxt)


def _equal(a: Batch, b: Batch) -> None:
    for key in vars(a):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and torch.equal(x, y), key


@pytest.mark.parametrize("patch_on_host", [True, False], ids=["cpu-patch", "sync-free"])
@pytest.mark.parametrize(("capacity", "n_envs"), [(7, 1), (10, 3), (9, 2), (64, 4), (1000, 2)])
def test_compact_replay_samples_exactly_what_the_full_buffer_stores(
    capacity, n_envs, patch_on_host
):
    rng = np.random.default_rng(capacity)
    full = make_replay_buffer(capacity, 3, 1, seed=1, compact=False)
    compact = make_replay_buffer(capacity, 3, 1, seed=1)
    compact.storage.patch_on_host = patch_on_host  # False: the selection an accelerator runs
    for t, row in enumerate(_episodes(rng, n_envs, 120)):
        full.add(*row)
        compact.add(*row)
        assert len(full) == len(compact)
        _equal(full.sample(32), compact.sample(32))
        if t % 10 == 0:  # every stored row, not only a sample
            idx = torch.arange(len(full))
            _equal(full.gather(idx), compact.gather(idx))


def test_compact_replay_is_exact_for_any_input():
    """Next observations that do not continue (here: never) are all kept aside, exactly."""
    full, compact = make_replay_buffer(16, 2, 1, compact=False), make_replay_buffer(16, 2, 1)
    for i in range(40):
        row = (
            np.full((1, 2), i, np.float32),
            np.zeros((1, 1), np.float32),
            np.array([i], np.float32),
            np.array([[i + 0.5, -0.0 if i % 2 else 0.0]], np.float32),
            np.array([i % 3 == 0]),
            np.array([i % 5 == 0]),
        )
        full.add(*row)
        compact.add(*row)
    idx = torch.arange(16)
    a, b = full.gather(idx), compact.gather(idx)
    _equal(a, b)
    # bit for bit: -0.0 stays -0.0
    assert torch.equal(a.next_obs.view(torch.int32), b.next_obs.view(torch.int32))


def test_compact_replay_footprint_fits_a_million_halfcheetah_transitions():
    per = CompactReplayBuffer.bytes_per_transition(26, 6)
    assert per == 4 * (26 + 6 + 1) + 2 + 4
    assert per * 1_000_000 < 200e6
    assert make_replay_buffer(1, 26, 6, compact=False).bytes_per_transition(26, 6) * 1e6 > 200e6
    buf = make_replay_buffer(1000, 26, 6)
    assert buf.nbytes == 1000 * per  # before any episode end is kept aside


def test_compact_replay_side_store_stays_small_and_is_released():
    rng = np.random.default_rng(0)
    buf = make_replay_buffer(200, 3, 1)
    assert isinstance(buf, CompactReplayBuffer)
    for row in _episodes(rng, 2, 2000, p_end=0.05):
        buf.add(*row)
    live = len(buf._final_rows)
    assert live <= 200 and buf.final_obs.shape[0] <= 2 * max(live, 16)
    assert int((buf.rows["final_slot"] >= 0).sum()) == live


def test_compact_replay_rejects_a_changing_number_of_envs():
    buf = make_replay_buffer(10, 3, 1)
    rows = next(_episodes(np.random.default_rng(0), 2, 1))
    buf.add(*rows)
    with pytest.raises(ValueError, match="2 rows"):
        buf.add(*next(_episodes(np.random.default_rng(1), 3, 1)))
    with pytest.raises(ValueError, match="capacity"):
        make_replay_buffer(3, 3, 1).add(*rows)


@pytest.mark.parametrize("compact", [False, True])
def test_host_storage_gives_the_same_batches_as_device_storage(compact):
    rng = np.random.default_rng(0)
    on_device = make_replay_buffer(50, 3, 1, compact=compact, storage="device")
    on_host = make_replay_buffer(50, 3, 1, compact=compact, storage="host")
    assert on_host.storage_device == torch.device("cpu")
    for row in _episodes(rng, 2, 60):
        on_device.add(*row)
        on_host.add(*row)
        _equal(on_device.sample(16), on_host.sample(16))


@pytest.mark.parametrize("compact", [False, True])
def test_a_batch_drawn_before_the_add_is_the_batch_after_it_unless_it_hits_new_rows(compact):
    """What lets the update run while the envs step: same indices, same rows."""
    rng = np.random.default_rng(0)
    early = make_replay_buffer(30, 3, 1, compact=compact, seed=4)
    late = make_replay_buffer(30, 3, 1, compact=compact, seed=4)
    hits = misses = 0
    for row in _episodes(rng, 3, 80):
        idx = early.sample_indices(8, upcoming=3)
        hit = early.hits_pending(idx, 3)
        before = early.gather(idx) if not hit and len(early) else None
        early.add(*row)
        late.add(*row)
        late_idx = late.sample_indices(8)
        assert torch.equal(idx, late_idx)  # the same draw
        if before is not None:
            _equal(before, late.gather(late_idx))
            misses += 1
        else:
            hits += 1
    assert hits and misses


# ----------------------------------------------------------------------------- the loop

TINY = [
    "total_steps=500",
    "agent.actor_hidden=[16]",
    "agent.critic_hidden=[16]",
    "agent.batch_size=32",
    "agent.learning_starts=100",
    "agent.buffer_size=150",  # wraps around
    "env.max_episode_steps=40",  # episodes end (truncation) inside the buffer
    "eval.every=250",
    "eval.episodes=2",
    "eval.video=false",
    "tracking=none",
    "tracking.log_every=50",
    "progress=false",
]

PLAIN = [
    "perf.replay_compact=false",
    "perf.replay_storage=host",
    "perf.device_metrics=false",
    "perf.async_overlap=false",
]


def _run(*overrides: str) -> tuple[list[float], dict[str, list[tuple[int, float]]]]:
    tracker = NullTracker()
    result = train(compose([*TINY, *overrides]), tracker)
    assert result.status == "FINISHED"
    metrics = {k: v for k, v in tracker.metrics.items() if not k.startswith("perf/")}
    return result.eval_returns, metrics


def _same_metrics(a, b, rtol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        steps_a, values_a = zip(*a[key], strict=True)
        steps_b, values_b = zip(*b[key], strict=True)
        assert steps_a == steps_b, key
        assert np.allclose(values_a, values_b, rtol=rtol, atol=1e-6), key


def test_the_fast_run_matches_the_plain_run():
    """All fast paths together against all plain paths: the same run, bit for bit, but for
    metric means summed in float32 on the device (vs float64 on the host)."""
    fast_returns, fast = _run("env.n_envs=2")
    plain_returns, plain = _run("env.n_envs=2", *PLAIN)
    assert fast_returns == plain_returns
    _same_metrics(fast, plain, rtol=1e-6)


def test_async_envs_stepping_during_updates_give_the_same_run():
    common = ["env.n_envs=2", "agent.gradient_steps=2"]
    overlapped = _run(*common, "env.vectorization=async", "perf.async_overlap=true")
    waiting = _run(*common, "env.vectorization=async", "perf.async_overlap=false")
    sync = _run(*common, "env.vectorization=sync")
    assert overlapped == waiting == sync


def test_perf_settings_are_validated_and_left_out_of_the_config_hash():
    from workbench.config import ConfigError, config_hash

    assert config_hash(compose(["perf.replay_compact=false"])) == config_hash(compose([]))
    with pytest.raises(ConfigError, match=r"perf.replay_storage='gpu'.*device, host"):
        compose(["perf.replay_storage=gpu"])
    with pytest.raises(ConfigError, match=r"agent.buffer_size=3.*env.n_envs"):
        compose(["agent.buffer_size=3", "agent.batch_size=2", "env.n_envs=2"])
