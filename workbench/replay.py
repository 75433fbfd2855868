"""Replay buffers preallocated on the training device.

Transitions are written and sampled as tensors on the device, so a training step never
round-trips a batch through the host (``storage_device="cpu"`` keeps them on the host instead
and copies each batch over: the plain path, for comparison). ``terminated`` and
``truncated`` are stored apart: the target bootstraps through time-limit truncation and only
stops at true termination. Observations are stored raw and exactly (float32); normalization
is applied at sampling time so that changing statistics never leave stale normalized data.

``CompactReplayBuffer`` stores each observation once: a transition's next observation is,
bit for bit, the observation its env reported at the following step, so it is read from
that row (``n_envs`` rows further on). Where it is not (an episode ended: under SAME_STEP
autoreset the next row holds the reset observation) the true next observation is kept in a
small side store. That halves the observation memory: 1M HalfCheetah transitions take
~138 MB instead of ~238 MB.

Sampling is split into drawing indices and gathering them, so the training loop can start
an update while the envs are still stepping: as long as the drawn indices avoid the rows the
next ``add`` will write (``hits_pending``), the batch is the one it would get after the add.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench import seeding

_NUMPY_DTYPES = {torch.float32: np.float32, torch.bool: np.bool_, torch.int32: np.int32}


@dataclass(frozen=True)
class Batch:
    obs: torch.Tensor  # (B, obs_dim)
    actions: torch.Tensor  # (B, action_dim), normalized units
    rewards: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, obs_dim)
    terminated: torch.Tensor  # (B,) float 0/1: cut the bootstrap
    truncated: torch.Tensor  # (B,) float 0/1: kept for analysis; the target bootstraps


class ReplayBuffer:
    """Ring buffer of transitions, one row per env per step, sampled uniformly."""

    def __init__(
        self,
        capacity: int,
        obs_dim: int,
        action_dim: int,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        storage_device: torch.device | str | None = None,
    ):
        self.capacity = int(capacity)
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.device = torch.device(device)  # where batches are used
        self.storage_device = torch.device(storage_device or device)  # where rows live
        f32 = {"dtype": torch.float32, "device": self.storage_device}
        self.obs = torch.empty(self.capacity, obs_dim, **f32)
        self.actions = torch.empty(self.capacity, action_dim, **f32)
        self.rewards = torch.empty(self.capacity, **f32)
        self.terminated = torch.empty(self.capacity, dtype=torch.bool, device=self.storage_device)
        self.truncated = torch.empty(self.capacity, dtype=torch.bool, device=self.storage_device)
        self._allocate_next_obs()
        self.pos = 0  # next write index
        self.size = 0
        # its own stream of the run seed (workbench.seeding): not in lockstep with another
        self.generator = seeding.torch_generator(seed, "replay", self.storage_device)

    def _allocate_next_obs(self) -> None:
        self.next_obs = torch.empty_like(self.obs)

    def __len__(self) -> int:
        return self.size

    @staticmethod
    def bytes_per_transition(obs_dim: int, action_dim: int) -> int:
        """Fixed storage per transition: obs and next obs, action, reward (float32), 2 flags."""
        return 4 * (2 * obs_dim + action_dim + 1) + 2

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer's tensors now."""
        return sum(t.element_size() * t.nelement() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return [
            self.obs,
            self.next_obs,
            self.actions,
            self.rewards,
            self.terminated,
            self.truncated,
        ]

    # ------------------------------------------------------------------------------ write

    def _rows(self, n: int) -> torch.Tensor | slice:
        """Where the next add of ``n`` rows writes: a slice, or indices when it wraps around."""
        if self.pos + n <= self.capacity:
            return slice(self.pos, self.pos + n)
        idx = (torch.arange(n) + self.pos) % self.capacity
        return idx.to(self.storage_device)

    def _write(self, name: str, rows: torch.Tensor | slice, values: np.ndarray) -> None:
        """``values`` into rows of the tensor ``name`` (cast to its dtype).

        On the host a slice is written through a NumPy view of the same memory: a few
        microseconds, where a tensor index_put costs tens (one add writes five or six).
        """
        target = getattr(self, name)
        if isinstance(rows, slice) and target.device.type == "cpu":
            target.numpy()[rows] = values
        else:
            host = np.asarray(values, dtype=_NUMPY_DTYPES[target.dtype])
            target[rows] = torch.as_tensor(host, device=target.device)

    def _write_common(
        self,
        rows: torch.Tensor | slice,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> None:
        self._write("obs", rows, obs)
        self._write("actions", rows, actions)
        self._write("rewards", rows, rewards)
        self._write("terminated", rows, terminated)
        self._write("truncated", rows, truncated)

    def _advance(self, n: int) -> None:
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

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
        rows = self._rows(len(obs))
        self._write_common(rows, obs, actions, rewards, terminated, truncated)
        self._write("next_obs", rows, next_obs)
        self._advance(len(obs))

    # ----------------------------------------------------------------------------- sample

    def sample(self, batch_size: int) -> Batch:
        return self.gather(self.sample_indices(batch_size))

    def sample_indices(self, batch_size: int, *, upcoming: int = 0) -> torch.Tensor:
        """Uniform row indices, drawn as if ``upcoming`` more rows had been added already."""
        high = min(self.size + upcoming, self.capacity)
        if high < 1:
            raise ValueError("cannot sample from an empty replay buffer")
        return torch.randint(
            0, high, (batch_size,), device=self.storage_device, generator=self.generator
        )

    def hits_pending(self, idx: torch.Tensor, n: int) -> bool:
        """Whether ``idx`` touches a row the next add of ``n`` rows will write."""
        return bool(((idx - self.pos) % self.capacity < n).any())

    def gather(self, idx: torch.Tensor) -> Batch:
        """The transitions at rows ``idx``, on the training device."""
        # index_select: a row gather, ~4x faster than advanced indexing on a CPU
        batch = Batch(
            obs=self.obs.index_select(0, idx),
            actions=self.actions.index_select(0, idx),
            rewards=self.rewards.index_select(0, idx),
            next_obs=self._next_obs(idx),
            terminated=self.terminated.index_select(0, idx).float(),
            truncated=self.truncated.index_select(0, idx).float(),
        )
        if self.device == self.storage_device:
            return batch
        return Batch(*(t.to(self.device) for t in vars(batch).values()))

    def _next_obs(self, idx: torch.Tensor) -> torch.Tensor:
        return self.next_obs.index_select(0, idx)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.storage_device)

    # ------------------------------------------------------------------------ checkpoints

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        """The per-row storage, by name (what a checkpoint holds the filled rows of)."""
        names = ("obs", "next_obs", "actions", "rewards", "terminated", "truncated")
        return {name: getattr(self, name) for name in names}

    def rehome(self, rows: dict[str, torch.Tensor]) -> None:
        """Keep the per-row storage (``_row_tensors``) in the given tensors from now on,
        values copied: a population's buffers are rows of stacked storage (``StackedReplay``)
        while each stays an ordinary buffer (adds, samples, checkpoints)."""
        for name, mine in self._row_tensors().items():
            rows[name].copy_(mine)
            setattr(self, name, rows[name])

    def state_dict(self) -> dict[str, Any]:
        """The filled rows, write position and sampling RNG: plain tensors and ints only.

        Rows fill from 0 until the buffer is full, so the first ``size`` rows are all the
        data; they are copied out (saving a slice would save the whole preallocation).
        """
        rows = {
            k: (t if self.size == self.capacity else t[: self.size]).detach().clone().cpu()
            for k, t in self._row_tensors().items()
        }
        return {
            "kind": type(self).__name__,
            "capacity": self.capacity,
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "pos": self.pos,
            "size": self.size,
            "generator": self.generator.get_state(),
            "rows": rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (type(self).__name__, self.capacity, self.obs_dim, self.action_dim)
        theirs = tuple(state.get(k) for k in ("kind", "capacity", "obs_dim", "action_dim"))
        if mine != theirs:
            raise ValueError(
                "replay state does not fit this buffer: (kind, capacity, obs_dim, action_dim) "
                f"is {theirs}, this buffer is {mine}"
            )
        size = int(state["size"])
        for name, target in self._row_tensors().items():
            target[:size] = state["rows"][name].to(target.device)
        self.pos, self.size = int(state["pos"]), size
        self.generator.set_state(state["generator"])


class CompactReplayBuffer(ReplayBuffer):
    """A ``ReplayBuffer`` that stores each observation once (see the module docstring).

    Every add must have the same number of rows (the number of envs), and the capacity must
    hold at least two adds. Exact for any input: a next observation that is not, bit for
    bit, the following observation of its env is kept aside, whatever the reason.
    """

    def _allocate_next_obs(self) -> None:
        dev = self.storage_device
        self.final_slot = torch.full((self.capacity,), -1, dtype=torch.int32, device=dev)
        self.final_obs = torch.empty(0, self.obs_dim, dtype=torch.float32, device=dev)
        self._final_rows: collections.deque[int] = collections.deque()  # live, oldest first
        self._final_tail = 0  # slots handed out so far (slot = count % len(final_obs))
        self.n_rows: int | None = None  # rows per add, fixed by the first add
        self.recent_next = torch.empty(0, self.obs_dim, dtype=torch.float32, device=dev)
        self._recent_host: np.ndarray | None = None
        self._recent_start = 0
        # patch the rare rows by index after a host check (free on a CPU, a sync elsewhere)
        self.patch_on_host = self.storage_device.type == "cpu"

    @staticmethod
    def bytes_per_transition(obs_dim: int, action_dim: int) -> int:
        """Fixed storage per transition: obs, action, reward, 2 flags, a side-store index.

        Plus ``4 * obs_dim`` bytes per episode end (the true final observation).
        """
        return 4 * (obs_dim + action_dim + 1) + 2 + 4

    def _tensors(self) -> list[torch.Tensor]:
        return [
            self.obs,
            self.actions,
            self.rewards,
            self.terminated,
            self.truncated,
            self.final_slot,
            self.final_obs,
            self.recent_next,
        ]

    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> None:
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        next_obs = np.ascontiguousarray(next_obs, dtype=np.float32)
        n = len(obs)
        if self.n_rows is None:
            if 2 * n > self.capacity:
                raise ValueError(
                    f"a compact buffer needs capacity >= 2 x rows per add ({2 * n}), "
                    f"got {self.capacity}"
                )
            self.n_rows = n
            self.recent_next = torch.empty(n, self.obs_dim, device=self.storage_device)
        elif n != self.n_rows:
            raise ValueError(f"every add must have {self.n_rows} rows (one per env), got {n}")

        # The previous add's rows: where this add's observation is not bit for bit their
        # next observation (an episode ended, or anything else), keep it aside.
        if self._recent_host is not None:
            same = self._recent_host.view(np.uint32) == obs.view(np.uint32)
            broken = np.flatnonzero(~same.all(axis=1))
            if len(broken):
                rows = (self._recent_start + broken) % self.capacity
                self._store_final(rows, self._recent_host[broken])

        rows = self._rows(n)
        # rows about to be overwritten release their side-store slots (oldest first)
        while self._final_rows and (self._final_rows[0] - self.pos) % self.capacity < n:
            self._final_rows.popleft()
        self._write_common(rows, obs, actions, rewards, terminated, truncated)
        self._write("final_slot", rows, np.full(n, -1, dtype=np.int32))
        self._write("recent_next", slice(0, n), next_obs)
        self._recent_host = next_obs.copy()
        self._recent_start = self.pos
        self._advance(n)

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        names = ("obs", "actions", "rewards", "terminated", "truncated", "final_slot")
        return {name: getattr(self, name) for name in names}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["compact"] = {
            "final_obs": self.final_obs.detach().clone().cpu(),
            "final_rows": torch.tensor(list(self._final_rows), dtype=torch.int64),
            "final_tail": self._final_tail,
            "n_rows": self.n_rows,
            "recent_next": self.recent_next.detach().clone().cpu(),
            "recent_host": (
                None if self._recent_host is None else torch.from_numpy(self._recent_host.copy())
            ),
            "recent_start": self._recent_start,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        c, dev = state["compact"], self.storage_device
        self.final_obs = c["final_obs"].to(dev)
        self._final_rows = collections.deque(int(r) for r in c["final_rows"].tolist())
        self._final_tail = int(c["final_tail"])
        self.n_rows = None if c["n_rows"] is None else int(c["n_rows"])
        self.recent_next = c["recent_next"].to(dev)
        host = c["recent_host"]
        self._recent_host = None if host is None else host.numpy().copy()
        self._recent_start = int(c["recent_start"])

    def _store_final(self, rows: np.ndarray, values: np.ndarray) -> None:
        live = len(self._final_rows)
        size = self.final_obs.shape[0]
        if live + len(rows) > size:
            self._grow(max(2 * size, live + len(rows), 16))
            size = self.final_obs.shape[0]
        slots = (self._final_tail + np.arange(len(rows))) % size
        dev = self.storage_device
        slots_t = torch.as_tensor(slots, device=dev)
        self.final_obs[slots_t] = self._tensor(values)
        self.final_slot[torch.as_tensor(rows, device=dev)] = slots_t.to(torch.int32)
        self._final_tail += len(rows)
        self._final_rows.extend(int(r) for r in rows)

    def _grow(self, new_size: int) -> None:
        """Reallocate the side store, live entries first in order; remap their rows."""
        old = self.final_obs
        live = len(self._final_rows)
        grown = torch.empty(new_size, self.obs_dim, dtype=torch.float32, device=old.device)
        if live:
            start = self._final_tail - live
            old_slots = torch.arange(start, start + live, device=old.device) % old.shape[0]
            grown[:live] = old[old_slots]
            rows = torch.as_tensor(list(self._final_rows), device=old.device)
            self.final_slot[rows] = torch.arange(live, dtype=torch.int32, device=old.device)
        self.final_obs = grown
        self._final_tail = live

    def _next_obs(self, idx: torch.Tensor) -> torch.Tensor:
        assert self.n_rows is not None
        n = self.n_rows
        out = self.obs.index_select(0, (idx + n) % self.capacity)
        kept = self.final_slot.index_select(0, idx) if self.final_obs.shape[0] else None
        # the newest rows: their next observation has no row yet
        j = (idx - self._recent_start) % self.capacity
        return _patch_next_obs(
            out,
            kept,
            self.final_obs,
            j < n,
            j.clamp(max=n - 1),
            self.recent_next,
            self.patch_on_host,
        )


def _patch_next_obs(
    out: torch.Tensor,
    kept: torch.Tensor | None,
    aside: torch.Tensor,
    newest: torch.Tensor,
    newest_at: torch.Tensor,
    recent: torch.Tensor,
    on_host: bool,
) -> torch.Tensor:
    """The compact buffer's next observations: ``out`` (read from the following rows) where
    ``kept`` (a side-store slot per row, -1 for none; None: the side store is empty) points
    into ``aside`` take that, and the ``newest`` rows take ``recent[newest_at]``. On the host
    the rare rows are patched in place after a check; elsewhere the same selection is made
    without a device-to-host sync."""
    if on_host:
        if kept is not None and bool((kept >= 0).any()):
            rows = (kept >= 0).nonzero().squeeze(1)
            out[rows] = aside.index_select(0, kept.index_select(0, rows).long())
        if bool(newest.any()):
            rows = newest.nonzero().squeeze(1)
            out[rows] = recent.index_select(0, newest_at.index_select(0, rows))
        return out
    if kept is not None:
        kept_obs = aside.index_select(0, kept.clamp(min=0).long())
        out = torch.where((kept >= 0).unsqueeze(-1), kept_obs, out)
    return torch.where(newest.unsqueeze(-1), recent.index_select(0, newest_at), out)


def stand_ins(indices: list[torch.Tensor | None]) -> list[tuple[int, torch.Tensor]]:
    """(owner, indices) per member: its own, or for a member without indices (it does not
    learn now) the first learning member's, so every row of a stacked batch is real data."""
    first = next(k for k, i in enumerate(indices) if i is not None)
    return [(k, i) if i is not None else (first, indices[first]) for k, i in enumerate(indices)]  # type: ignore[misc]


class StackedReplay:
    """K members' buffers of one kind and capacity, their rows in stacked ``(K, capacity,
    ...)`` storage: one gather gives every member's batch with a leading K axis.

    Each member still draws its indices from its own generator (``sample_indices``), so a
    member's batch is the very batch its buffer would give alone.
    """

    def __init__(self, buffers: list[ReplayBuffer]):
        first = buffers[0]
        self.k, self.capacity = len(buffers), first.capacity
        self.storage = {
            name: torch.empty((self.k, *t.shape), dtype=t.dtype, device=t.device)
            for name, t in first._row_tensors().items()
        }
        self.buffers: list[ReplayBuffer] = []
        for k, buffer in enumerate(buffers):
            self.buffers.append(buffer)
            self.replace(k, buffer)

    @staticmethod
    def fits(buffers: list[ReplayBuffer]) -> bool:
        """Whether these buffers can share stacked storage (same kind, capacity, shapes,
        sampled where they are stored)."""
        first = buffers[0]
        key = (type(first), first.capacity, first.obs_dim, first.action_dim, first.device)
        return all(
            (type(b), b.capacity, b.obs_dim, b.action_dim, b.device) == key
            and b.storage_device == b.device
            for b in buffers
        )

    def replace(self, k: int, buffer: ReplayBuffer) -> None:
        """Slot ``k``'s buffer from now on (its rows copied into the slot's storage)."""
        if not self.fits([self.buffers[0] if k else buffer, buffer]):
            raise ValueError(f"member {k}: its replay buffer does not fit the stacked storage")
        buffer.rehome({name: rows[k] for name, rows in self.storage.items()})
        self.buffers[k] = buffer

    def _compact_next_obs(
        self, idx: torch.Tensor, owners: list[int], offsets: torch.Tensor
    ) -> torch.Tensor:
        """``CompactReplayBuffer._next_obs`` for every member at once: the side stores and
        newest observations of the members laid end to end, their slots shifted to match."""
        buffers: list[CompactReplayBuffer] = [self.buffers[k] for k in owners]  # type: ignore[misc]
        n = buffers[0].n_rows
        assert n is not None
        k, b = idx.shape
        offsets = offsets.unsqueeze(1)
        out = self._take("obs", ((idx + n) % self.capacity + offsets).view(-1), b).view(k * b, -1)
        sizes = [buf.final_obs.shape[0] for buf in buffers]
        kept = None
        if any(sizes):
            kept = self._take("final_slot", (idx + offsets).view(-1), b).long()
            start = torch.tensor([0, *sizes[:-1]], device=idx.device).cumsum(0).unsqueeze(1)
            kept = torch.where(kept >= 0, kept + start, kept).view(-1)
        starts = torch.tensor([buf._recent_start for buf in buffers], device=idx.device)
        j = (idx - starts.unsqueeze(1)) % self.capacity
        at = j.clamp(max=n - 1) + torch.arange(k, device=idx.device).unsqueeze(1) * n
        out = _patch_next_obs(
            out,
            kept,
            torch.cat([buf.final_obs for buf in buffers]),
            (j < n).view(-1),
            at.view(-1),
            torch.cat([buf.recent_next for buf in buffers]),
            buffers[0].patch_on_host,
        )
        return out.view(k, b, -1)

    def _take(self, name: str, flat_idx: torch.Tensor, b: int) -> torch.Tensor:
        t = self.storage[name]
        rows = t.view(self.k * self.capacity, *t.shape[2:]).index_select(0, flat_idx)
        return rows.view(self.k, b, *t.shape[2:])

    def gather(self, indices: list[torch.Tensor | None]) -> Batch:
        """Every member's batch at its row indices, stacked ``(K, B, ...)``. A member without
        indices (it does not learn now) gets another member's batch, to be ignored."""
        slots = stand_ins(indices)
        idx = torch.stack([i for _, i in slots])
        b = idx.shape[1]
        offsets = torch.tensor([k for k, _ in slots], device=idx.device) * self.capacity
        flat = (idx + offsets.unsqueeze(1)).view(-1)
        if isinstance(self.buffers[0], CompactReplayBuffer):
            next_obs = self._compact_next_obs(idx, [k for k, _ in slots], offsets)
        else:
            next_obs = self._take("next_obs", flat, b)
        return Batch(
            obs=self._take("obs", flat, b),
            actions=self._take("actions", flat, b),
            rewards=self._take("rewards", flat, b),
            next_obs=next_obs,
            terminated=self._take("terminated", flat, b).float(),
            truncated=self._take("truncated", flat, b).float(),
        )


def make_replay_buffer(
    capacity: int,
    obs_dim: int,
    action_dim: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    compact: bool = True,
    storage: str = "device",
) -> ReplayBuffer:
    """The buffer a run's ``perf`` settings ask for (compact or not, on device or host)."""
    if storage not in ("device", "host"):
        raise ValueError(f"storage must be 'device' or 'host', got {storage!r}")
    cls = CompactReplayBuffer if compact else ReplayBuffer
    return cls(
        capacity,
        obs_dim,
        action_dim,
        device=device,
        seed=seed,
        storage_device="cpu" if storage == "host" else None,
    )
