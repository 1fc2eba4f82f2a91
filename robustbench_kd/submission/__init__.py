"""The RobustBench submission bundle: leaderboard entry, AutoAttack log, hashes, zoo entry, New Model issue.

May import: the core, ``evaluation``, ``storage``, ``zoo``, ``students``; never ``training`` or ``jobs``.
"""
