"""Landlock confinement of the analysis child (Linux >= 5.13), before any analysis code runs.

Why: the child runs as the node's own user, so without this it can open the node's key
files, token files, policy, budget ledger and data folders directly, rewrite the installed
runtime code (which the node imports later, next to its keys), and read the parent's memory
and environment through /proc (same uid). The domain, which the child cannot leave again, is
an allow-list: (1) read (and execute) only the given `readable` paths (interpreter,
stdlib, site-packages, flame, the analysis code) and a few system files; (2) write only the
given `writable` paths (one private scratch folder); nothing else can be opened at all;
(3) every process outside the domain is unreachable through ptrace and /proc/<pid>/*, and
signals and abstract Unix sockets are scoped; (4) when the network is cut, TCP connect/bind
is forbidden.

A `hidden` path inside a readable folder is carved out: every entry along the way from
the folder to the hidden path is allowed except the one leading to it; the ancestors
themselves may only be listed. Loaded by `_boot.py` by file, before `flame` (and numpy's
threads) are imported: no imports beyond the standard library.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from typing import Any

_CREATE, _ADD_RULE, _RESTRICT = 444, 445, 446  # same numbers on x86_64 and aarch64
_VERSION = 1 << 0
_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights by ABI version (uapi/linux/landlock.h).
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_MAKE_CHAR, _MAKE_SOCK, _MAKE_FIFO, _MAKE_BLOCK = 1 << 6, 1 << 9, 1 << 10, 1 << 11
_FS_ABI1 = (1 << 13) - 1
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_READ = _EXECUTE | _READ_FILE | _READ_DIR
_NOT_IN_SCRATCH = _EXECUTE | _MAKE_CHAR | _MAKE_BLOCK | _MAKE_SOCK | _MAKE_FIFO | _IOCTL_DEV
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
_SCOPES = (1 << 0) | (1 << 1)  # abstract Unix sockets, signals

SYSTEM_READABLE = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/timezone",
    "/dev/urandom",
    "/dev/zero",
    "/proc/self",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/sys/vm/overcommit_memory",
    "/sys/devices/system/cpu",
    "/sys/kernel/mm/transparent_hugepage",
    "/sys/fs/cgroup",
)
"""Read-only outside the Python installation: shared libraries and what libc, numpy,
pyarrow and DuckDB probe (CPU count, memory, time zone). Nothing of the node's."""
SYSTEM_WRITABLE = ("/dev/null",)


def _fs_rights(abi: int) -> int:
    rights = _FS_ABI1
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


def _components(path: str) -> list[str]:
    return [part for part in path.split(os.sep) if part]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


_resolved: dict[str, str] = {}
"""Paths resolved by an earlier `confine` in this process: the fork server's own call
resolves the allow-list once, and each of its forks (which confines itself again with the
same list) skips a few hundred stat calls. Absolute paths only, never /proc: /proc/self
is another process's folder in each fork."""


def _real(path: str) -> str:
    if _within(path, "/proc") or not os.path.isabs(path):
        return os.path.realpath(path)
    real = _resolved.get(path)
    if real is None:
        real = _resolved[path] = os.path.realpath(path)
    return real


def confine(readable: list[str], writable: list[str], hidden: list[str], *, cut_tcp: bool) -> str:
    """Enter the allow-list domain; a sentence saying what is enforced (starting with
    "no confinement" when nothing is)."""
    if not sys.platform.startswith("linux"):
        return "no confinement (not Linux)"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:
        return f"no confinement (libc unavailable: {exc})"
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(_VERSION))
    if abi < 1:
        return f"no confinement (Landlock unavailable: {os.strerror(ctypes.get_errno())})"
    fs = _fs_rights(abi)
    net = _NET_TCP if cut_tcp and abi >= 4 else 0
    scoped = _SCOPES if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", fs, net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", fs, net)
    else:
        attr = struct.pack("=Q", fs)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(_CREATE, buffer, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"no confinement (ruleset refused: {os.strerror(ctypes.get_errno())})"
    secret = sorted({_real(p) for p in hidden if p})
    try:

        def allow(path: str, rights: int) -> None:
            try:
                fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return
            try:
                if not os.path.isdir(path) or os.path.islink(path):
                    rights &= _FILE_RIGHTS
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
                if libc.syscall(_ADD_RULE, ruleset, _PATH_BENEATH, rule, ctypes.c_uint32(0)):
                    raise OSError(ctypes.get_errno(), f"landlock rule for {path}")
            finally:
                os.close(fd)

        def allow_tree(root: str, rights: int) -> None:
            """`root` with `rights`, minus the hidden paths beneath it (carved)."""
            if any(_within(root, h) for h in secret):
                return  # the runtime never asks for this; refuse rather than expose
            inside = [h for h in secret if _within(h, root)]
            if not inside:
                allow(root, rights)
                return
            ancestors: set[str] = set()
            for target in inside:
                parts = _components(target)
                for depth in range(len(_components(root)), len(parts)):
                    ancestors.add(os.sep + os.sep.join(parts[:depth]))
            for ancestor in sorted(ancestors):
                allow(ancestor, rights & _READ_DIR)  # listed, contents carved
                try:
                    entries = os.listdir(ancestor)
                except OSError:
                    continue
                for entry in entries:
                    path = os.path.join(ancestor, entry)
                    if path not in inside and path not in ancestors:
                        allow(path, rights)

        roots = {_real(p) for p in [*readable, *SYSTEM_READABLE] if p}
        for root in sorted(roots):
            allow_tree(root, _READ & fs)
        for path in SYSTEM_WRITABLE:
            allow(path, (_READ_FILE | _WRITE_FILE | _TRUNCATE) & fs)
        for root in sorted({os.path.realpath(p) for p in writable if p}):
            allow_tree(root, fs & ~_NOT_IN_SCRATCH)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            return f"no confinement (no_new_privs refused: {os.strerror(ctypes.get_errno())})"
        if libc.syscall(_RESTRICT, ruleset, ctypes.c_uint32(0)):
            return f"no confinement (restrict refused: {os.strerror(ctypes.get_errno())})"
    except OSError as exc:
        return f"no confinement ({exc})"
    finally:
        os.close(ruleset)
    what = [
        f"read-only {len(roots)} path(s), writable {len(set(writable))}",
        f"{len(secret)} node path(s) hidden",
        "other processes unreachable",
    ]
    if net:
        what.append("no TCP")
    return f"Landlock ABI {abi} allow-list: " + ", ".join(what)


# --- seccomp: no connect(), no Unix sockets, no io_uring, no metadata changes ----------------
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_CONNECT = {"x86_64": 42, "aarch64": 203}
_SOCKET = {"x86_64": 41, "aarch64": 198}
# chmod/chown/utime*/xattr families: Landlock (up to ABI 7) does not cover them, so a child
# could make the runtime's files world-writable or touch them even where it may not write.
_METADATA = {
    "x86_64": (90, 91, 92, 93, 94, 132, 188, 189, 190, 197, 198, 199, 235, 260, 261, 268, 280),
    "aarch64": (5, 6, 7, 14, 15, 16, 52, 53, 54, 55, 88),
}
_METADATA_NEW = (452, 463, 466)  # fchmodat2, setxattrat, removexattrat (same on both)
# io_uring_setup/enter/register (same on both): its operations (connect, socket, fsetxattr,
# ...) are never seen by a syscall filter, so the ring itself is refused
_IO_URING = (425, 426, 427)
_AF_UNIX = 1
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EACCES, _EPERM, _ENOSYS = 13, 1, 38
_LD_ABS_W, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_ARG0_LOW = 16  # seccomp_data.args[0], its low 32 bits (both are little-endian)


def _filter(machine: str, *, connect: bool) -> list[tuple[int, int, int, int]]:
    """The classic BPF program: jumps to named returns, resolved to forward offsets."""
    ops: list[tuple[int, Any, Any, int]] = [
        (_LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 0, "eperm", _AUDIT_ARCH[machine]),  # another ABI (int 0x80): refused
        (_LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
        (_JGE_K, "eperm", 0, 0x40000000),  # x32 system call numbers: refused
    ]
    ops += [(_JEQ_K, "eperm", 0, nr) for nr in (*_METADATA[machine], *_METADATA_NEW)]
    ops += [(_JEQ_K, "enosys", 0, nr) for nr in _IO_URING]
    if connect:
        ops.append((_JEQ_K, "eacces", 0, _CONNECT[machine]))
        ops.append((_JEQ_K, "socket", 0, _SOCKET[machine]))
    ops.append((_RET_K, 0, 0, _RET_ALLOW))
    labels = {"socket": len(ops)}
    ops += [
        (_LD_ABS_W, 0, 0, _ARG0_LOW),  # socket(domain, ...): no AF_UNIX socket
        (_JEQ_K, "eacces", 0, _AF_UNIX),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    for name, value in (("eperm", _EPERM), ("eacces", _EACCES), ("enosys", _ENOSYS)):
        labels[name] = len(ops)
        ops.append((_RET_K, 0, 0, _RET_ERRNO | value))
    program = []
    for i, (code, jt, jf, k) in enumerate(ops):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        program.append((code, jt, jf, k))
    return program


def forbid_syscalls(*, connect: bool) -> str:
    """A seccomp filter refusing file metadata changes (EPERM), io_uring (ENOSYS: libraries
    fall back to plain syscalls), connect() and creating an AF_UNIX socket when `connect`
    (EACCES), and syscalls of any other ABI.

    Why: Landlock (up to ABI 7) covers neither connecting to a named Unix socket, nor
    sending a datagram to one, and the network namespace only cuts IP: a local database,
    container engine or broker socket on the node's filesystem would still answer. The
    child needs no new socket of that kind: it talks to the runtime over the socket it
    inherited (socketpair() stays allowed: it reaches nothing). io_uring performs connect,
    socket and fsetxattr operations without the syscalls this filter sees.
    """
    import platform

    machine = platform.machine()
    if not sys.platform.startswith("linux") or machine not in _AUDIT_ARCH:
        return "syscalls not filtered (no seccomp filter for this platform)"
    program = _filter(machine, connect=connect)
    code = b"".join(struct.pack("=HBBI", *op) for op in program)
    filters = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=HxxxxxxQ", len(program), ctypes.addressof(filters))
    buffer = ctypes.create_string_buffer(fprog, len(fprog))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as exc:
        return f"syscalls not filtered (libc unavailable: {exc})"
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        return f"syscalls not filtered ({os.strerror(ctypes.get_errno())})"
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, buffer, 0, 0):
        return f"syscalls not filtered ({os.strerror(ctypes.get_errno())})"
    if connect:
        return "connect(), Unix sockets, io_uring and metadata changes refused"
    return "io_uring and metadata changes refused"
