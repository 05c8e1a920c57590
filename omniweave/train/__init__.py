"""Training loop, optimisation and metrics."""
