"""Several processes training and logging to one embedded store at once lose nothing."""

import logging
import multiprocessing as mp

from mlflow.tracking import MlflowClient

from workbench.tracking import embedded_uri

STEPS, LOG_EVERY, STARTS, EVAL_EVERY = 1000, 20, 200, 500


def _train_in_worker(args):
    store_dir, seed = args
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger().addHandler(Keep(level=logging.WARNING))
    from workbench.config import compose
    from workbench.train import train

    cfg = compose(
        [
            f"tracking.dir={store_dir}",
            "tracking.experiment=concurrent",  # all four create it at once
            f"tracking.log_every={LOG_EVERY}",
            "tracking.flush_every_s=0.05",  # many small concurrent writes
            f"total_steps={STEPS}",
            f"agent.learning_starts={STARTS}",
            f"eval.every={EVAL_EVERY}",
            "eval.episodes=1",
            "eval.video=false",
            "agent.actor_hidden=[16]",
            "agent.critic_hidden=[16]",
            "agent.batch_size=32",
            "progress=false",
            f"seed={seed}",
        ]
    )
    result = train(cfg)
    return result.run_id, result.status, records


def test_four_processes_log_to_a_fresh_store_without_losing_points(tmp_path):
    store = tmp_path / "mlruns"
    with mp.get_context("spawn").Pool(4) as pool:
        outcomes = pool.map(_train_in_worker, [(str(store), s) for s in range(4)])
    messages = [m for _, _, records in outcomes for m in records]
    assert not [m for m in messages if "locked" in m.lower()], messages
    assert [status for _, status, _ in outcomes] == ["FINISHED"] * 4

    client = MlflowClient(embedded_uri(store))
    assert len(client.search_experiments(filter_string="name = 'concurrent'")) == 1
    n_logs = STEPS // LOG_EVERY
    expected = {
        "explore/sigma": n_logs,
        "perf/sps": n_logs,
        "loss/critic": (STEPS - STARTS) // LOG_EVERY + 1,
        "train/episode_return": STEPS // 200,  # Pendulum episodes are 200 steps
        "eval/return_mean": STEPS // EVAL_EVERY,
    }
    for run_id, _, _ in outcomes:
        counts = {key: len(client.get_metric_history(run_id, key)) for key in expected}
        assert counts == expected, run_id
