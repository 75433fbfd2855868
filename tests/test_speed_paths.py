"""Every fast path against its plain counterpart: same seed, CPU, the tolerance stated.

- fused update (flat params, hand-written backward, fused Adam, one-kernel Polyak) vs the
  autograd path: parameters within 1e-6 after 30 updates (measured: ~3e-8);
- torch.compile of the fused update vs eager: within 1e-5; a failed compile falls back;
- compact replay vs full replay, device vs host storage, sampling before vs after the add:
  bit for bit;
- device-side metric sums vs a host read per update: the same run, metrics within 1e-6;
- async envs stepping during the update vs waiting for them: bit for bit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from workbench import fused as fz
from workbench.config import AgentConfig, compose
from workbench.ddpg import DDPG
from workbench.networks import Actor, flatten_parameters
from workbench.replay import Batch, CompactReplayBuffer, ReplayBuffer, make_replay_buffer
from workbench.tracking import NullTracker
from workbench.train import train

OBS, ACT, B = 5, 2, 64
PARAM_ATOL = 1e-6


def _agent(fused: bool, **overrides) -> DDPG:
    cfg = AgentConfig(actor_hidden=[32, 24], critic_hidden=[32, 24], **overrides)
    torch.manual_seed(0)  # the same initial weights for both paths
    return DDPG(OBS, ACT, cfg, seed=0, fused=fused)


def _batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(B, OBS, generator=g),
        actions=torch.rand(B, ACT, generator=g) * 2 - 1,
        rewards=torch.randn(B, generator=g),
        next_obs=torch.randn(B, OBS, generator=g),
        terminated=(torch.rand(B, generator=g) < 0.1).float(),
        truncated=(torch.rand(B, generator=g) < 0.1).float(),
    )


def _all_params(agent: DDPG) -> list[torch.Tensor]:
    nets = (agent.actor, agent.critic, agent.actor_target, agent.critic_target)
    return [p.detach().clone() for net in nets for p in net.parameters()]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float) -> None:
    worst = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"


# ----------------------------------------------------------------------------- fused update

AGENT_VARIANTS = {
    "ddpg-relu": {},
    "td3": {"n_critics": 2, "policy_delay": 2, "target_policy_noise": 0.2},
    "tanh-clip-decay": {"activation": "tanh", "max_grad_norm": 0.5, "critic_weight_decay": 0.01},
    "gelu": {"activation": "gelu"},
    "elu": {"activation": "elu"},
    "silu": {"activation": "silu"},
    "leaky_relu": {"activation": "leaky_relu", "n_critics": 2},
}


@pytest.mark.parametrize("overrides", AGENT_VARIANTS.values(), ids=AGENT_VARIANTS.keys())
def test_fused_update_matches_the_autograd_path(overrides):
    plain, fast = _agent(False, **overrides), _agent(True, **overrides)
    assert fast.fused and not plain.fused
    _assert_close(_all_params(plain), _all_params(fast), 0.0)
    for i in range(30):
        m_plain, m_fast = plain.update(_batch(i)), fast.update(_batch(i))
        assert m_plain.keys() == m_fast.keys()
        for key in m_plain:
            assert torch.allclose(m_plain[key], m_fast[key], rtol=1e-5, atol=1e-6), key
    _assert_close(_all_params(plain), _all_params(fast), PARAM_ATOL)
    assert plain.n_updates == fast.n_updates == 30


def test_fused_actor_step_leaves_the_critic_gradients_of_the_critic_step():
    """No critic weight gradients in the actor step: the buffer still holds the critic's."""
    plain, fast = _agent(False), _agent(True)
    batch = _batch(0)
    plain.update(batch)
    fast.update(batch)  # critic step, then actor step (policy_delay=1)
    ref = torch.cat([p.grad.reshape(-1) for p in plain.critic.parameters()])
    assert torch.allclose(fast.critic_grad, ref, atol=1e-6)


def test_fused_polyak_is_one_lerp_per_network():
    fast = _agent(True, tau=0.25)
    before_target = fast.critic_target_flat.clone()
    fast.update(_batch(0))
    expected = before_target + 0.25 * (fast.critic_flat - before_target)
    assert torch.allclose(fast.critic_target_flat, expected, atol=1e-7)
    # the modules see the flat buffers: they are the same memory
    first = next(fast.critic_target.parameters())
    assert first.data_ptr() == fast.critic_target_flat.data_ptr()


def test_layer_norm_falls_back_to_autograd_with_fused_adam():
    agent = _agent(True, layer_norm=True)
    assert not agent.fused
    assert agent.critic_opt.defaults["fused"] is True
    plain = _agent(False, layer_norm=True)
    for i in range(5):
        agent.update(_batch(i))
        plain.update(_batch(i))
    _assert_close(_all_params(plain), _all_params(agent), PARAM_ATOL)


@pytest.mark.parametrize(("src_fused", "dst_fused"), [(True, False), (False, True)])
def test_state_dict_moves_between_the_fused_and_the_plain_path(src_fused, dst_fused):
    src = _agent(src_fused, n_critics=2)
    for i in range(3):
        src.update(_batch(i))
    state = copy.deepcopy(src.state_dict())
    assert set(state["critic_opt"]["state"]) == set(range(len(list(src.critic.parameters()))))
    dst = _agent(dst_fused, n_critics=2)
    dst.load_state_dict(state)
    for i in range(3, 6):
        src.update(_batch(i))
        dst.update(_batch(i))
    _assert_close(_all_params(src), _all_params(dst), PARAM_ATOL)
    steps = {float(s["step"]) for s in dst.critic_opt.state_dict()["state"].values()}
    assert steps == {6.0}


def test_fused_state_dict_is_a_snapshot():
    agent = _agent(True)
    agent.update(_batch(0))
    state = agent.state_dict()
    saved = state["critic_opt"]["state"][0]["exp_avg"].clone()
    agent.update(_batch(1))
    assert torch.equal(state["critic_opt"]["state"][0]["exp_avg"], saved)


def test_flattened_parameters_stay_ordinary_parameters():
    torch.manual_seed(0)
    actor = Actor(OBS, ACT, [16, 16])
    x = torch.randn(4, OBS)
    before = actor(x)
    flat = flatten_parameters(actor)
    assert torch.equal(actor(x), before)
    assert all(p.is_leaf and isinstance(p, nn.Parameter) for p in actor.parameters())
    with torch.no_grad():
        flat.zero_()
    assert all(bool((p == 0).all()) for p in actor.parameters())
    other = Actor(OBS, ACT, [16, 16])
    actor.load_state_dict(other.state_dict())  # in place: still views of `flat`
    assert torch.equal(flat[:5], next(actor.parameters()).reshape(-1)[:5])
    assert torch.equal(actor(x), other(x))
    clone = copy.deepcopy(actor)
    assert torch.equal(clone(x), other(x))


def test_exported_policy_of_a_fused_agent_runs(tmp_path):
    from workbench.networks import ObsNormalizer
    from workbench.policy import save_policy

    agent = _agent(True)
    agent.update(_batch(0))
    low, high = -np.ones(ACT, np.float32), np.ones(ACT, np.float32)
    out = save_policy(
        agent.actor, ObsNormalizer(OBS, enabled=False), low, high, {"obs_dim": OBS}, tmp_path
    )
    program = torch.export.load(str(next(out.glob("*.pt2")))).module()
    obs = torch.randn(3, OBS)
    assert torch.allclose(program(obs), agent.act(obs), atol=1e-6)


# ----------------------------------------------------------------------------- compile


def test_compiled_fused_update_matches_eager():
    eager = _agent(True, n_critics=2, policy_delay=2, target_policy_noise=0.2)
    cfg = eager.cfg
    torch.manual_seed(0)
    compiled = DDPG(OBS, ACT, cfg, seed=0, fused=True, compile=True)
    assert compiled.compiled
    for i in range(6):
        eager.update(_batch(i))
        compiled.update(_batch(i))
    assert compiled.compile_fallbacks == []  # both steps really ran compiled
    _assert_close(_all_params(eager), _all_params(compiled), 1e-5)


def test_a_failed_compile_falls_back_to_the_eager_step(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            for p in fn.__self__.critic.parameters():  # a half-done step, then failure
                p.data.add_(1.0)
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = _agent(True)
    torch.manual_seed(0)
    agent = DDPG(OBS, ACT, eager.cfg, seed=0, fused=True, compile=True)
    for i in range(3):
        eager.update(_batch(i))
        agent.update(_batch(i))
    assert agent.compile_fallbacks == ["critic", "actor"]
    _assert_close(_all_params(eager), _all_params(agent), 0.0)


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
    full = ReplayBuffer(capacity, 3, 1, seed=1)
    compact = CompactReplayBuffer(capacity, 3, 1, seed=1)
    compact.patch_on_host = patch_on_host  # False: the selection an accelerator runs
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
    full, compact = ReplayBuffer(16, 2, 1), CompactReplayBuffer(16, 2, 1)
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
    assert ReplayBuffer.bytes_per_transition(26, 6) * 1_000_000 > 200e6
    buf = CompactReplayBuffer(1000, 26, 6)
    assert buf.nbytes == 1000 * per  # before any episode end is kept aside


def test_compact_replay_side_store_stays_small_and_is_released():
    rng = np.random.default_rng(0)
    buf = CompactReplayBuffer(200, 3, 1)
    for row in _episodes(rng, 2, 2000, p_end=0.05):
        buf.add(*row)
    live = len(buf._final_rows)
    assert live <= 200 and buf.final_obs.shape[0] <= 2 * max(live, 16)
    assert int((buf.final_slot >= 0).sum()) == live


def test_compact_replay_rejects_a_changing_number_of_envs():
    buf = CompactReplayBuffer(10, 3, 1)
    rows = next(_episodes(np.random.default_rng(0), 2, 1))
    buf.add(*rows)
    with pytest.raises(ValueError, match="2 rows"):
        buf.add(*next(_episodes(np.random.default_rng(1), 3, 1)))
    with pytest.raises(ValueError, match="capacity"):
        CompactReplayBuffer(3, 3, 1).add(*rows)


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
    "perf.fused_update=false",
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
    """All fast paths together against all plain paths (fused: float rounding only)."""
    fast_returns, fast = _run("env.n_envs=2")
    plain_returns, plain = _run("env.n_envs=2", *PLAIN)
    assert np.allclose(fast_returns, plain_returns, rtol=1e-4)
    _same_metrics(fast, plain, rtol=1e-4)


def test_device_metrics_and_compact_replay_change_nothing_in_a_run():
    """Everything but the fused update is exact: the same run, bit for bit."""
    base = ["perf.fused_update=false"]
    a_returns, a = _run(*base)
    b_returns, b = _run(
        *base, "perf.device_metrics=false", "perf.replay_compact=false", "perf.replay_storage=host"
    )
    assert a_returns == b_returns
    _same_metrics(a, b, rtol=1e-6)  # float32 sums on the device vs float64 on the host


def test_async_envs_stepping_during_updates_give_the_same_run():
    common = ["env.n_envs=2", "agent.gradient_steps=2", "perf.fused_update=false"]
    overlapped = _run(*common, "env.vectorization=async", "perf.async_overlap=true")
    waiting = _run(*common, "env.vectorization=async", "perf.async_overlap=false")
    sync = _run(*common, "env.vectorization=sync")
    assert overlapped == waiting == sync


def test_perf_settings_are_validated_and_left_out_of_the_config_hash():
    from workbench.config import ConfigError, config_hash

    assert config_hash(compose(["perf.fused_update=false"])) == config_hash(compose([]))
    with pytest.raises(ConfigError, match=r"perf.replay_storage='gpu'.*device, host"):
        compose(["perf.replay_storage=gpu"])
    with pytest.raises(ConfigError, match=r"agent.buffer_size=3.*env.n_envs"):
        compose(["agent.buffer_size=3", "agent.batch_size=2", "env.n_envs=2"])


def test_fused_mlp_refuses_layers_it_cannot_run():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="Linear"):
        fz.FusedMLP(net, "relu")
    assert not fz.supports("relu", layer_norm=True)
    assert not fz.supports("softplus", layer_norm=False)
