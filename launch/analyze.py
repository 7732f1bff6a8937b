"""`python -m launch.analyze` from a checkout: the same command as `psych201-analyze` (psych201_jax/cli/analyze.py)."""

from psych201_jax.cli.analyze import run

if __name__ == "__main__":
    run()
