"""`python -m launch.audit` from a checkout: the same command as `psych201-audit` (psych201_jax/cli/audit.py)."""

from psych201_jax.cli.audit import run

if __name__ == "__main__":
    run()
