"""``hydra/launcher=ray``: ``workbench train -m ...`` with each job a Ray task."""
