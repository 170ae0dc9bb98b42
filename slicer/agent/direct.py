"""Run a plain command line as bash would, without starting bash first.

``bash -c "ls -l /tmp"`` parses the line, finds ``ls`` on ``PATH`` and execs it in its own
place: the program ends up as the process, with bash's ``PWD``, ``SHLVL`` and ``_`` in its
environment. Under TCG, bash's own start (its loader, libraries and locale) costs about as much
as the program's, so for a line with nothing for bash to do (no quoting, expansion, redirection,
operator, glob, comment, assignment, builtin or keyword) the agent execs the program itself, with
the environment bash would have given it. Anything else, and any exec that fails, goes to bash as
before, which then words the error as it always has (127, 126).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Words bash takes as they are, separated by spaces (a tab or a newline means more to bash).
PLAIN_LINE = re.compile(r" *[A-Za-z0-9_./:,@%+=-]+(?: +[A-Za-z0-9_./:,@%+=-]+)* *")
# bash 5.2's builtins and reserved words (compgen -b; compgen -k): bash runs these itself.
BASH_WORDS = frozenset("""
    . : [ alias bg bind break builtin caller cd command compgen complete compopt continue declare
    dirs disown echo enable eval exec exit export false fc fg getopts hash help history jobs kill
    let local logout mapfile popd printf pushd pwd read readarray readonly return set shift shopt
    source suspend test times trap true type typeset ulimit umask unalias unset wait
    if then else elif fi case esac for select while until do done in function time { } ! [[ ]] coproc
""".split())
# Variables that make bash do something before (or besides) running the line: a startup file,
# functions imported from the environment, options such as xtrace, POSIX mode.
BASH_ENV_VARS = ("BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "POSIXLY_CORRECT", "PWD")
MAX_SHLVL = 998  # bash resets a higher level to 1, with a warning


@dataclass
class Direct:
    path: str  # what execve runs
    argv: list[str]  # argv[0] as written on the line, as bash passes it
    env: dict[str, str]  # with bash's PWD, SHLVL and _


def plan(line: str, args: list[str], shell: str, env: dict[str, str], cwd: str) -> Direct | None:
    """What ``shell -c "line args…"`` would exec, or None when the line needs the shell.
    ``args`` are quoted for the shell, so they are words as they are; ``cwd`` is the directory
    the command starts in (a path, or ``/proc/self/fd/N``). The cheap checks come first: most
    lines that need bash cost no system call here."""
    if not PLAIN_LINE.fullmatch(line) or os.path.basename(os.path.realpath(shell)) != "bash":
        return None  # (a "bash" that links to busybox is not bash)
    words = line.split()
    first = words[0]
    if "=" in first or first in BASH_WORDS:
        return None
    if any(k in env for k in BASH_ENV_VARS) or any(k.startswith("BASH_FUNC_") for k in env):
        return None
    level = env.get("SHLVL", "0")
    if not (level.isdigit() and level.isascii() and int(level) <= MAX_SHLVL):
        return None
    if "/" in first:
        path = first  # relative to the command's directory: the child changes into it before exec
    elif (path := _search(first, env.get("PATH", ""))) is None:
        return None
    if not (pwd := physical(cwd)):
        return None
    # bash raises SHLVL by one and lowers it again before it execs in its own place
    return Direct(path, [*words, *args], {**env, "PWD": pwd, "SHLVL": str(int(level)), "_": path})


def physical(cwd: str) -> str:
    """The directory ``cwd`` names with no symlink in it (bash's ``PWD`` when none is inherited);
    "" when it cannot be known here."""
    if not os.path.isabs(cwd):
        return ""
    try:
        path = os.readlink(cwd) if cwd.startswith("/proc/self/fd/") else os.path.realpath(cwd, strict=True)
    except OSError:
        return ""
    return "" if path.endswith(" (deleted)") or not os.path.isabs(path) else path


def _search(name: str, path_var: str) -> str | None:
    """The first executable file called ``name`` in ``PATH``, as bash's search finds it; None
    when the search depends on the command's directory (an empty or relative entry) or finds
    nothing (bash then says so)."""
    for directory in path_var.split(":"):
        if not os.path.isabs(directory):
            return None
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
