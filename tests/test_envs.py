"""Env construction, quiet PyBullet, time feature, and SAME_STEP autoreset bookkeeping."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from workbench.envs import (
    EpisodeSeeds,
    TimeFeatureWrapper,
    check_env_id,
    ensure_registered,
    finished_episodes,
    make_env,
    make_vec_env,
    real_next_obs,
    silence_stdout,
)

# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "HalfCheetahBulletEnv-v0", "HopperBulletEnv-v0"])
def test_check_env_id_accepts_registered_ids(env_id: str) -> None:
    check_env_id(env_id)


def test_check_env_id_suggests_close_match() -> None:
    with pytest.raises(ValueError, match="did you mean HalfCheetahBulletEnv-v0"):
        check_env_id("HalfCheetahBullet-v0")


def test_check_env_id_is_case_tolerant_in_suggestions() -> None:
    with pytest.raises(ValueError, match="Pendulum-v1"):
        check_env_id("pendulum-v1")


def test_check_env_id_says_what_is_allowed_without_a_match() -> None:
    with pytest.raises(ValueError, match=r"Box.*HalfCheetahBulletEnv-v0"):
        check_env_id("Zzqxv")


def test_check_env_id_does_not_create_env(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_make(*args: object, **kwargs: object) -> None:
        raise AssertionError("check_env_id must not create the env")

    monkeypatch.setattr(gym, "make", no_make)
    check_env_id("HalfCheetahBulletEnv-v0")
    check_env_id("Pendulum-v1")


def test_ensure_registered_is_idempotent() -> None:
    ensure_registered()
    ensure_registered()
    assert "Walker2DBulletEnv-v0" in gym.registry
    assert "HumanoidFlagrunBulletEnv-v0" in gym.registry


# ----------------------------------------------------------------------------- quiet


def test_silence_stdout_works_at_fd_level(capfd: pytest.CaptureFixture[str]) -> None:
    libc = ctypes.CDLL(None)
    with silence_stdout():
        os.write(1, b"raw fd write\n")
        libc.printf(b"from C printf\n")
        print("from python")
    print("after")
    out, _ = capfd.readouterr()
    assert out == "after\n"


def test_bullet_env_leaves_nothing_on_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    env = make_env("HopperBulletEnv-v0")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()
    out, err = capfd.readouterr()
    assert out == ""
    assert "pybullet build time" not in err


def test_fresh_process_import_and_make_is_quiet() -> None:
    """The import banner only shows in a process that has not imported pybullet yet."""
    code = (
        "from workbench.envs import make_env\n"
        "env = make_env('InvertedPendulumSwingupBulletEnv-v0')\n"
        "env.reset(seed=0)\n"
        "env.step(env.action_space.sample())\n"
        "env.close()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout == ""
    assert "pybullet build time" not in proc.stderr
    assert "argv[0]" not in proc.stderr


# ----------------------------------------------------------------------------- spaces


def test_make_env_rejects_discrete_actions() -> None:
    with pytest.raises(ValueError, match=r"CartPole-v1.*Box"):
        make_env("CartPole-v1")


class _ImageObsEnv(gym.Env):
    observation_space = gym.spaces.Box(0.0, 1.0, (4, 4), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


def test_make_env_rejects_non_flat_observations() -> None:
    env_id = "WorkbenchTestImageObs-v0"
    gym.register(env_id, entry_point=_ImageObsEnv, max_episode_steps=10)
    try:
        with pytest.raises(ValueError, match=f"{env_id}.*1-D Box"):
            make_env(env_id)
    finally:
        del gym.registry[env_id]


def test_make_env_applies_max_episode_steps() -> None:
    env = make_env("Pendulum-v1", max_episode_steps=7)
    env.reset(seed=0)
    steps = 0
    truncated = False
    while not truncated:
        _, _, _, truncated, _ = env.step(np.zeros(1, np.float32))
        steps += 1
    assert steps == 7
    env.close()


# ----------------------------------------------------------------------------- time feature


def test_time_feature_counts_down_to_zero_at_the_limit() -> None:
    env = make_env("Pendulum-v1", max_episode_steps=10, time_feature=True)
    assert env.observation_space.shape == (4,)
    assert env.observation_space.dtype == np.float32
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32
    assert obs[-1] == 1.0
    features = [obs[-1]]
    truncated = False
    while not truncated:
        obs, _, _, truncated, _ = env.step(np.zeros(1, np.float32))
        assert env.observation_space.contains(obs)
        features.append(obs[-1])
    assert np.all(np.diff(features) < 0)
    assert features[-1] == pytest.approx(0.0, abs=1e-6)
    obs, _ = env.reset()
    assert obs[-1] == 1.0
    env.close()


def test_time_feature_takes_max_steps_argument() -> None:
    env = TimeFeatureWrapper(gym.make("Pendulum-v1"), max_steps=4)
    env.reset(seed=0)
    obs, *_ = env.step(np.zeros(1, np.float32))
    assert obs[-1] == pytest.approx(0.75)
    env.close()


def test_time_feature_matches_bullet_default_limit() -> None:
    env = make_env("InvertedPendulumSwingupBulletEnv-v0", time_feature=True)
    assert isinstance(env, TimeFeatureWrapper)
    assert env.max_steps == 1000
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(env.action_space.sample())
    assert obs[-1] == pytest.approx(0.999)
    env.close()


# ----------------------------------------------------------------------------- SAME_STEP


def _single_env_rollout(env_id: str, seed: int, actions: np.ndarray, **kwargs: object) -> dict:
    """Step one env by hand, resetting after each episode, as a reference (episodes seeded
    from (seed, episode number), as the vector envs' sub-envs are)."""
    env = EpisodeSeeds(make_env(env_id, **kwargs))  # type: ignore[arg-type]
    env.reset(seed=seed)
    rec: dict[str, list] = {"obs": [], "next": [], "reward": [], "term": [], "trunc": []}
    episodes: list[tuple[int, float, int]] = []
    ret, length = 0.0, 0
    for t, action in enumerate(actions):
        nxt, reward, term, trunc, _ = env.step(action)
        ret += float(reward)
        length += 1
        rec["next"].append(nxt)
        rec["reward"].append(reward)
        rec["term"].append(term)
        rec["trunc"].append(trunc)
        if term or trunc:
            episodes.append((t, ret, length))
            ret, length = 0.0, 0
            nxt, _ = env.reset()
        rec["obs"].append(nxt)
    env.close()
    out = {k: np.asarray(v) for k, v in rec.items()}
    out["episodes"] = episodes
    return out


def _vector_rollout(envs: gym.vector.VectorEnv, seed: int, actions: np.ndarray) -> dict:
    obs, _ = envs.reset(seed=seed)
    rec: dict[str, list] = {"obs": [], "next": [], "reward": [], "term": [], "trunc": []}
    episodes: list[tuple[int, int, float, int]] = []
    for t, action in enumerate(actions):
        obs, reward, term, trunc, infos = envs.step(action)
        rec["obs"].append(obs)
        rec["next"].append(real_next_obs(obs, infos))
        rec["reward"].append(reward)
        rec["term"].append(term)
        rec["trunc"].append(trunc)
        episodes.extend((t, i, r, n) for i, r, n in finished_episodes(infos))
    envs.close()
    out = {k: np.asarray(v) for k, v in rec.items()}
    out["episodes"] = episodes
    return out


def test_same_step_autoreset_stores_true_final_obs() -> None:
    seed, n_steps = 3, 12
    rng = np.random.default_rng(0)
    actions = rng.uniform(-2.0, 2.0, size=(n_steps, 2, 1)).astype(np.float32)
    envs = make_vec_env("Pendulum-v1", 2, seed=seed, max_episode_steps=5)
    vec = _vector_rollout(envs, seed, actions)

    assert vec["trunc"][4].all() and not vec["trunc"][:4].any()
    assert vec["trunc"][9].all()
    for i in range(2):
        ref = _single_env_rollout("Pendulum-v1", seed + i, actions[:, i], max_episode_steps=5)
        # what the buffer stores is the true next obs, final obs included
        np.testing.assert_allclose(vec["next"][:, i], ref["next"], rtol=1e-6)
        # what the agent acts on next is the reset obs on the truncation step
        np.testing.assert_allclose(vec["obs"][:, i], ref["obs"], rtol=1e-6)
        np.testing.assert_allclose(vec["reward"][:, i], ref["reward"], rtol=1e-6)
        assert not np.allclose(vec["obs"][4, i], vec["next"][4, i])
        # episode statistics: length 5, return = the sum of the episode's rewards
        mine = [(t, r, n) for t, j, r, n in vec["episodes"] if j == i]
        assert [(t, n) for t, _, n in mine] == [(4, 5), (9, 5)]
        assert mine[0][1] == pytest.approx(float(vec["reward"][:5, i].sum()))
        assert mine[1][1] == pytest.approx(float(vec["reward"][5:10, i].sum()))
        assert [r for _, r, _ in mine] == pytest.approx([r for _, r, _ in ref["episodes"]])


def test_real_next_obs_without_finished_episodes_is_a_copy() -> None:
    obs = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = real_next_obs(obs, {})
    np.testing.assert_array_equal(out, obs)
    assert out is not obs


def test_real_next_obs_replaces_only_masked_rows() -> None:
    obs = np.zeros((3, 2), dtype=np.float32)
    final = np.empty(3, dtype=object)
    final[:] = [None, np.array([5.0, 6.0], dtype=np.float32), None]
    infos = {"final_obs": final, "_final_obs": np.array([False, True, False])}
    out = real_next_obs(obs, infos)
    np.testing.assert_array_equal(out, [[0, 0], [5, 6], [0, 0]])
    assert obs.sum() == 0


def test_finished_episodes_empty_and_next_step_layout() -> None:
    assert finished_episodes({}) == []
    # NEXT_STEP autoreset puts the statistics at the top level
    infos = {
        "episode": {"r": np.array([0.0, 7.5]), "l": np.array([0, 12]), "t": np.zeros(2)},
        "_episode": np.array([False, True]),
    }
    assert finished_episodes(infos) == [(1, 7.5, 12)]


def test_vec_env_seeds_action_space() -> None:
    a = make_vec_env("Pendulum-v1", 2, seed=11)
    b = make_vec_env("Pendulum-v1", 2, seed=11)
    np.testing.assert_array_equal(a.action_space.sample(), b.action_space.sample())
    a.close()
    b.close()


def test_vec_env_rejects_unknown_vectorization() -> None:
    with pytest.raises(ValueError, match="vectorization"):
        make_vec_env("Pendulum-v1", 2, vectorization="threads")


@pytest.mark.parametrize(
    ("env_id", "kwargs", "n_steps"),
    [
        ("HopperBulletEnv-v0", {}, 300),  # random actions: terminates every ~15 steps
        ("InvertedPendulumSwingupBulletEnv-v0", {"max_episode_steps": 60}, 200),  # truncates
    ],
)
def test_async_matches_sync(env_id: str, kwargs: dict, n_steps: int) -> None:
    seed = 7
    sync = make_vec_env(env_id, 2, seed=seed, time_feature=True, **kwargs)
    rng = np.random.default_rng(1)
    low, high = sync.single_action_space.low, sync.single_action_space.high
    actions = rng.uniform(low, high, size=(n_steps, 2, *low.shape)).astype(np.float32)
    ref = _vector_rollout(sync, seed, actions)
    envs = make_vec_env(env_id, 2, vectorization="async", seed=seed, time_feature=True, **kwargs)
    assert isinstance(envs, gym.vector.AsyncVectorEnv)
    out = _vector_rollout(envs, seed, actions)

    for key in ("obs", "next", "reward"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(out["term"], ref["term"])
    np.testing.assert_array_equal(out["trunc"], ref["trunc"])
    assert len(out["episodes"]) == len(ref["episodes"]) > 2
    for (t, i, r, n), (t2, i2, r2, n2) in zip(out["episodes"], ref["episodes"], strict=True):
        assert (t, i, n) == (t2, i2, n2)
        assert r == pytest.approx(r2)
    ended = out["term"] | out["trunc"]
    # on the step an episode ends, the stored next obs has time feature 0 (truncation) or
    # less than 1 (termination), and the returned obs is a reset one (time feature 1)
    assert np.all(out["obs"][ended][:, -1] == 1.0)
    assert np.all(out["next"][ended][:, -1] < 1.0)
    if kwargs:
        assert out["trunc"].any()
        np.testing.assert_allclose(out["next"][out["trunc"]][:, -1], 0.0, atol=1e-6)
    else:
        assert out["term"].any()
    # episode lengths add up to the steps that ended episodes
    for t, i, _, n in out["episodes"]:
        assert ended[t, i]
        assert n >= 1


def test_episode_seeds_make_any_episode_reproducible() -> None:
    """Episode k of an env starts from a state fixed by (its base seed, k): a fresh vector env set
    to episode k and reset starts where the original one did."""
    envs = make_vec_env("Pendulum-v1", 2, seed=0, max_episode_steps=5)
    envs.reset(seed=3)
    for _ in range(10):  # two whole episodes
        obs, *_ = envs.step(np.zeros((2, 1), np.float32))
    assert envs.get_attr("episode") == (3, 3)
    fresh = make_vec_env("Pendulum-v1", 2, seed=0, max_episode_steps=5)
    fresh.reset(seed=3)
    fresh.set_attr("episode", [2, 2])
    again, _ = fresh.reset()
    np.testing.assert_array_equal(obs, again)
    envs.close()
    fresh.close()
