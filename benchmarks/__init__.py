"""Benchmarks of the attnres library: the read op, training steps, saved memory and decoding.

Run ``python -m benchmarks --help``; see ``benchmarks/RESULTS.md`` for the method and the numbers.
"""
