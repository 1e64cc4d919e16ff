"""A wrapped program's first moment: `python launch.py PARENT_PID PROGRAM ARGV0 ARGS...`.

It asks the kernel to SIGKILL it when its parent (the actor) dies, even by SIGKILL, then
becomes the program (exec keeps that request). Done here rather than in a `preexec_fn`:
code between fork and exec in a multi-threaded process (every Ray worker is one) can deadlock,
as Python documents. Standard library only, run with -I -S: it starts in milliseconds.
The actor finds the program and its working folder (`cwd:`) with the two helpers below,
before the launcher starts there.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def workdir(spec_dir: str | None, cwd: str) -> str:
    """A command's folder: `cwd` in the spec's folder where this node has that folder, else in
    the working_dir the folder travelled as (the actor's own current folder)."""
    base = spec_dir if spec_dir and os.path.isdir(spec_dir) else os.getcwd()
    return os.path.normpath(os.path.join(base, cwd))


def find_program(name: str, cwd: str | None = None) -> str:
    """The program to exec, as a shell in `cwd` finds it (a name with a '/' is a path from `cwd`)."""
    import errno
    import shutil
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(errno.ENOENT, f"its working folder (cwd) {cwd} does not exist")
    program = shutil.which(os.path.join(cwd, name) if cwd and os.sep in name else name)
    if program is None:
        raise FileNotFoundError(errno.ENOENT, "no such program (or not executable)", name)
    return program


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
