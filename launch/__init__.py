"""Command-line entry points (run as ``python -m launch.<name>``)."""
