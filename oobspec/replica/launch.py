"""A wrapped program's first moment: `python launch.py PARENT_PID PROGRAM ARGV0 ARGS...`.

It asks the kernel to SIGKILL it when its parent (the actor) dies, even by SIGKILL, then
becomes the program (exec keeps that request). Done here rather than in a `preexec_fn`:
code between fork and exec in a multi-threaded process (every Ray worker is one) can deadlock,
as Python documents. Standard library only, run with -I -S: it starts in milliseconds.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(args: list[str]) -> None:
    parent, program, argv = int(args[0]), args[1], args[2:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the actor's stop still ends the program
        pass
    if os.getppid() != parent:  # the actor died before the request above took effect
        sys.exit(1)
    try:
        os.execv(program, argv)
    except OSError as exc:
        print(f"[oob] cannot start {program}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
