"""Benchmarks: plaintext vs trio-tproxy vs stunnel4 vs haproxy between two pods.

Run as root with ``python -m benchmarks`` (``bash dev.sh bench``); see README.md.
"""
