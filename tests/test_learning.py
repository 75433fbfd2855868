"""Learning quality (slow: deselected by default; run with ``pytest -m slow``).

The benchmark with numbers is ``workbench learning-check``; these guard the same behaviour
in a form CI can run on demand.
"""

import pytest

from workbench.config import compose
from workbench.train import train


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["ddpg", "td3"])
def test_default_run_learns_pendulum(agent):
    """The first-impression run: Pendulum from about -1200 (random) to better than -400."""
    cfg = compose([f"agent={agent}", "tracking=none", "eval.video=false", "progress=false"])
    result = train(cfg)
    assert result.eval_returns[0] < -600  # it starts out bad...
    assert result.final_return_mean > -400  # ...and learns


@pytest.mark.slow
def test_pybullet_swingup_improves():
    cfg = compose(
        [
            "env=inverted_pendulum_swingup",
            "agent=td3",
            "agent.actor_hidden=[64,64]",
            "agent.critic_hidden=[64,64]",
            "agent.learning_starts=1000",
            "total_steps=20000",
            "eval.every=5000",
            "eval.episodes=3",
            "tracking=none",
            "eval.video=false",
            "progress=false",
        ]
    )
    result = train(cfg)
    assert result.final_return_mean > result.eval_returns[0] + 100
