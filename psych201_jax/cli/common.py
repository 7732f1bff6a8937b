"""What every command shares: user errors as one ``error: …`` line and exit status 2.

A ``UserError`` (bad data, config value, checkpoint or results directory), an unreadable or unknown
``--config`` override, or a flag error prints one line and exits 2; ``--verbosity=1`` shows the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

from psych201_jax import console
from psych201_jax.errors import UserError


def _error(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def _config_key_error(err: Exception) -> str | None:
    """A readable line for an unknown ``--config.<key>`` override, with ml_collections' close name."""
    text = str(err).replace("\\n", "\n").replace("\\'", "'")
    match = re.search(r"'([\w.]+)'", text)
    if match is None:
        return None
    close = re.findall(r'Did you mean "([\w.]+)"', text)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return f"unknown config key {match.group(1)!r}{hint}"


def define_config(name: str, default: str | None, help_text: str) -> Any:
    """``config_flags.DEFINE_config_file``, whose ``--<name>.<key>`` overrides are read from ``sys.argv``
    right away: an unknown key becomes one error line instead of an import-time traceback."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(name, default, help_text)
    except (AttributeError, KeyError) as err:
        _error(_config_key_error(err) or str(err))
    except (OSError, SyntaxError, ValueError, TypeError) as err:
        _error(f"cannot load --{name}: {err}")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _error(str(err))
    except (AttributeError, KeyError) as err:  # ml_collections: an override of a key the config lacks
        _error(_config_key_error(err) or str(err))
    except (OSError, SyntaxError, ValueError) as err:  # an unreadable or broken --config file
        _error(f"cannot load the configuration: {err}")
    raise AssertionError("unreachable")


def help_text(doc: str, module: str, keys: Sequence[tuple[str, str, str]] = (), key_flag: str = "config") -> str:
    """``--help``: the command's docstring (what it does, with an example), its flags, its config keys."""
    lines = [doc.strip(), "", "flags:"]
    own = [f for m in (module, __name__) for f in flags.FLAGS.get_flags_for_module(m)]
    for flag in sorted(own, key=lambda f: f.name):
        plain = isinstance(flag.default, (str, int, float, bool))
        default = f" (default: {flag.default!r})" if plain else ""
        lines.append(f"  --{flag.name}: {' '.join(str(flag.help).split())}{default}")
    lines.append("  --verbosity=1: library logs and tracebacks of user errors; --helpfull: absl's own flags too")
    if keys:
        lines += ["", f"config keys (--{key_flag}.<key>=VALUE; default in brackets):"]
        width = max(len(k) for k, _, _ in keys)
        lines += [f"  {key:<{width}}  [{default}] {doc}" for key, default, doc in keys]
    return "\n".join(lines)


def run(main: Callable[[list[str]], None], *, help_: Callable[[], str] | None = None) -> None:
    """``app.run(main)`` with quiet library logs and user errors as one line (exit 2); exits without
    interpreter teardown once ``main`` returns (see ``_exit_without_teardown``). ``help_`` gives the text
    of ``--help`` / ``-h``."""
    if help_ is not None and any(a in ("--help", "-h", "--helpshort", "-?") for a in sys.argv[1:]):
        print(help_())
        sys.exit(0)

    def wrapped(argv: list[str]) -> None:
        console.quiet_libraries()
        for name in list(flags.FLAGS):  # config files load and apply their overrides on first access
            try:
                _ = flags.FLAGS[name].value
            except (AttributeError, KeyError) as err:
                _error(_config_key_error(err) or str(err))
            except (OSError, SyntaxError, ValueError, TypeError) as err:
                _error(f"cannot load --{name}: {err}")
        try:
            main(argv)
        except UserError as err:
            if logging.get_verbosity() >= 1:
                traceback.print_exc()
            _error(str(err))
        _exit_without_teardown()

    app.run(wrapped, flags_parser=_parse_flags)


def _exit_without_teardown() -> None:
    """Exits 0 once ``main`` has returned, skipping the interpreter's teardown: in a process that ran jax
    it spends 0.5-0.8 s freeing modules and XLA's thread pools, a sixth of a short job's wall time.
    Everything is written by then (results committed, files closed); logs and streams are flushed here.
    A multi-process job exits normally, so ``jax.distributed`` shuts down at exit (the check starts no
    backend: a converter run beside a job on a TPU host must not try to take its chips)."""
    jax: Any = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        return
    std_logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a reader that closed the pipe early
            stream.flush()
    os._exit(0)
