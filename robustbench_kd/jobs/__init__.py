"""The jobs behind the commands: ``distill`` (train, evaluate, write), ``evaluate`` (any model), ``quickstart``.

The only package that joins training, evaluation, submission and reports; the CLI calls it.

May import every layer below it (``training``, ``config``, ``analysis``, ``evaluation``, ``submission`` and
the rest); only ``cli`` imports it.
"""
