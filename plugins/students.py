"""Built-in student architectures (see :mod:`robustbench_kd.students`)."""

from __future__ import annotations

from functools import partial

from robustbench_kd.hookspecs import hookimpl


@hookimpl
def rbkd_register_students(registry):
    from robustbench_kd.students import BUILTIN_STUDENTS, build_student

    for name, spec in BUILTIN_STUDENTS.items():
        registry.add(name, partial(build_student, name), description=spec.description)
