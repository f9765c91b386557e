"""Who a worker is: a unique id per process start, and what proves two workers share a kernel.

Hostname and PID do not identify a worker: containers share both (every replica of an image may
be ``pid 1`` on a host whose hostname it inherits). :func:`new_identity` gives each process start
a random id (a full uuid4, behind the hostname and PID for humans) and records, for humans, the hostname and PID, and for the fast
recovery after a ``kill -9`` the PID namespace the PID belongs to:

* ``pid_ns`` is the kernel's boot id and the inode of ``/proc/self/ns/pid``. Two workers with the
  same ``pid_ns`` run under one kernel boot in one PID namespace, so one may ask the kernel
  whether the other's PID is alive. Namespace inodes repeat across machines and boots; the boot
  id (random per boot) tells those apart. Without ``/proc`` it is ``None`` and no such check is
  ever made.
* ``proc_start`` is the process's start time (clock ticks since boot, ``/proc/<pid>/stat``): a
  PID that was reused by another process is told apart from the worker that held it.

A worker whose process cannot be checked this way (another machine, another container, an old
row) is only ever recovered by lease expiry (see :mod:`storage.queue`).
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

__all__ = ["WorkerIdentity", "new_identity", "pid_namespace", "process_start", "process_gone"]


@dataclass(frozen=True)
class WorkerIdentity:
    id: str                    # unique per process start; the tasks' lease_owner
    hostname: str
    pid: int
    pid_ns: str | None         # "<boot id>/<pid namespace inode>", None when unknown
    proc_start: int | None     # clock ticks after boot, None when unknown


def new_identity(worker_id: str | None = None) -> WorkerIdentity:
    """This process's identity; ``worker_id`` defaults to ``<hostname>:<pid>:<uuid4 hex>``
    (unique by the uuid alone; hostname and PID are there for humans reading leases)."""
    pid, host = os.getpid(), socket.gethostname()
    return WorkerIdentity(id=worker_id or f"{host}:{pid}:{uuid.uuid4().hex}", hostname=host,
                          pid=pid, pid_ns=pid_namespace(), proc_start=process_start(pid))


def pid_namespace() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        ns = os.readlink("/proc/self/ns/pid")      # e.g. "pid:[4026531836]"
    except OSError:
        return None
    return f"{boot}/{ns}" if boot and ns else None


def process_start(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (after the parenthesised command name, which may hold
    spaces), or None when the process is gone or there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])    # fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def process_gone(pid: int, proc_start: int | None) -> bool:
    """True when no process ``pid`` runs in this PID namespace, or another one reuses the PID.
    Only meaningful for a PID recorded in this same namespace (same ``pid_ns``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    if proc_start is None:
        return False            # alive, and nothing tells a reused PID apart: not gone
    now = process_start(pid)
    return now is not None and now != proc_start
