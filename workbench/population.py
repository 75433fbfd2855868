"""What may share a population: the one rule, wherever runs are batched.

The members of a population train as one program: one learner (``ddpg.DDPG``, K slots) and
one replay storage (``replay.ReplayStorage``, K rows), built from member 0's values. So every
member must agree with member 0 on each ``SHARED_KEYS`` key: what sets a tensor's shape (net
sizes, activation, layer norm, critics, batch size, buffer size, the env's observation and
action sizes), where the tensors live (device, replay storage and layout) and how the step
runs (compile). Everything else (learning rates, tau, gamma, noise, schedules, seeds, learning
starts, steps, ...) is each member's own.

``problems`` lists each disagreement as a ``Problem`` (member, key, why); ``train_population``,
its refill, ``tune --population`` and ``ablate --population`` all ask it, and the replay
storage relies on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from workbench.config import Config, get_key

SHARED_KEYS = (
    "agent.actor_hidden",
    "agent.critic_hidden",
    "agent.activation",
    "agent.layer_norm",
    "agent.n_critics",
    "agent.batch_size",
    "agent.buffer_size",
    "env.id",
    "env.n_envs",
    "env.time_feature",
    "env.kwargs",
    "device",
    "perf.compile",
    "perf.compile_mode",
    "perf.cuda_graphs",
    "perf.replay_compact",
    "perf.replay_storage",
)

# Config groups whose options set shared keys (the env; the agent's critics)
SHARED_GROUPS = ("env", "agent")


@dataclass(frozen=True)
class Problem:
    """Why a member cannot join: its value of ``key`` differs from member 0's."""

    member: int
    key: str
    why: str

    def __str__(self) -> str:
        return f"member {self.member}: {self.key}: {self.why}"


def problems(configs: Sequence[Config]) -> list[Problem]:
    """Each member's disagreement with member 0 on a shared key, in member order."""
    out = []
    first = configs[0]
    for k, cfg in enumerate(configs[1:], start=1):
        for key in SHARED_KEYS:
            mine, theirs = get_key(cfg, key), get_key(first, key)
            if mine != theirs:
                out.append(
                    Problem(
                        k,
                        key,
                        f"{mine!r} is not member 0's {theirs!r}; members of one population "
                        "share it (members that differ here train in separate populations)",
                    )
                )
    return out


def is_shared(key: str) -> bool:
    """Whether a dotted key, or a config group, sets something members must share."""
    return key in SHARED_KEYS or key in SHARED_GROUPS


def shared_values(cfg: Config) -> str:
    """The values of ``SHARED_KEYS``, as one comparable key (runs alike here may share)."""
    return json.dumps({key: get_key(cfg, key) for key in SHARED_KEYS}, sort_keys=True, default=repr)
