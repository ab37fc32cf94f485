"""Width surgery: students cut from a teacher's weights, and HomoDistil's pruning while a student distils. Which
tensor axes belong to which width space is models/spaces.py.

shapes.py       the widths of one model, read from its config
cut.py          a plan of what a student keeps, and the student's tensors cut from the teacher's
importance.py   units ranked by the teacher's activations on calibration batches (Minitron)
prune.py        HomoDistil: masks, sensitivity scores and the schedule, the dense export
students.py     `make_student` and `from_teacher.strategy: sliced`: the whole job, `--target_params` proposals
"""
