"""tune: the Ray Tune + Optuna harness that drives ``dualnet``: sweeps, their analysis, and confirmation on test."""
