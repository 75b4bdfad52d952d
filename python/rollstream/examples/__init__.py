"""Runnable examples written against rollstream's public API.

- :mod:`rollstream.examples.grpo`: GRPO end to end (``python -m rollstream.examples.grpo``).
"""
