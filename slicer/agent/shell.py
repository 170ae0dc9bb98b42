"""Interactive shells on a real PTY, spoken in Slicer's shell frame format.

Each WebSocket binary message is one frame: 1 byte type, 4-byte big-endian length, payload.
Types: 0x01 data, 0x02 window size (u32 cols, u32 rows), 0x03 shutdown, 0x04 heartbeat,
0x05 session close. The host relays the client's frames to us unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import signal
import struct
import termios

from slicer.agent import catrust, paths, runtime

FRAME = struct.Struct(">BI")
DATA, WINDOW_SIZE, SHUTDOWN, HEARTBEAT, SESSION_CLOSE = 1, 2, 3, 4, 5
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def encode(ftype: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(ftype, len(payload)) + payload


def decode(message: bytes) -> list[tuple[int, bytes]]:
    """All frames of one message (normally exactly one); raises ValueError if malformed."""
    frames, pos = [], 0
    while pos < len(message):
        if len(message) - pos < FRAME.size:
            raise ValueError("truncated frame header")
        ftype, length = FRAME.unpack_from(message, pos)
        pos += FRAME.size
        if len(message) - pos < length:
            raise ValueError("truncated frame payload")
        frames.append((ftype, message[pos : pos + length]))
        pos += length
    return frames


def set_window(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ShellSession:
    """A shell on a PTY; ``output`` yields what it prints, ``handle`` takes client frames."""

    def __init__(self, uid: int, gid: int | None, shell: str, cwd_fd: int | None) -> None:
        """A shell as ``uid``: its primary group unless ``gid`` is given, its supplementary
        groups, HOME and USER; it starts in ``cwd_fd`` (from :func:`slicer.agent.execute.open_cwd`),
        or in the user's home."""
        u = paths.user(uid, gid)
        home, user = u.home or "/", u.name
        try:
            login_shell = pwd.getpwuid(uid).pw_shell
        except KeyError:
            login_shell = ""
        shell = runtime.shell(shell or login_shell or "/bin/bash")
        if not os.access(shell, os.X_OK):
            raise FileNotFoundError(f"shell {shell!r} not found")
        self.master, slave = os.openpty()
        env = {"TERM": "xterm-256color", "HOME": home, "USER": user, "LOGNAME": user, "SHELL": shell,
               "PATH": PATH, "LANG": "C.UTF-8", **catrust.ca_env()}  # the group's CAs (slicer.agent.catrust)

        def child_setup() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if uid:
                os.setgroups(u.groups)
                os.setgid(u.gid)
                os.setuid(uid)
            elif gid is not None:
                os.setgroups([gid])
                os.setgid(gid)

        set_window(slave, 80, 24)
        self.pid = os.fork()
        if self.pid == 0:  # child: the PTY becomes its terminal
            try:
                os.close(self.master)
                for fd in (0, 1, 2):
                    os.dup2(slave, fd)
                if slave > 2:
                    os.close(slave)
                child_setup()
                if cwd_fd is not None:
                    os.fchdir(cwd_fd)
                else:
                    os.chdir(home)
                os.execve(shell, [f"-{os.path.basename(shell)}"], env)  # a login shell
            finally:
                os._exit(127)
        os.close(slave)
        os.set_blocking(self.master, False)
        self.exit_code: int | None = None

    async def output(self):
        """PTY output as it comes; ends when the shell has exited and its output is drained."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self.master, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                try:
                    data = os.read(self.master, 65536)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the last process holding the terminal is gone
                    break
                if not data:
                    break
                yield data
        finally:
            loop.remove_reader(self.master)
            with contextlib.suppress(OSError):
                os.close(self.master)
        self.exit_code = await asyncio.to_thread(self._wait)

    def _wait(self) -> int:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return 0
        return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)

    def handle(self, ftype: int, payload: bytes) -> bool:
        """Apply one client frame; False when the client ended the session."""
        if ftype == DATA:
            view = memoryview(payload)
            while view:
                try:
                    n = os.write(self.master, view)
                except BlockingIOError:
                    continue
                view = view[n:]
        elif ftype == WINDOW_SIZE and len(payload) >= 8:
            cols, rows = struct.unpack(">II", payload[:8])
            set_window(self.master, max(1, min(cols, 1000)), max(1, min(rows, 1000)))
        elif ftype in (SHUTDOWN, SESSION_CLOSE):
            return False
        return True

    def hang_up(self) -> None:
        """What closing a terminal does: SIGHUP to the shell's session."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGHUP)
