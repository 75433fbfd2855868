"""Exploration: action noise, parameter-space noise, epsilon-random actions and schedules.

Everything here works in NORMALIZED action units: the actor's tanh output in [-1, 1]. The
training loop rescales to the env's bounds afterwards, so one sigma means the same thing on
every env. Every action returned is float32 numpy of shape (n_envs, action_dim), clipped
to [-1, 1].

``Explorer`` composes the pieces from the config so the training loop only calls
``act`` / ``on_episode_end`` / ``adapt`` / ``metrics``.

Randomness: each source draws from its own stream derived from the run seed (action noise,
epsilon, parameter noise; see ``workbench.seeding``), so switching epsilon on does not change
the action-noise sequence, and none of them collides with another stream of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from workbench import seeding
from workbench.config import SCHEDULE_KINDS, EpsilonConfig, NoiseConfig, ScheduleConfig
from workbench.networks import copy_module

__all__ = [
    "ActionNoise",
    "AdaptiveParamNoise",
    "Explorer",
    "GaussianNoise",
    "NoNoise",
    "OrnsteinUhlenbeckNoise",
    "Schedule",
    "epsilon_random",
]

# Normalization layers whose parameters parameter-space noise leaves alone: Plappert et al.
# put layer norm between perturbed layers so every layer's perturbation acts on the same
# scale; perturbing the norm's own gain and bias would undo that.
_UNPERTURBED_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,  # batch and instance norm
)

# ----------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``start`` to ``end`` over the first ``duration`` of training.

    ``value(progress)`` takes progress = step / total_steps; after ``duration`` it holds
    ``end``. Kinds: constant (always ``start``), linear, exponential (geometric, both > 0),
    cosine (half cosine, flat at both ends).
    """

    kind: str
    start: float
    end: float
    duration: float

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {self.kind!r}: must be one of {SCHEDULE_KINDS}")
        if not 0.0 < self.duration <= 1.0:
            raise ValueError(f"schedule duration {self.duration!r}: must be in (0, 1]")
        if self.kind == "exponential" and not (self.start > 0 and self.end > 0):
            raise ValueError(
                f"exponential schedule needs start and end > 0, got {self.start}, {self.end}"
            )

    @classmethod
    def from_config(cls, kind: str, start: float, end: float | None, duration: float) -> Schedule:
        """Build from config values; ``end=None`` means the value stays at ``start``."""
        return cls(
            kind=kind,
            start=float(start),
            end=float(start if end is None else end),
            duration=float(duration),
        )

    def value(self, progress: float) -> float:
        """The value at ``progress`` in [0, 1] (clamped); exact ``start``/``end`` at the ends."""
        if self.kind == "constant":
            return self.start
        t = progress / self.duration
        if t <= 0.0:
            return self.start
        if t >= 1.0:
            return self.end
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** t
        # cosine
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- action noise


class ActionNoise(Protocol):
    """What ``Explorer`` needs from an action-noise process."""

    def sample(self, sigma: float) -> np.ndarray: ...

    def reset(self, mask: np.ndarray) -> None: ...


class GaussianNoise:
    """Independent N(0, sigma²) per env, action dimension and step (the TD3 default)."""

    def __init__(self, n_envs: int, action_dim: int, rng: np.random.Generator) -> None:
        self.shape = (n_envs, action_dim)
        self.rng = rng

    def sample(self, sigma: float) -> np.ndarray:
        """A fresh (n_envs, action_dim) float32 draw scaled by ``sigma``."""
        out = self.rng.standard_normal(self.shape, dtype=np.float32)
        out *= np.float32(sigma)
        return out

    def reset(self, mask: np.ndarray) -> None:
        """Nothing to reset: the noise has no state."""


class OrnsteinUhlenbeckNoise:
    """Temporally correlated noise, one process per env (the original DDPG choice).

    Euler-Maruyama step as in Stable-Baselines3:
    x <- x + theta * (0 - x) * dt + sigma * sqrt(dt) * N(0, 1).
    This is an AR(1) process with a = theta*dt, whose stationary std is
    sigma * sqrt(dt / (2a - a²)). The state is kept in float64 so tiny dt steps do not
    lose precision; samples are returned as float32.
    """

    def __init__(
        self,
        n_envs: int,
        action_dim: int,
        rng: np.random.Generator,
        *,
        theta: float,
        dt: float,
    ) -> None:
        self.rng = rng
        self.theta = float(theta)
        self.dt = float(dt)
        self.state = np.zeros((n_envs, action_dim), dtype=np.float64)
        self._sqrt_dt = math.sqrt(self.dt)

    def sample(self, sigma: float) -> np.ndarray:
        """Advance every env's process one step and return the new state (float32 copy)."""
        x = self.state
        eps = self.rng.standard_normal(x.shape)
        x -= self.theta * self.dt * x
        eps *= sigma * self._sqrt_dt
        x += eps
        return x.astype(np.float32)

    def reset(self, mask: np.ndarray) -> None:
        """Zero the process of each env whose episode ended (``mask`` True)."""
        self.state[np.asarray(mask, dtype=bool)] = 0.0


class NoNoise:
    """No action noise: for deterministic acting and for parameter-space noise."""

    def __init__(
        self, n_envs: int, action_dim: int, rng: np.random.Generator | None = None
    ) -> None:
        self.shape = (n_envs, action_dim)

    def sample(self, sigma: float) -> np.ndarray:
        return np.zeros(self.shape, dtype=np.float32)

    def reset(self, mask: np.ndarray) -> None:
        """Nothing to reset."""


# ----------------------------------------------------------------------------- param noise


def _perturbable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every parameter except those owned by normalization layers (see Plappert et al.)."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, _UNPERTURBED_MODULES):
            continue
        for p in sub.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class AdaptiveParamNoise:
    """Parameter-space noise with an adaptive scale (Plappert et al. 2017).

    The actor's weights get N(0, stddev²) noise, which gives state-dependent, temporally
    consistent exploration. Weight-space std has no fixed meaning in action space, so
    ``stddev`` is adapted: measure the action distance the perturbation causes and shrink
    (divide by ``adaptation_coef``) when above the target, grow otherwise.
    """

    def __init__(
        self, *, initial_stddev: float, adaptation_coef: float, generator: torch.Generator
    ) -> None:
        if not initial_stddev > 0:
            raise ValueError(f"initial_stddev {initial_stddev!r}: must be > 0")
        if not adaptation_coef > 1:
            raise ValueError(f"adaptation_coef {adaptation_coef!r}: must be > 1")
        self.stddev = float(initial_stddev)
        self.adaptation_coef = float(adaptation_coef)
        self.generator = generator

    @torch.no_grad()
    def perturb(self, actor: nn.Module, perturbed: nn.Module) -> None:
        """Load the actor's current weights into ``perturbed``, then add noise to them.

        Normalization-layer parameters (LayerNorm, ...) are copied but not perturbed.
        """
        perturbed.load_state_dict(actor.state_dict())
        for p in _perturbable_parameters(perturbed):
            noise = torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
            p.add_(noise, alpha=self.stddev)

    @staticmethod
    @torch.no_grad()
    def distance(actor: nn.Module, perturbed: nn.Module, obs: torch.Tensor) -> float:
        """RMS difference between the two actors' actions on ``obs`` (normalized units)."""
        diff = actor(obs) - perturbed(obs)
        return float(torch.sqrt(torch.mean(diff.square())).item())

    def adapt(self, distance: float, target: float) -> None:
        """Move ``stddev`` one multiplicative step toward the distance ``target``."""
        if distance > target:
            self.stddev /= self.adaptation_coef
        else:
            self.stddev *= self.adaptation_coef


# ----------------------------------------------------------------------------- epsilon


def _epsilon_random_(actions: np.ndarray, epsilon: float, rng: np.random.Generator) -> None:
    """In-place version of ``epsilon_random`` (the Explorer's hot path)."""
    if epsilon <= 0.0:
        return
    n = actions.shape[0]
    rows = rng.random(n) < epsilon
    k = int(rows.sum())
    if k:
        actions[rows] = rng.uniform(-1.0, 1.0, size=(k, *actions.shape[1:]))


def epsilon_random(actions: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Replace each row, with probability ``epsilon``, by a uniform action in [-1, 1].

    Rows are whole actions (one per env), so a replaced action is entirely random, as in
    epsilon-greedy. Returns a new array of the same dtype; ``actions`` is not modified.
    With ``epsilon <= 0`` no random numbers are drawn.
    """
    out = np.array(actions, copy=True)
    _epsilon_random_(out, epsilon, rng)
    return out


# ----------------------------------------------------------------------------- explorer


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


class Explorer:
    """Exploration from the config, behind four calls the training loop makes.

    Noise kinds: gaussian / ou add scheduled action noise; none adds nothing; param acts
    with a perturbed copy of the actor (made here, re-perturbed at episode ends) and adapts
    its weight-noise std toward the scheduled sigma as a target action distance. All kinds
    then clip to [-1, 1] and apply scheduled epsilon-random actions.

    Vector envs and parameter noise: one perturbed copy is shared by all envs, and it is
    re-perturbed whenever ANY env ends an episode. With envs that end together (fixed
    episode length) this is exactly per-episode perturbation; otherwise the other envs see
    a new perturbation mid-episode, which keeps one forward pass per step instead of
    n_envs perturbed networks.
    """

    def __init__(
        self,
        noise: NoiseConfig,
        schedule: ScheduleConfig,
        epsilon: EpsilonConfig,
        *,
        total_steps: int,
        n_envs: int,
        action_dim: int,
        actor: nn.Module,
        seed: int,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps {total_steps!r}: must be >= 1")
        self.kind = noise.kind
        self.total_steps = int(total_steps)
        self.n_envs = int(n_envs)
        self.action_dim = int(action_dim)
        self.sigma_schedule = Schedule.from_config(
            schedule.kind, noise.sigma, schedule.end, schedule.duration
        )
        self.epsilon_schedule = Schedule.from_config(
            epsilon.kind, epsilon.start, epsilon.end, epsilon.duration
        )
        self._noise_rng = seeding.numpy_rng(seed, "explore_noise")
        self._epsilon_rng = seeding.numpy_rng(seed, "explore_epsilon")

        self.noise: ActionNoise
        self.param_noise: AdaptiveParamNoise | None = None
        self._perturbed: nn.Module | None = None
        self._adaptive: nn.Module | None = None
        self._last_adapt_step: int | None = None
        self._last_distance: float | None = None

        if self.kind == "gaussian":
            self.noise = GaussianNoise(n_envs, action_dim, self._noise_rng)
        elif self.kind == "ou":
            self.noise = OrnsteinUhlenbeckNoise(
                n_envs, action_dim, self._noise_rng, theta=noise.theta, dt=noise.dt
            )
        elif self.kind == "none":
            self.noise = NoNoise(n_envs, action_dim)
        elif self.kind == "param":
            self.noise = NoNoise(n_envs, action_dim)
            generator = seeding.torch_generator(seed, "explore_param", _device_of(actor))
            self.param_noise = AdaptiveParamNoise(
                initial_stddev=noise.initial_stddev,
                adaptation_coef=noise.adaptation_coef,
                generator=generator,
            )
            self.adapt_every = int(noise.adapt_every)
            # Acting copy (perturbed per episode) and a separate copy for measuring the
            # distance, so adaptation never changes the policy mid-episode.
            self._perturbed = self._frozen_copy(actor)
            self._adaptive = self._frozen_copy(actor)
            self.param_noise.perturb(actor, self._perturbed)
        else:
            raise ValueError(f"noise kind {self.kind!r}: must be gaussian, ou, param or none")

    @staticmethod
    def _frozen_copy(actor: nn.Module) -> nn.Module:
        clone = copy_module(actor)
        clone.requires_grad_(False)
        return clone

    @property
    def perturbed_actor(self) -> nn.Module | None:
        """The perturbed copy that acts under parameter noise (None for other kinds)."""
        return self._perturbed

    def _progress(self, step: int) -> float:
        return min(max(step / self.total_steps, 0.0), 1.0)

    def sigma(self, step: int) -> float:
        """Scheduled noise scale at ``step`` (target distance for param noise; 0 for none)."""
        if self.kind == "none":
            return 0.0
        return self.sigma_schedule.value(self._progress(step))

    def epsilon(self, step: int) -> float:
        """Scheduled probability of a uniform random action at ``step``."""
        return self.epsilon_schedule.value(self._progress(step))

    def act(self, actor: nn.Module, obs: torch.Tensor, step: int) -> np.ndarray:
        """Exploratory actions for normalized ``obs``: (n_envs, action_dim) float32 in [-1, 1].

        One device-to-host transfer; no gradient graph.
        """
        policy = self._perturbed if self._perturbed is not None else actor
        with torch.no_grad():
            out = policy(obs)
        return self.explore(out, step)

    def explore(self, policy_actions: torch.Tensor, step: int) -> np.ndarray:
        """``act`` after the forward pass: the acting policy's actions (the perturbed copy's
        under parameter noise) with scheduled noise, clipping and epsilon-random actions."""
        actions = policy_actions.to(device="cpu", dtype=torch.float32).numpy()
        if actions.shape != (self.n_envs, self.action_dim):
            raise ValueError(
                f"actor returned shape {tuple(actions.shape)}, "
                f"expected {(self.n_envs, self.action_dim)}"
            )
        if self.kind in ("gaussian", "ou"):
            # A new array: the actor's output tensor (which may share memory) is untouched.
            actions = actions + self.noise.sample(self.sigma(step))
            np.clip(actions, -1.0, 1.0, out=actions)
        else:
            actions = np.clip(actions, -1.0, 1.0)
        _epsilon_random_(actions, self.epsilon(step), self._epsilon_rng)
        return actions

    def on_episode_end(self, actor: nn.Module, done: np.ndarray) -> None:
        """After a vector step: reset finished envs' OU state; re-perturb if any ended."""
        done = np.asarray(done, dtype=bool)
        if not done.any():
            return
        self.noise.reset(done)
        if self.param_noise is not None and self._perturbed is not None:
            self.param_noise.perturb(actor, self._perturbed)

    def adapt(self, actor: nn.Module, obs_batch: torch.Tensor, step: int) -> None:
        """Param noise only: every ``adapt_every`` env steps, adapt stddev toward sigma.

        As in OpenAI baselines: perturb a separate copy from the current actor at the
        current stddev, measure the action distance on ``obs_batch`` (normalized
        observations, e.g. a replay batch) and step stddev toward the scheduled sigma.
        The first call adapts; later ones wait ``adapt_every`` steps after the last.
        """
        if self.param_noise is None or self._adaptive is None:
            return
        last = self._last_adapt_step
        if last is not None and step - last < self.adapt_every:
            return
        self._last_adapt_step = step
        self.param_noise.perturb(actor, self._adaptive)
        distance = self.param_noise.distance(actor, self._adaptive, obs_batch)
        self.param_noise.adapt(distance, self.sigma(step))
        self._last_distance = distance

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: RNG streams, OU state, param-noise copies.

        Plain containers and tensors only, so a checkpoint loads with ``weights_only=True``.
        """
        state: dict[str, Any] = {
            "kind": self.kind,
            "noise_rng": self._noise_rng.bit_generator.state,
            "epsilon_rng": self._epsilon_rng.bit_generator.state,
            "last_adapt_step": self._last_adapt_step,
            "last_distance": self._last_distance,
        }
        if isinstance(self.noise, OrnsteinUhlenbeckNoise):
            state["ou_state"] = torch.from_numpy(self.noise.state.copy())
        if self.param_noise is not None:
            assert self._perturbed is not None and self._adaptive is not None
            state["param_stddev"] = self.param_noise.stddev
            state["param_generator"] = self.param_noise.generator.get_state()
            state["perturbed"] = self._perturbed.state_dict()
            state["adaptive"] = self._adaptive.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"exploration state is for noise kind {state.get('kind')!r}, not {self.kind!r}"
            )
        self._noise_rng.bit_generator.state = state["noise_rng"]
        self._epsilon_rng.bit_generator.state = state["epsilon_rng"]
        self._last_adapt_step = state["last_adapt_step"]
        self._last_distance = state["last_distance"]
        if isinstance(self.noise, OrnsteinUhlenbeckNoise):
            self.noise.state[...] = state["ou_state"].numpy()
        if self.param_noise is not None:
            assert self._perturbed is not None and self._adaptive is not None
            self.param_noise.stddev = float(state["param_stddev"])
            self.param_noise.generator.set_state(state["param_generator"])
            self._perturbed.load_state_dict(state["perturbed"])
            self._adaptive.load_state_dict(state["adaptive"])

    def metrics(self, step: int) -> dict[str, float]:
        """Exploration scalars for the tracker at ``step``."""
        out = {"explore/sigma": self.sigma(step), "explore/epsilon": self.epsilon(step)}
        if self.param_noise is not None:
            out["explore/param_stddev"] = self.param_noise.stddev
            if self._last_distance is not None:
                out["explore/param_distance"] = self._last_distance
        return out
