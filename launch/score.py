"""`python -m launch.score` from a checkout: the same command as `psych201-score` (psych201_jax/cli/score.py)."""

from psych201_jax.cli.score import run

if __name__ == "__main__":
    run()
