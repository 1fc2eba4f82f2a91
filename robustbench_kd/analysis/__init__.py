"""Looking at a run: per-epoch diagnostics (:mod:`.diagnostics`) and end-of-run reports (:mod:`.reports`).

May import: the core, ``methods`` (feature taps), ``evaluation`` (attacks for the eps sweep), ``storage``;
never ``training`` or ``jobs``.
"""
