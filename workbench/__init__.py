"""workbench: DDPG/TD3 research workbench."""
