"""Replay buffers preallocated on the training device, as rows of one stacked storage.

A ``ReplayStorage`` owns the rows of K members' buffers as ``(K, capacity, ...)`` tensors;
one ``gather`` gives every member's batch with a leading K axis. A ``ReplayBuffer`` is one
member's row: it writes its transitions there, draws its indices from its own generator
(so a member's batch is the batch it would get alone) and checkpoints its own rows. A run
trained alone is a storage of one row, through the same gather.

Transitions are written and sampled as tensors on the device, so a training step never
round-trips a batch through the host (``storage_device="cpu"`` keeps them on the host instead
and copies each batch over: the plain path, for comparison). ``terminated`` and
``truncated`` are stored apart: the target bootstraps through time-limit truncation and only
stops at true termination. Observations are stored raw and exactly (float32); normalization
is applied at sampling time so that changing statistics never leave stale normalized data.

A compact storage (``CompactReplayBuffer`` rows) stores each observation once: a
transition's next observation is, bit for bit, the observation its env reported at the
following step, so it is read from that row (``n_envs`` rows further on). Where it is not
(an episode ended: under SAME_STEP autoreset the next row holds the reset observation) the
true next observation is kept in a small side store. That halves the observation memory:
1M HalfCheetah transitions take ~138 MB instead of ~238 MB.

Sampling is split into drawing indices and gathering them, so the training loop can start
an update while the envs are still stepping: as long as the drawn indices avoid the rows the
next ``add`` will write (``hits_pending``), the batch is the one it would get after the add.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from workbench import seeding

_NUMPY_DTYPES = {torch.float32: np.float32, torch.bool: np.bool_, torch.int32: np.int32}


@dataclass(frozen=True)
class Batch:
    obs: torch.Tensor  # (B, obs_dim), or (K, B, obs_dim) for K members
    actions: torch.Tensor  # (B, action_dim), normalized units
    rewards: torch.Tensor  # (B,)
    next_obs: torch.Tensor  # (B, obs_dim)
    terminated: torch.Tensor  # (B,) float 0/1: cut the bootstrap
    truncated: torch.Tensor  # (B,) float 0/1: kept for analysis; the target bootstraps

    def member(self, k: int) -> Batch:
        """Member ``k``'s rows of a stacked batch (views)."""
        return Batch(*(getattr(self, f.name)[k] for f in fields(self)))


class ReplayStorage:
    """The rows of K members' buffers (one kind, capacity and shape): ``(K, capacity, ...)``
    tensors, and the one gather that reads them.

    ``compact``: each observation is stored once (``CompactReplayBuffer`` rows; see the
    module docstring). ``storage_device``: where the rows live, if not where batches are
    used (``device``).
    """

    def __init__(
        self,
        k: int,
        capacity: int,
        obs_dim: int,
        action_dim: int,
        *,
        compact: bool = True,
        device: torch.device | str = "cpu",
        storage_device: torch.device | str | None = None,
    ):
        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.k, self.capacity = int(k), int(capacity)
        self.obs_dim, self.action_dim = int(obs_dim), int(action_dim)
        self.compact = compact
        self.device = torch.device(device)  # where batches are used
        self.storage_device = torch.device(storage_device or device)  # where rows live
        shape = (self.k, self.capacity)
        f32 = {"dtype": torch.float32, "device": self.storage_device}
        flag = {"dtype": torch.bool, "device": self.storage_device}
        self.rows: dict[str, torch.Tensor] = {
            "obs": torch.empty(*shape, self.obs_dim, **f32),
            "actions": torch.empty(*shape, self.action_dim, **f32),
            "rewards": torch.empty(*shape, **f32),
            "terminated": torch.empty(*shape, **flag),
            "truncated": torch.empty(*shape, **flag),
        }
        if compact:  # a side-store slot per row (-1: the next observation is the next row's)
            self.rows["final_slot"] = torch.full(
                shape, -1, dtype=torch.int32, device=self.storage_device
            )
        else:
            self.rows["next_obs"] = torch.empty(*shape, self.obs_dim, **f32)
        # the same memory seen as one (K * capacity, ...) table: one gather reads every row
        self._tables = {
            name: t.view(self.k * self.capacity, *t.shape[2:]) for name, t in self.rows.items()
        }
        # and each slot's rows, (1, capacity, ...): one buffer's gather reads along them
        self._slot_rows = [
            {name: t[k : k + 1] for name, t in self.rows.items()} for k in range(self.k)
        ]
        self.buffers: list[ReplayBuffer | None] = [None] * self.k
        self._repeats: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
        # compact gathers patch the rare rows by index after a host check (free on a CPU, a
        # sync elsewhere, where the same selection runs without one)
        self.patch_on_host = self.storage_device.type == "cpu"

    def buffer(self, slot: int, seed: int) -> ReplayBuffer:
        """A new, empty buffer on row ``slot`` (what the row held before is dropped)."""
        cls = CompactReplayBuffer if self.compact else ReplayBuffer
        buffer = cls(self, slot, seed)
        self.buffers[slot] = buffer
        return buffer

    def gather(self, indices: Sequence[torch.Tensor | None]) -> Batch:
        """Every member's batch at its row indices, stacked ``(K, B, ...)``. A member without
        indices (it does not update now) gets another member's batch, to be ignored."""
        if self.k == 1 and indices[0] is not None:
            return self.read([0], indices[0])
        owners = stand_ins(indices)
        return self.read([k for k, _ in owners], torch.cat([i for _, i in owners]))

    def read(self, slots: Sequence[int], idx: torch.Tensor) -> Batch:
        """For each buffer in ``slots``, its rows at its B of the indices ``idx`` (the
        buffers' indices one after another): a batch stacked ``(len(slots), B, ...)``."""
        at = idx
        if len(slots) > 1:  # rows of the storage seen as one table
            at = idx + self._repeat([k * self.capacity for k in slots], idx)
        take = self._taker(slots)
        next_obs = self._compact_next_obs(slots, idx, at, take) if self.compact else None
        batch = Batch(
            obs=take("obs", at),
            actions=take("actions", at),
            rewards=take("rewards", at),
            next_obs=take("next_obs", at) if next_obs is None else next_obs,
            terminated=take("terminated", at).float(),
            truncated=take("truncated", at).float(),
        )
        if self.device == self.storage_device:
            return batch
        return Batch(*(t.to(self.device) for t in vars(batch).values()))

    def _taker(self, slots: Sequence[int]) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """``take(name, at)``: rows ``at`` of ``name`` as (len(slots), B, ...): of one
        buffer's row (indices into its capacity), or of the storage seen as one table
        (indices into K * capacity)."""
        if len(slots) == 1:
            rows = self._slot_rows[slots[0]]
            return lambda name, at: rows[name].index_select(1, at)
        r = len(slots)
        return lambda name, at: (
            self._tables[name].index_select(0, at).view(r, -1, *self._tables[name].shape[1:])
        )

    def _repeat(self, values: Sequence[int], idx: torch.Tensor) -> torch.Tensor:
        """``values``, each once per row of a member's batch in ``idx`` (made once)."""
        key = (tuple(values), idx.numel() // len(values))
        if key not in self._repeats:
            self._repeats[key] = torch.tensor(values, device=idx.device).repeat_interleave(key[1])
        return self._repeats[key]

    def _compact_next_obs(
        self,
        slots: Sequence[int],
        idx: torch.Tensor,
        at: torch.Tensor,
        take: Callable[[str, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The next observation of each row: the following row's observation, or where that
        is not it, the side store's; for the newest rows (no following row yet) what the
        buffer's last add reported. The buffers' side stores are read as one, end to end."""
        buffers: list[CompactReplayBuffer] = [self.buffers[k] for k in slots]  # type: ignore[misc]
        r, n = len(slots), buffers[0].n_rows
        if n is None:
            raise ValueError("cannot sample from an empty replay buffer")
        following = (idx + n) % self.capacity
        if r > 1:
            following += at - idx
        stacked = take("obs", following)
        out = stacked.view(-1, self.obs_dim)  # the same memory: patched in place below
        sizes = [buf.final_obs.shape[0] for buf in buffers]
        kept = None
        if any(sizes):
            kept = take("final_slot", at).view(-1)
            if r > 1:  # each buffer's slots, shifted to where its side store lies in the cat
                start = torch.tensor([0, *sizes[:-1]], device=idx.device).cumsum(0)
                b = idx.numel() // r
                kept = torch.where(kept >= 0, kept + start.repeat_interleave(b), kept)
        if r == 1:
            aside, recent = buffers[0].final_obs, buffers[0].recent_next
            j = (idx - buffers[0].recent_start) % self.capacity
            newest_at = j.clamp(max=n - 1)
        else:
            aside = torch.cat([x.final_obs for x in buffers])
            recent = torch.cat([x.recent_next for x in buffers])
            starts = torch.tensor([x.recent_start for x in buffers], device=idx.device)
            j = (idx - starts.repeat_interleave(idx.numel() // r)) % self.capacity
            # each buffer's newest rows lie at its place in the cat of their next observations
            newest_at = j.clamp(max=n - 1) + self._repeat([i * n for i in range(r)], idx)
        newest = j < n
        if self.patch_on_host:
            aside_rows = kept >= 0 if kept is not None else None
            if aside_rows is not None and bool(aside_rows.any()):
                rows = aside_rows.nonzero().squeeze(1)
                out[rows] = aside.index_select(0, kept.index_select(0, rows))  # type: ignore[union-attr]
            if bool(newest.any()):
                rows = newest.nonzero().squeeze(1)
                out[rows] = recent.index_select(0, newest_at.index_select(0, rows))
            return stacked
        if kept is not None:
            kept_obs = aside.index_select(0, kept.clamp(min=0))
            out = torch.where((kept >= 0).unsqueeze(-1), kept_obs, out)
        out = torch.where(newest.unsqueeze(-1), recent.index_select(0, newest_at), out)
        return out.view(r, -1, self.obs_dim)


def stand_ins(indices: Sequence[torch.Tensor | None]) -> list[tuple[int, torch.Tensor]]:
    """(owner, indices) per member: its own, or for a member without indices (it does not
    update now) the first updating member's, so every row of a stacked batch is real data."""
    first = next(k for k, i in enumerate(indices) if i is not None)
    return [(k, i) if i is not None else (first, indices[first]) for k, i in enumerate(indices)]  # type: ignore[misc]


class ReplayBuffer:
    """One member's ring of transitions, one row per env per step, sampled uniformly: row
    ``slot`` of a ``ReplayStorage``."""

    def __init__(self, storage: ReplayStorage, slot: int, seed: int):
        self.storage, self.slot = storage, slot
        self.capacity = storage.capacity
        self.obs_dim, self.action_dim = storage.obs_dim, storage.action_dim
        self.device, self.storage_device = storage.device, storage.storage_device
        # this member's rows: views of the storage
        self.rows: dict[str, torch.Tensor] = {name: t[slot] for name, t in storage.rows.items()}
        # on the host, the same memory as NumPy arrays (written through without a tensor op)
        self.host: dict[str, np.ndarray] = (
            {name: t.numpy() for name, t in self.rows.items()}
            if self.storage_device.type == "cpu"
            else {}
        )
        self.pos = 0  # next write index
        self.size = 0
        # its own stream of the run seed (workbench.seeding): not in lockstep with another
        self.generator = seeding.torch_generator(seed, "replay", self.storage_device)

    def __len__(self) -> int:
        return self.size

    @staticmethod
    def bytes_per_transition(obs_dim: int, action_dim: int) -> int:
        """Fixed storage per transition: obs and next obs, action, reward (float32), 2 flags."""
        return 4 * (2 * obs_dim + action_dim + 1) + 2

    @property
    def nbytes(self) -> int:
        """Bytes held for this buffer now (its rows of the storage, and any side store)."""
        return sum(t.element_size() * t.nelement() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return list(self.rows.values())

    # ------------------------------------------------------------------------------ write

    def _slots(self, n: int) -> torch.Tensor | slice:
        """Where the next add of ``n`` rows writes: a slice, or indices when it wraps around."""
        if self.pos + n <= self.capacity:
            return slice(self.pos, self.pos + n)
        idx = (torch.arange(n) + self.pos) % self.capacity
        return idx.to(self.storage_device)

    def _write(self, name: str, at: torch.Tensor | slice, values: np.ndarray) -> None:
        """``values`` into rows ``at`` of the tensor ``name`` (cast to its dtype).

        On the host a slice is written through a NumPy view of the same memory: a few
        microseconds, where a tensor index_put costs tens (one add writes five or six).
        """
        if isinstance(at, slice) and self.host:
            self.host[name][at] = values
        else:
            target = self.rows[name]
            host = np.asarray(values, dtype=_NUMPY_DTYPES[target.dtype])
            target[at] = torch.as_tensor(host, device=target.device)

    def _write_common(
        self,
        at: torch.Tensor | slice,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
    ) -> None:
        self._write("obs", at, obs)
        self._write("actions", at, actions)
        self._write("rewards", at, rewards)
        self._write("terminated", at, terminated)
        self._write("truncated", at, truncated)

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
        at = self._slots(len(obs))
        self._write_common(at, obs, actions, rewards, terminated, truncated)
        self._write("next_obs", at, next_obs)
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
        """The transitions at rows ``idx``, on the training device (the storage's gather)."""
        return self.storage.read([self.slot], idx).member(0)

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The filled rows, write position and sampling RNG: plain tensors and ints only.

        Rows fill from 0 until the buffer is full, so the first ``size`` rows are all the
        data; they are copied out (saving a view would save the whole storage).
        """
        rows = {
            k: (t if self.size == self.capacity else t[: self.size]).detach().clone().cpu()
            for k, t in self.rows.items()
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
        for name, target in self.rows.items():
            target[:size] = state["rows"][name].to(target.device)
        self.pos, self.size = int(state["pos"]), size
        self.generator.set_state(state["generator"])


class CompactReplayBuffer(ReplayBuffer):
    """A ``ReplayBuffer`` row of a compact storage: each observation stored once (see the
    module docstring); the next observations that are not the following row's are kept in
    this buffer's side store, and the storage's gather reads them from there.

    Every add must have the same number of rows (the number of envs), and the capacity must
    hold at least two adds. Exact for any input: a next observation that is not, bit for
    bit, the following observation of its env is kept aside, whatever the reason.
    """

    def __init__(self, storage: ReplayStorage, slot: int, seed: int):
        super().__init__(storage, slot, seed)
        dev = self.storage_device
        self.rows["final_slot"].fill_(-1)
        self.final_obs = torch.empty(0, self.obs_dim, dtype=torch.float32, device=dev)
        self._final_rows: collections.deque[int] = collections.deque()  # live, oldest first
        self._final_tail = 0  # slots handed out so far (slot = count % len(final_obs))
        self.n_rows: int | None = None  # rows per add, fixed by the first add
        # the last add's next observations (the newest rows have no following row yet),
        # and the row that add started at
        self.recent_next = torch.empty(0, self.obs_dim, dtype=torch.float32, device=dev)
        self.recent_start = 0
        self._recent_host: np.ndarray | None = None

    @staticmethod
    def bytes_per_transition(obs_dim: int, action_dim: int) -> int:
        """Fixed storage per transition: obs, action, reward, 2 flags, a side-store index.

        Plus ``4 * obs_dim`` bytes per episode end (the true final observation).
        """
        return 4 * (obs_dim + action_dim + 1) + 2 + 4

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.rows.values(), self.final_obs, self.recent_next]

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
                rows = (self.recent_start + broken) % self.capacity
                self._store_final(rows, self._recent_host[broken])

        at = self._slots(n)
        # rows about to be overwritten release their side-store slots (oldest first)
        while self._final_rows and (self._final_rows[0] - self.pos) % self.capacity < n:
            self._final_rows.popleft()
        self._write_common(at, obs, actions, rewards, terminated, truncated)
        self._write("final_slot", at, np.full(n, -1, dtype=np.int32))
        if self.storage_device.type == "cpu":
            self.recent_next.numpy()[:] = next_obs
        else:
            self.recent_next.copy_(torch.as_tensor(next_obs, device=self.storage_device))
        self._recent_host = next_obs.copy()
        self.recent_start = self.pos
        self._advance(n)

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
            "recent_start": self.recent_start,
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
        self.recent_start = int(c["recent_start"])

    def _store_final(self, rows: np.ndarray, values: np.ndarray) -> None:
        live = len(self._final_rows)
        size = self.final_obs.shape[0]
        if live + len(rows) > size:
            self._grow(max(2 * size, live + len(rows), 16))
            size = self.final_obs.shape[0]
        slots = (self._final_tail + np.arange(len(rows))) % size
        dev = self.storage_device
        slots_t = torch.as_tensor(slots, device=dev)
        self.final_obs[slots_t] = torch.as_tensor(np.asarray(values, np.float32), device=dev)
        self.rows["final_slot"][torch.as_tensor(rows, device=dev)] = slots_t.to(torch.int32)
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
            self.rows["final_slot"][rows] = torch.arange(live, dtype=torch.int32, device=old.device)
        self.final_obs = grown
        self._final_tail = live


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
    """One buffer of its own (a storage of one row), as a run's ``perf`` settings ask for."""
    return make_storage(
        1, capacity, obs_dim, action_dim, device=device, compact=compact, storage=storage
    ).buffer(0, seed)


def make_storage(
    k: int,
    capacity: int,
    obs_dim: int,
    action_dim: int,
    *,
    device: torch.device | str = "cpu",
    compact: bool = True,
    storage: str = "device",
) -> ReplayStorage:
    """The storage of K members' buffers (compact or not, on the device or the host)."""
    if storage not in ("device", "host"):
        raise ValueError(f"storage must be 'device' or 'host', got {storage!r}")
    return ReplayStorage(
        k,
        capacity,
        obs_dim,
        action_dim,
        compact=compact,
        device=device,
        storage_device="cpu" if storage == "host" else None,
    )
