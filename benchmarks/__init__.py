"""Maintainer benchmarks and the accelerator check (``python -m benchmarks.<name>``); not user commands."""
