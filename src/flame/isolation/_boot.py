"""Entry script of the analysis child: `python .../flame/isolation/_boot.py FD`.

Run as a script (not `-m`) so that nothing, not even numpy's thread pools, starts before the
child tries to leave the network namespace (unshare needs a single-threaded process). It never
imports the user's `__main__`, so it works whether the node was started from a file, stdin
or a notebook.
"""

import sys


def _cut_network() -> str:
    """Move this process into an empty network namespace if the kernel lets us."""
    if not sys.platform.startswith("linux"):
        return "not on Linux"
    import ctypes
    import os

    clone_newuser, clone_newnet = 0x10000000, 0x40000000
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:
        return f"libc unavailable: {exc}"
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(clone_newnet) == 0:
        return "cut"
    if libc.unshare(clone_newuser | clone_newnet) == 0:
        try:  # keep our uid/gid inside the new user namespace (files stay readable)
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{gid} {gid} 1")
        except OSError:
            pass
        return "cut"
    return f"not permitted here ({os.strerror(ctypes.get_errno())})"


def _confine(argv: list[str], keep_network: bool) -> str:
    """Enter the Landlock domain (`_landlock`) hiding every `--hide PATH` of argv."""
    hidden = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--hide"]
    import _landlock  # this folder is still sys.path[0]

    return _landlock.confine(hidden, cut_tcp=not keep_network)


if __name__ == "__main__":
    keep = "--keep-network" in sys.argv
    network = _cut_network() if not keep else "kept (requested)"
    confinement = _confine(sys.argv, keep)
    del sys.path[0]  # this folder: its module names must not shadow anything
    sys.modules.pop("_landlock", None)
    from flame.isolation.child import main

    sys.exit(main(int(sys.argv[1]), network, confinement))
