"""`ds-distill plan`: memory per GPU and node for each teacher and student placement, before a launch. memory.py
counts each part of a placement, trace.py traces a training step's peak of live tensors on the CPU, plan.py
weighs every placement against the hardware, report.py writes what the user reads. The names below are what the
command and the benchmarks use."""

from ds_distill.planner.memory import GB, Hardware, ModelSize, Placement, student_cost, teacher_cost
from ds_distill.planner.plan import host_memory_gb, make_plan, make_students_plan, tokenizer_size
from ds_distill.planner.report import advice, report

__all__ = ["GB", "Hardware", "ModelSize", "Placement", "advice", "host_memory_gb", "make_plan", "make_students_plan",
           "report", "student_cost", "teacher_cost", "tokenizer_size"]  # fmt: skip
