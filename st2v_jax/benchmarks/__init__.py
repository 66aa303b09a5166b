"""Runnable benchmarks (`python -m st2v_jax.benchmarks.<name>`); each prints a table."""
