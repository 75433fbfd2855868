"""Environment construction: Gymnasium and PyBullet envs, made quietly and checked for DDPG.

PyBullet's Gymnasium ids live in ``pybullet_envs_gymnasium``, which must be imported before
``gymnasium.make`` knows them. PyBullet prints from C: "pybullet build time" to fd 2 on
import, "argv[0]=" to fd 1 on an env's first reset. :func:`ensure_registered`,
:func:`make_env` and :class:`BulletFirstReset` silence both at the file-descriptor level.

Vector envs use ``AutoresetMode.SAME_STEP``: on the step an episode ends, the returned
observation is already the first one of the next episode, and the true final observation is
in ``infos["final_obs"]`` (mask ``infos["_final_obs"]``). :func:`real_next_obs` gives what a
replay buffer must store; :func:`finished_episodes` reads the episode statistics, which land
in ``infos["final_info"]["episode"]`` (mask ``infos["final_info"]["_episode"]``).
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import functools
import importlib
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
import numpy as np

from workbench import seeding
from workbench.errors import EnvError

_BULLET_MODULE = "pybullet_envs_gymnasium"
_EXAMPLE_ID = "HalfCheetahBulletEnv-v0"
_registered = False

try:  # the C library's stdio, to flush text PyBullet's printf left in its buffer
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)
except OSError:  # pragma: no cover - platforms without a loadable C library
    _LIBC = None


def _flush_c_stdout() -> None:
    if _LIBC is not None:
        with contextlib.suppress(Exception):
            _LIBC.fflush(None)


@contextlib.contextmanager
def silence_stdout(*, stderr: bool = False) -> Iterator[None]:
    """Send fd 1 (and fd 2 with ``stderr=True``) to /dev/null for the block.

    PyBullet prints from C straight to the file descriptors, so replacing ``sys.stdout``
    alone does not help; it is redirected too, for when it is not fd 1 (pytest, notebooks).
    C stdio is flushed before the fds come back: when stdout is a pipe, printf text waits
    in that buffer and would otherwise surface later (at exit, say). Redirecting an fd is
    process-wide, so other threads' output during the block is lost as well.
    """
    fds = (1, 2) if stderr else (1,)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_stdout()
    saved: list[tuple[int, int]] = []
    try:
        with open(os.devnull, "wb") as devnull:
            for fd in fds:
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:  # fd not open: nothing to silence there
                    continue
                os.dup2(devnull.fileno(), fd)
        # sys.stdout may not write to fd 1 (pytest's capture, notebooks): silence it too
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _flush_c_stdout()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def ensure_registered() -> None:
    """Import ``pybullet_envs_gymnasium`` once (quietly) so the Bullet ids can be made."""
    global _registered
    if _registered:
        return
    # `import pybullet` prints "pybullet build time: ..." to fd 2; the envs module imports it
    # only when an env is made, so import it here, with both fds silenced.
    with silence_stdout(stderr=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        importlib.import_module("pybullet")
        importlib.import_module(_BULLET_MODULE)
    _registered = True


def check_env_id(env_id: str) -> None:
    """Raise ValueError unless ``env_id`` is registered; cheap, creates no env (config check)."""
    ensure_registered()
    if not isinstance(env_id, str) or not env_id:
        raise ValueError("environment id must be a non-empty string")
    if ":" in env_id:  # "module:EnvId-v0": gymnasium imports the module to register it
        module, _, name = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"cannot import module {module!r} named in the id: {err}") from None
    else:
        name = env_id
    if name in gym.registry:
        _check_entry_point(name, gym.registry[name].entry_point)
        return
    by_lower = {key.lower(): key for key in gym.registry}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    if close:
        names = " or ".join(by_lower[c] for c in close)
        raise ValueError(f"unknown environment id; did you mean {names}?")
    raise ValueError(
        "unknown environment id; use a Gymnasium id with a continuous (Box) action space, "
        f"such as Pendulum-v1, or a PyBullet id such as {_EXAMPLE_ID}"
    )


def _check_entry_point(name: str, entry_point: Any) -> None:
    """Import the env's module (not the env): registered ids like MuJoCo's need extras."""
    if not isinstance(entry_point, str) or ":" not in entry_point:
        return
    module = entry_point.partition(":")[0]
    try:
        with silence_stdout(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(module)
    except (ImportError, gym.error.DependencyNotInstalled) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name} is registered but cannot be loaded here: {first}") from None


class BulletFirstReset(gym.Wrapper):
    """Make PyBullet's first reset quiet and like every later one.

    A Bullet env connects and loads its world on the first reset, printing "argv[0]=" from
    C; its locomotion envs then save that state and restore it on every later reset, so the
    first episode drifts slightly from later ones with the same seed and actions. Resetting
    twice the first time (same arguments) starts every episode from the restored state, so
    an episode is a function of its seed and actions alone.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._loaded = False

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        if not self._loaded:
            with silence_stdout():
                self.env.reset(**kwargs)
            self._loaded = True
        return self.env.reset(**kwargs)


class EpisodeSeeds(gym.Wrapper):
    """Seed every episode from (base seed, episode number), not from the env's own stream.

    ``reset(seed=s)`` sets the base (the run gives each env its own, ``seeding.env_seeds``);
    every later reset draws its seed from (base, episode). An episode's start is then a
    function of the run seed, the env index and the episode number, so a resumed run can put
    each env back at exactly the start of the episode it was in (set ``episode`` and reset).
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.base = 0
        self.episode = 0  # index of the next episode to start

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self.base, self.episode = int(seed), 0
        seq = np.random.SeedSequence([self.base, self.episode])
        self.episode += 1
        return self.env.reset(seed=int(seq.generate_state(1)[0]), options=options)


def _is_bullet(env: gym.Env) -> bool:
    return type(env.unwrapped).__module__.startswith(_BULLET_MODULE)


class TimeFeatureWrapper(gym.Wrapper):
    """Append the remaining-time fraction ``1 - t / max_steps`` to the observation.

    RL Zoo's time feature: with a time limit the return depends on time left, so the critic
    needs to see it to bootstrap consistently (Pardo et al., 2018).
    """

    def __init__(self, env: gym.Env, max_steps: int | None = None):
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"time feature needs a 1-D Box observation space, got {space}")
        if max_steps is None:
            max_steps = env.spec.max_episode_steps if env.spec is not None else None
        if max_steps is None or max_steps < 1:
            raise ValueError("time feature needs max_steps (or an env spec with a time limit)")
        self.max_steps = int(max_steps)
        self._t = 0
        low = np.append(space.low, 0.0).astype(np.float32)
        high = np.append(space.high, 1.0).astype(np.float32)
        self.observation_space = gym.spaces.Box(low=low, high=high, dtype=np.float32)

    def _with_time(self, obs: np.ndarray) -> np.ndarray:
        feature = max(1.0 - self._t / self.max_steps, 0.0)
        return np.append(np.asarray(obs, dtype=np.float32), np.float32(feature))

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._t = 0
        return self._with_time(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        return self._with_time(obs), reward, terminated, truncated, info


def make_env(
    env_id: str,
    *,
    max_episode_steps: int | None = None,
    time_feature: bool = False,
    render_mode: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> gym.Env:
    """Make one env quietly, and refuse spaces DDPG cannot use before any training starts."""
    ensure_registered()
    kwargs: dict[str, Any] = dict(env_kwargs or {})
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # pygame-ce's import banner
    if render_mode == "rgb_array":  # pygame-based envs render off-screen without a display
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    with silence_stdout(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            env = gym.make(env_id, **kwargs)
        except Exception as err:  # a bad env.kwargs, a missing simulator, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise EnvError(
                f"env.id={env_id!r} cannot be made with env.kwargs={env_kwargs or {}}: {first}"
            ) from err
    try:
        _check_spaces(env_id, env)
        if _is_bullet(env):
            env = BulletFirstReset(env)
        if time_feature:
            env = TimeFeatureWrapper(env, max_steps=max_episode_steps)
    except Exception:
        env.close()
        raise
    return env


def _check_spaces(env_id: str, env: gym.Env) -> None:
    act, obs = env.action_space, env.observation_space
    if not isinstance(act, gym.spaces.Box):
        raise EnvError(
            f"{env_id}: action space is {act}; DDPG/TD3 need a continuous (Box) action space"
        )
    if not (np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high))):
        raise EnvError(f"{env_id}: action space {act} must have finite bounds to scale into")
    if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
        raise EnvError(f"{env_id}: observation space is {obs}; a 1-D Box is required")


def _make_recorded_env(
    env_id: str,
    max_episode_steps: int | None,
    time_feature: bool,
    env_kwargs: dict[str, Any] | None,
) -> gym.Env:
    """Env factory for vector envs: module-level so worker processes can unpickle it."""
    env = make_env(
        env_id,
        max_episode_steps=max_episode_steps,
        time_feature=time_feature,
        env_kwargs=env_kwargs,
    )
    return gym.wrappers.RecordEpisodeStatistics(EpisodeSeeds(env))


def _in_worker(factory: Callable[[], gym.Env]) -> gym.Env:
    """Make an env inside an async worker process, deaf to Ctrl-C.

    Ctrl-C on a terminal reaches every process in the group; a worker that died of it would
    take the env away from the training process while that writes its checkpoint. Workers
    end when the training process closes them (or its pipe closes: it died).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return factory()


def _default_context() -> str:
    # forkserver: workers start from a clean process, not a fork of one holding torch's and
    # MLflow's threads; cheaper than spawn. Platforms without it (Windows, macOS) spawn.
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def make_vec_env(
    env_id: str,
    n_envs: int,
    *,
    vectorization: str = "sync",
    seed: int = 0,
    max_episode_steps: int | None = None,
    time_feature: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    context: str | None = None,
) -> gym.vector.VectorEnv:
    """Make ``n_envs`` copies, each with episode statistics, autoresetting on the SAME step.

    ``vectorization="async"`` runs each env in a worker process (for slow simulators);
    ``context`` picks the multiprocessing start method (default forkserver where available).
    The action space is seeded here from ``seed``; reset with
    ``envs.reset(seed=seeding.env_seeds(seed, n_envs))`` so every env has its own stream.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    factory = functools.partial(
        _make_recorded_env,
        env_id,
        max_episode_steps,
        time_feature,
        dict(env_kwargs) if env_kwargs else None,
    )
    fns = [factory] * n_envs
    mode = gym.vector.AutoresetMode.SAME_STEP
    if vectorization == "sync":
        envs: gym.vector.VectorEnv = gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    elif vectorization == "async":
        worker = functools.partial(_in_worker, factory)
        envs = gym.vector.AsyncVectorEnv(
            [worker] * n_envs, context=context or _default_context(), autoreset_mode=mode
        )
    else:
        raise ValueError(f"vectorization must be 'sync' or 'async', got {vectorization!r}")
    envs.action_space.seed(seeding.integer(seed, "random_actions", bits=32))
    return envs


def real_next_obs(next_obs: np.ndarray, infos: dict[str, Any]) -> np.ndarray:
    """Next observations for the replay buffer: the true final obs where an episode ended.

    Under SAME_STEP autoreset ``next_obs`` holds reset observations for finished envs;
    bootstrapping a truncated episode from those would be wrong.
    """
    out = np.array(next_obs, copy=True)
    mask = infos.get("_final_obs")
    if mask is None:
        return out
    final = infos["final_obs"]
    for i in np.flatnonzero(mask):
        out[i] = final[i]
    return out


def finished_episodes(infos: dict[str, Any]) -> list[tuple[int, float, int]]:
    """(env index, return, length) for each episode that ended this step.

    With SAME_STEP autoreset, RecordEpisodeStatistics' data is in ``final_info["episode"]``;
    the top-level ``infos["episode"]`` (NEXT_STEP autoreset) is read as a fallback.
    """
    source = infos.get("final_info")
    if not isinstance(source, dict) or "episode" not in source:
        source = infos
    episode = source.get("episode")
    if episode is None:
        return []
    mask = source.get("_episode")
    if mask is None:
        mask = np.ones(np.shape(episode["r"]), dtype=bool)
    return [(int(i), float(episode["r"][i]), int(episode["l"][i])) for i in np.flatnonzero(mask)]


def env_options(env_cfg: Any) -> dict[str, Any]:
    """``make_env`` / ``make_vec_env`` keyword arguments from an ``EnvConfig``."""
    return {
        "max_episode_steps": env_cfg.max_episode_steps,
        "time_feature": env_cfg.time_feature,
        "env_kwargs": dict(env_cfg.kwargs),
    }


class ActionScale:
    """The agent acts in normalized units ([-1, 1], its tanh range); envs take their bounds."""

    def __init__(self, space: gym.spaces.Box):
        self.low = space.low.astype(np.float32)
        self.high = space.high.astype(np.float32)

    def to_env(self, actions: np.ndarray) -> np.ndarray:
        return self.low + (actions + 1.0) * 0.5 * (self.high - self.low)


class EnvStepper:
    """``envs.step`` split in two, so an update can run while async workers simulate."""

    def __init__(self, envs: Any, overlap: bool):
        self.envs, self.overlap = envs, overlap
        self._actions: np.ndarray | None = None

    def start(self, actions: np.ndarray) -> None:
        if self.overlap:
            self.envs.step_async(actions)
        else:
            self._actions = actions

    def finish(self) -> tuple[Any, ...]:
        if self.overlap:
            return self.envs.step_wait()
        actions, self._actions = self._actions, None
        return self.envs.step(actions)
