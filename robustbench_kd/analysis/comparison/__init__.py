"""Comparisons a reviewer can trust: per-point outcomes of several models, paired tests, intervals.

``statistics`` holds the pure statistics (exact McNemar, sign test, intervals over seeds, the paired
bootstrap); the other modules read the per-point files of runs and sweeps and render the comparison.
"""
