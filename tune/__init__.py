"""tune: the Ray Tune + Optuna harness that drives ``dualnet``: sweeps, their analysis, and confirmation on test.

Ray is imported only where it runs: by ``sweep`` and by ``confirm`` (unless ``--no-ray``), not by ``analyze``
or ``best``.
"""
