"""tune: the Ray Tune + Optuna harness that drives ``dualnet``. Ray is imported only when a sweep runs."""
