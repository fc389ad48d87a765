"""Benchmarks of gradsift (run as scripts, e.g. ``python -m gradsift.bench.grads``)."""
