"""Run configuration: the dataclasses a YAML recipe fills (run.py) and the DeepSpeed JSON checks (deepspeed.py)."""
