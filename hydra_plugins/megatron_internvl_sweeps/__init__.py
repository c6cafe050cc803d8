"""Hydra plugins of megatron-internvl (found by Hydra's plugin discovery in `hydra_plugins`):
the scaling-law sweeper and the project's launcher. Their logic is in megatron_internvl.sweeps."""
