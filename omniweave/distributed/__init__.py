"""Parallelisms applied from outside the model, on one device mesh."""
