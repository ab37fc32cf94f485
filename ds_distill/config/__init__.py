"""Run configuration: the dataclasses a YAML recipe fills (run.py), read from YAML with overrides and presets
(load.py, methods.py, paths.py), every key listed with its type, default and docstring (keys.py: `ds-distill
keys`), the run directory's rules (run_dir.py) and the DeepSpeed JSON checks (deepspeed.py)."""
