"""QWIT against a hand-written Temporal saga doing the same work.

Run ``python -m benchmarks`` (see README.md beside this file).
"""
