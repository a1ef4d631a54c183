"""Running the firewall and routing tools (``iptables``, ``nft``, ``ip``): the one place where a
subprocess failure becomes a ``FlannelError`` that names the command and says what to do.

* the command did not finish within its timeout → ``errors.ResourceBusy`` (retried by
  ``retry.firewall`` and then by the worker supervision; the machine may be overloaded);
* the binary cannot be run → ``errors.BackendError`` (install it, or turn the feature off);
* its output cannot be parsed → ``errors.BackendError`` from the caller (``bad_output``).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

from flannel import errors

COMMAND_TIMEOUT_SECONDS = 30.0


def cmdline(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def run(argv: Sequence[str], *, input: str | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing text output (default timeout COMMAND_TIMEOUT_SECONDS); the exit
    status is the caller's to judge."""
    timeout = COMMAND_TIMEOUT_SECONDS if timeout is None else timeout
    try:
        # errors="replace": bytes that are not UTF-8 reach the parser (and its clear error), not a
        # UnicodeDecodeError from deep inside subprocess
        return subprocess.run(list(argv), input=input, capture_output=True, text=True, errors="replace",
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise errors.ResourceBusy(f"`{cmdline(argv)}` did not finish within {timeout:g}s and was killed "
                                  "(the machine may be overloaded, or the tool is stuck)") from e
    except OSError as e:
        raise errors.BackendError(f"cannot run `{cmdline(argv)}`: {e.strerror or e} "
                                  f"(is {argv[0]} installed and on PATH?)") from e


def failed(argv: Sequence[str], res: subprocess.CompletedProcess[str], hint: str = "") -> errors.BackendError:
    """The error for a command that exited non-zero: the command, its status, its stderr, a hint."""
    tail = f"; {hint}" if hint else ""
    return errors.BackendError(f"`{cmdline(argv)}` failed (exit {res.returncode}): {output_of(res)}{tail}")


def output_of(res: subprocess.CompletedProcess[str]) -> str:
    """stderr (or stdout) on one line, for a log line or an error message."""
    lines = [ln.strip() for ln in (res.stderr or res.stdout or "").splitlines() if ln.strip()]
    return " / ".join(lines) or "no output"


def bad_output(argv: Sequence[str], why: str, output: str) -> errors.BackendError:
    """The error for output we cannot parse (a ``ValueError`` would read like a bug of ours)."""
    sample = output if len(output) <= 200 else output[:200] + "..."
    return errors.BackendError(f"`{cmdline(argv)}` printed output flannel cannot read ({why}): {sample!r}; "
                               "is the tool the expected version (iproute2 with JSON output)?")
