"""Entry script of the analysis child: `python .../flame/isolation/_boot.py FD` (with
`--zygote`: of the fork server, `zygote`, which forks the children instead).

Run as a script (not `-m`) so that nothing, not even numpy's thread pools, starts before the
child tries to leave the network namespace (unshare needs a single-threaded process). It never
imports the user's `__main__`, so it works whether the node was started from a file, stdin
or a notebook.
"""

import sys


def _unshare(keep_network: bool) -> str:
    """Enter a new user namespace (so even a root node's child holds no capability outside
    it), a new PID namespace (`_become_init`) and, unless kept, an empty network namespace;
    what happened to the network."""
    if not sys.platform.startswith("linux"):
        return "not on Linux" if not keep_network else "kept (requested)"
    import ctypes
    import os

    clone_newuser, clone_newnet, clone_newpid = 0x10000000, 0x40000000, 0x20000000
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:
        return f"libc unavailable: {exc}"
    uid, gid = os.getuid(), os.getgid()
    network = 0 if keep_network else clone_newnet
    pid_ns = libc.unshare(clone_newuser | network | clone_newpid) == 0
    if pid_ns or libc.unshare(clone_newuser | network) == 0:
        try:  # keep our uid/gid inside the new user namespace (files stay readable)
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{gid} {gid} 1")
        except OSError:
            pass
        if pid_ns:
            _become_init(libc)
        return "kept (requested)" if keep_network else "cut"
    if keep_network:
        return "kept (requested)"
    if libc.unshare(clone_newnet) == 0:
        return "cut"
    return f"not permitted here ({os.strerror(ctypes.get_errno())})"


def _become_init(libc: object) -> None:
    """Fork the analysis child as PID 1 of the new PID namespace; this process stays behind
    only to wait for it and exit as it did. Why: when PID 1 of a namespace ends, the kernel
    kills every other process in it, so nothing the analysis forked (double-forked, setsid,
    anything) outlives its run; and the child dies with this process (PDEATHSIG) when the
    runtime kills it."""
    import os
    import select
    import signal

    alive_r, alive_w = os.pipe()  # EOF on alive_r: this process is gone
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # type: ignore[attr-defined]  # PR_SET_PDEATHSIG
        if select.select([alive_r], [], [], 0)[0]:  # died before the line above: follow it
            os._exit(1)
        os.close(alive_r)
        return
    os.close(alive_r)
    os.close(int(sys.argv[1]))  # the channel belongs to the child: its EOF is the child's
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: end the same way, so the runtime sees that signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


def _confine(argv: list[str], keep_network: bool) -> str:
    """Enter the Landlock allow-list domain (`_landlock`): read `--read PATH`, write
    `--write PATH`, and nothing of `--hide PATH` even inside a readable folder."""
    import _landlock  # type: ignore[import-not-found]  # this folder is still sys.path[0]

    readable = [*_option(argv, "--read"), sys.path[0]]
    if "--zygote" in argv:  # each fork's own layer narrows this to its /proc/self
        readable.append("/proc")
    confined = str(
        _landlock.confine(
            readable,
            _option(argv, "--write"),
            _option(argv, "--hide"),
            cut_tcp=not keep_network,
        )
    )
    return f"{confined}; {_landlock.forbid_syscalls(connect=not keep_network)}"


if __name__ == "__main__":
    sys.dont_write_bytecode = True  # nothing the child imports leaves bytecode behind
    keep = "--keep-network" in sys.argv
    network = _unshare(keep)
    confinement = _confine(sys.argv, keep)
    landlock = sys.modules.pop("_landlock")
    del sys.path[0]  # this folder: its module names must not shadow anything
    if "--zygote" in sys.argv:  # the fork server: each fork confines itself further
        from flame.isolation.zygote import serve

        code = serve(int(sys.argv[1]), network, confinement, landlock, sys.argv)
        sys.stdout.flush()
        sys.stderr.flush()
        import os

        os._exit(code)  # nothing to finalize (no files, no data): skip tearing down numpy & co
    del landlock
    from flame.isolation.child import main

    sys.exit(main(int(sys.argv[1]), network, confinement))
