"""Replay buffer preallocated on the training device.

Transitions are written and sampled as tensors on the device, so a training step never
round-trips a batch through the host. ``terminated`` and ``truncated`` are stored apart: the
target bootstraps through time-limit truncation and only stops at true termination.
Observations are stored raw; normalization is applied at sampling time so that changing
statistics never leave stale normalized data behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Batch:
    obs: torch.Tensor  # (B, obs_dim)
    actions: torch.Tensor  # (B, action_dim), normalized units
    rewards: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, obs_dim)
    terminated: torch.Tensor  # (B,) float 0/1: cut the bootstrap
    truncated: torch.Tensor  # (B,) float 0/1: kept for analysis; the target bootstraps


class ReplayBuffer:
    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        action_dim: int,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        f32 = {"dtype": torch.float32, "device": self.device}
        self.obs = torch.empty(self.capacity, obs_dim, **f32)
        self.next_obs = torch.empty(self.capacity, obs_dim, **f32)
        self.actions = torch.empty(self.capacity, action_dim, **f32)
        self.rewards = torch.empty(self.capacity, **f32)
        self.terminated = torch.empty(self.capacity, dtype=torch.bool, device=self.device)
        self.truncated = torch.empty(self.capacity, dtype=torch.bool, device=self.device)
        self.pos = 0  # next write index
        self.size = 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        tensors = (self.obs, self.next_obs, self.actions, self.rewards)
        flags = (self.terminated, self.truncated)
        return sum(t.element_size() * t.nelement() for t in (*tensors, *flags))

    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> None:
        """Add a batch of transitions (one row per env), wrapping around when full."""
        n = len(obs)
        idx = (torch.arange(n) + self.pos) % self.capacity
        idx = idx.to(self.device)
        self.obs[idx] = self._tensor(obs)
        self.actions[idx] = self._tensor(actions)
        self.rewards[idx] = self._tensor(rewards)
        self.next_obs[idx] = self._tensor(next_obs)
        self.terminated[idx] = torch.as_tensor(terminated, device=self.device, dtype=torch.bool)
        self.truncated[idx] = torch.as_tensor(truncated, device=self.device, dtype=torch.bool)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(
            0, self.size, (batch_size,), device=self.device, generator=self.generator
        )
        return Batch(
            obs=self.obs[idx],
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_obs=self.next_obs[idx],
            terminated=self.terminated[idx].float(),
            truncated=self.truncated[idx].float(),
        )

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
