"""Process-tree supervisor for a locally started engine.

Run as ``python -m rollstream._supervise -- CMD...`` with a pipe on
stdin and ``start_new_session=True``: it leads a new process group, starts CMD
inside it and waits. When stdin reaches EOF (the parent closed it, or the
parent died, even by SIGKILL) or CMD exits, it terminates the whole group:
SIGTERM, a grace period, then SIGKILL. That is what guarantees that no engine
process (vLLM forks an engine core and workers) outlives a test session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 10.0


def _kill_group(grace: float) -> None:
    pgid = os.getpgid(0)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.1)
        # Only this supervisor left in the group?
        if not _others_alive(pgid):
            return
    os.killpg(pgid, signal.SIGKILL)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp ...; zombies are already dead.
        if int(fields[2]) == pgid and fields[0] != b"Z":
            out.append(int(entry))
    return out


def _others_alive(pgid: int) -> bool:
    return any(pid != os.getpid() for pid in group_members(pgid))


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python -m rollstream._supervise -- CMD...", file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1 :]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    parent_gone = threading.Event()

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(1):
                pass
        finally:
            parent_gone.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while child.poll() is None and not parent_gone.is_set():
        parent_gone.wait(0.2)
    code = child.poll()
    _kill_group(GRACE_SECONDS)
    return code if code is not None else 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the stdin watcher may still be blocked in read(), and
    # interpreter finalization would abort on its buffered-reader lock.
    os._exit(code)
