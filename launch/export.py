"""`python -m launch.export` from a checkout: the same command as `psych201-export` (psych201_jax/cli/export.py)."""

from psych201_jax.cli.export import run

if __name__ == "__main__":
    run()
