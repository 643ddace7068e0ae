"""Benchmarks behind `nanomoe bench ...`. Timing helpers shared by all of them live in timing.py."""
