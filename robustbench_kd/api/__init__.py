"""The Python API: distil, evaluate and load students from a script or a notebook.

Each function does what the command of the same name does (the commands are thin wrappers over them),
takes keyword arguments named as in ``robustbench`` where the two overlap, and raises the same one-line
:class:`~robustbench_kd.errors.UserError` the command prints (without the program prefix)::

    import robustbench_kd as rbkd

    run = rbkd.distill("examples/digits_rslad.toml", overrides=["optim.epochs=5"])
    result = rbkd.evaluate(run.student, dataset="digits", threat_model="Linf", eps=0.2, n_examples=500)
    student = rbkd.load_student(run.run_dir)
    sweep = rbkd.distill_seeds("examples/digits_rslad.toml", [0, 1, 2])   # one run per seed + aggregate
    print(rbkd.compare([sweep.sweep_dir, "runs/other_sweep"]).markdown())  # intervals and paired verdicts

May import every layer below the command line; the command line and the test helpers import this.
"""

from robustbench_kd.api.compare import compare
from robustbench_kd.api.evaluation import EvalResult, evaluate
from robustbench_kd.api.reproduce import Reproduction, reproduce
from robustbench_kd.api.runs import RunResult, distill
from robustbench_kd.api.students import load_student
from robustbench_kd.api.sweep import SweepResult, distill_seeds

__all__ = [
    "EvalResult",
    "Reproduction",
    "RunResult",
    "SweepResult",
    "compare",
    "distill",
    "distill_seeds",
    "evaluate",
    "load_student",
    "reproduce",
]
