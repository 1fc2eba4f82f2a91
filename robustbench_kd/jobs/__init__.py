"""The jobs behind the commands: ``distill`` (train, evaluate, write), ``evaluate`` (any model), ``quickstart``.

The only package that joins training, evaluation, submission and reports; the CLI calls it.
"""
