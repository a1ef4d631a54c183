"""Running one extension command: ``sh -c <command>`` with extra environment and stdin.

The command's stdout and stderr are captured together (flannel's ``CombinedOutput``) and trimmed.
A command that runs longer than ``timeout`` seconds is killed with its whole process group and
reported as failed, so a hanging script cannot stop the agent from following leases.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
SHELL = "/bin/sh"


@dataclass(frozen=True)
class Result:
    command: str
    returncode: int        # -signal when killed; 127 when the shell could not be started
    output: str
    seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            why = "timed out"
        elif self.returncode < 0:
            why = f"killed by signal {-self.returncode}"
        else:
            why = f"exit status {self.returncode}"
        return f"{why} after {self.seconds:.1f}s"


def run(command: str, env: Mapping[str, str] | None = None, stdin: str = "\n",
        timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Run ``command`` through ``sh -c``; the environment is ours plus ``env``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    start = time.monotonic()
    try:
        proc = subprocess.Popen([SHELL, "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    except OSError as e:
        return Result(command, 127, f"cannot start {SHELL}: {e}", time.monotonic() - start)
    try:
        out, _ = proc.communicate(stdin.encode(), timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        timed_out = True
    return Result(command, proc.returncode, out.decode(errors="replace").strip(), time.monotonic() - start, timed_out)
