"""`ds-distill plan`: memory per GPU and node for each teacher and student placement (plan.py), from a traced step
(trace.py)."""
