"""A second, unprivileged local user, for the tests that attack smpd as one would.

The tests run as root in CI. A forked child of the test process drops to an unused
uid (no passwd entry, no login, no files: nothing to create or remove on the host)
and acts there; being a fork, it needs no interpreter or package it could read as
that user (so everything it runs is imported here, before the fork). Without root there is no second user to be: the tests skip, visibly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import time
import traceback
from typing import Any, Callable

import colorsys  # noqa: F401 - imported lazily by rich: the second user could not read it
import io

import multiprocess.popen_fork  # noqa: F401 - imported lazily when a process starts
import psutil
import pytest
from multiprocess.connection import Connection, answer_challenge, deliver_challenge
from rich.console import Console

from smpd.daemon import supervisor  # noqa: F401 - everything `smpd up --foreground` runs
from smpd.tools import cli, render  # noqa: F401 - render: the CLI imports it only when it draws (cli._render)

Console(file=io.StringIO(), force_terminal=True).print("[bold red]warm[/bold red]")  # rich's lazy imports

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user needs root (CI runs as root)")


def unused_uid() -> int:
    """A uid with no passwd entry and no process: a user nobody on this host is. Each pytest-xdist
    worker takes its own hundred (what one leaves behind, files with no process, must not make
    the other's adversary share its uid)."""
    taken = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    first = 42420 + 100 * (int(worker) if worker.isdigit() else 0)
    for uid in range(first, first + 100):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in taken:
                return uid
    raise RuntimeError(f"no unused uid in {first}..{first + 99}")


def become(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    assert os.geteuid() == uid and os.getuid() == uid


def run_as(uid: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` as ``uid`` in a forked child; return its JSON-able result (or raise its error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(r)
        try:
            become(uid)
            out = {"ok": fn(*args)}
        except BaseException:  # noqa: BLE001 - reported to the parent
            out = {"error": traceback.format_exc()}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data or b'{"error": "the child died without a word"}')
    if "error" in out:
        raise AssertionError(f"as uid {uid}: {out['error']}")
    return out["ok"]


@contextlib.contextmanager
def holding(uid: int, fn: Callable[..., Any], *args: Any):
    """Run ``fn(*args)`` as ``uid`` in a child that then stays alive (holding what it made:
    a bound socket, a server) until the block ends. ``fn`` may return a JSON-able value,
    yielded here; it may also serve, in which case it must not return."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            become(uid)
            fn(*args, ready=lambda value=None: os.write(w, (json.dumps({"ok": value}) + "\n").encode()))
            signal.pause()
        except BaseException:  # noqa: BLE001
            with contextlib.suppress(OSError):
                os.write(w, (json.dumps({"error": traceback.format_exc()}) + "\n").encode())
        os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            out = json.loads(f.readline() or b'{"error": "the child died without a word"}')
            if "error" in out:
                raise AssertionError(f"as uid {uid}: {out['error']}")
            yield {"pid": pid, "value": out["ok"]}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def smpd_cli(args: list[str], limits: dict[int, int] | None = None, patch=None) -> dict:
    """`smpd ARGS` run in this (forked, already dropped) process: its exit status and output.

    ``limits`` are rlimits to set first; ``patch`` a function to call first (test scaffolding,
    e.g. to get past a pre-check and reach the failure behind it)."""
    import resource
    import sys

    for which, soft in (limits or {}).items():
        resource.setrlimit(which, (soft, resource.getrlimit(which)[1]))
    if patch is not None:
        patch()
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    try:
        cli.main(args, prog_name="smpd")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


# -- what the attacker does, each run as the attacker ---------------------------------------

def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def symlink(target: str, path: str) -> None:
    os.symlink(target, path)


def bind_unix(path: str) -> None:
    """A socket file at ``path`` (left behind when this process exits)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)


def bind_abstract(address: str, ready) -> None:
    """Squat an abstract socket name, listening."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(address)
    s.listen(8)
    ready()
    signal.pause()


def squat_when_freed(address: str, ready) -> None:
    """Say ready at once, then bind ``address`` the moment its owner frees it, listen and fill the
    backlog with our own connections, and never accept: a client that connects waits for ever."""
    ready()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            s.bind(address)
            break
        except OSError:
            time.sleep(0.0005)
    s.listen(0)
    for _ in range(2):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        with contextlib.suppress(OSError):
            c.connect(address)
        _kept.append(c)
    signal.pause()


_kept: list = []  # the squatter's own connections, held open


def fake_server(address: str, authkey_hex: str, ready) -> None:
    """Answer on ``address`` as a coordinator would (the HMAC handshake with the key the forger
    knows), recording in the reply to its pipe how many request bytes reached it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(address)
    s.listen(8)
    ready()
    while True:
        c, _ = s.accept()
        conn = Connection(c.detach())
        try:
            deliver_challenge(conn, bytes.fromhex(authkey_hex))
            answer_challenge(conn, bytes.fromhex(authkey_hex))
            conn.recv_bytes()
            conn.send_bytes(json.dumps({"ok": True, "result": {"forged": True}}).encode())
        except Exception:  # noqa: BLE001 - a refusing client just closes
            pass
        finally:
            conn.close()


def listen_tcp(ready) -> None:
    """A TCP listener on 127.0.0.1 at a port the kernel picks, like a Ray cluster's GCS; says
    the port."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    ready(s.getsockname()[1])
    signal.pause()
