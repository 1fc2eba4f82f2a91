"""Looking at a run: per-epoch diagnostics (:mod:`.diagnostics`) and end-of-run reports (:mod:`.reports`).

May import the layers below it: ``evaluation`` (attacks for the eps sweep, the students a run reports),
``submission``, ``methods`` (feature taps), ``students``, ``scale``, ``zoo``, ``data``, the core plugin API,
``storage`` and ``errors``. Never ``config``, ``training``, ``jobs`` or ``cli``: a report reads the run's
configuration through the run it is given, and ``training`` never imports this package.
Inside, :mod:`.reports` may import :mod:`.diagnostics` (to draw what it recorded), never the reverse.
"""
