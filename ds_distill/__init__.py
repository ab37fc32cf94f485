"""ds_distill: distil large language models into small ones on DeepSpeed.

A frozen teacher runs under ZeRO-Inference (ZeRO-3, parameters offloadable to CPU or NVMe) beside a student
trained under ZeRO-2 or ZeRO-3, each with its own DeepSpeed config. Start with `ds-distill demo`, then
`ds-distill list` and `ds-distill distill --help`.
"""

__version__ = "0.1.0"
