"""`python -m launch.sweep` from a checkout: the same command as `psych201-sweep` (psych201_jax/cli/sweep.py)."""

from psych201_jax.cli.sweep import run

if __name__ == "__main__":
    run()
