"""Run configuration: the dataclasses a YAML recipe fills (run.py), read from YAML with overrides and presets
(load.py, methods.py, paths.py), the run directory's rules (run_dir.py) and the DeepSpeed JSON checks
(deepspeed.py)."""
