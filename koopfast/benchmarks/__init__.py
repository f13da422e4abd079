"""Micro-benchmarks of koopfast against the PyTorch way and installed peers.

Shared by the ``koopfast bench`` command and the developer suite in bench/ (pytest-benchmark):
each family module defines frozen case configs, builds realistic inputs, checks every method
against the reference before timing it, and returns rows for one table.
"""
