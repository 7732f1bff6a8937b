"""`python -m launch.convert` from a checkout: the same command as `psych201-convert` (psych201_jax/cli/convert.py)."""

from psych201_jax.cli.convert import run

if __name__ == "__main__":
    run()
