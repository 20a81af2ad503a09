"""The CLI <-> coordinator channel: local, owner-only, authenticated, one request per connection.

* Transport: an abstract-namespace Unix socket (``@smpd-<uid>-<machine>-<token>``,
  smpd.names): no file to leave behind, gone the instant the coordinator is; the
  random token keeps anyone from binding the name first.
* Access, both ways, before a byte is exchanged: the server reads the peer's
  credentials (SO_PEERCRED) and refuses any other user; the client refuses a
  server that is not our uid and the coordinator pid named in the segment it
  verified (smpd.trust) -- an abstract name is free again the moment its
  coordinator dies, and anyone may bind it then. Then both sides prove they hold
  the machine's 32-byte key with the standard library's multiprocessing HMAC challenge
  (the key lives in the 0600 segment).
* Messages: JSON in length-prefixed frames (multiprocessing Connection.send_bytes), never
  pickles: a request from a client cannot make the coordinator run code. The standard
  library's module, not multiprocess's (which supervises the CPU processes): both are the
  same protocol, but multiprocess's imports dill, its pickler, which the channel never uses,
  for ~60 ms of every command's start.
* Every read has a deadline (SO_RCVTIMEO), so a stalled client cannot wedge the
  coordinator; nor can one that does not read its reply (stopped with ^Z, or slow): a reply
  larger than the socket's buffer goes from a thread of its own (send_reply), and a send in
  the serving loop gives up after REPLY_STALL_S without progress (SO_SNDTIMEO).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable

from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from smpd import errors
from smpd.host import trust

HANDSHAKE_TIMEOUT_S = 5.0
# A send in the coordinator's serving loop (a reply that fits the socket's buffer, which never waits; or one
# past REPLY_SENDERS busy threads) that makes no progress this long gives its client up. A blocked write
# returns what it sent after this long, and the next gives up after as long again: twice this stays under the
# handshake's HANDSHAKE_TIMEOUT_S, so a command waiting behind that client is still answered.
REPLY_STALL_S = 2.0
CONNECT_TRY_S = 1.0  # one connect() try, then the coordinator's identity is checked again
TICK_S = 0.25  # a ``tick`` (a progress drawn: ~3 ms of the CLI's CPU each at 4096 CPUs, rich's) this often


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def _set_timeo(sock: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO or SO_SNDTIMEO (0: none): the socket stays blocking, its calls bounded."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def _set_rcvtimeo(sock: socket.socket, seconds: float) -> None:
    _set_timeo(sock, socket.SO_RCVTIMEO, seconds)


class Server:
    def __init__(self, address: str, authkey: bytes):
        self.authkey = authkey
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(address)
            self.sock.listen(64)
        except OSError:
            self.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[Connection, int] | None:
        """Accept one client: its connection and its pid (when it connected); None when it is another
        user or fails the handshake."""
        s, _ = self.sock.accept()
        try:
            pid, uid, _gid = peer_credentials(s)
            if uid != os.geteuid():
                s.close()
                return None
            _set_rcvtimeo(s, HANDSHAKE_TIMEOUT_S)
            _set_timeo(s, socket.SO_SNDTIMEO, REPLY_STALL_S)
            conn = Connection(s.detach())
        except OSError:
            s.close()
            return None
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except (OSError, EOFError, Exception):  # AuthenticationError, a timeout, a reset
            conn.close()
            return None
        return conn, pid

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def recv_json(conn: Connection) -> Any:
    return json.loads(conn.recv_bytes(1 << 24).decode())


def send_json(conn: Connection, obj: Any) -> None:
    conn.send_bytes(json.dumps(obj).encode())


# A successful reply is its result's JSON between this head and tail: one JSON object, which a
# client may also take apart without parsing the result (request(raw=True): `status --json`
# passes a 4096-CPU machine's 2.4 MB through as it came).
_RESULT_HEAD, _RESULT_TAIL = b'{"ok": true, "result": ', b"}"


def reply_bytes(reply: dict) -> bytes:
    """The frame's body of ``{"ok": True, "result": ...}`` or of an error_reply()."""
    if reply.get("ok") is True:
        return _RESULT_HEAD + json.dumps(reply["result"]).encode() + _RESULT_TAIL
    return json.dumps(reply).encode()


def send_reply(conn: Connection, reply: dict) -> None:
    """The coordinator's reply. One that fits the connection's send buffer goes at once (it never
    waits for the client). A larger one (a 1024-CPU status is 0.6 MB, 4096's 2.4 MB) waits for its
    client to read it: it goes from a thread of its own, on a descriptor of its own, so that a client
    stopped (^Z) or reading slowly holds no one else's request, and still gets its whole reply when it
    reads (within SENDER_STALL_S of no progress). With REPLY_SENDERS such threads busy, it is sent
    here, under REPLY_STALL_S: that client may then lose it, not the coordinator its other clients.
    So it is when the host refuses the thread (no pid left). OSError: the client left (sent from here)."""
    data = reply_bytes(reply)
    if not fits_send_buffer(conn, len(data)) and _senders.acquire(blocking=False):
        try:
            apart = Connection(os.dup(conn.fileno()))
        except OSError:
            _senders.release()
            raise
        try:
            threading.Thread(target=_send_apart, args=(apart, data), name="smpd-reply", daemon=True).start()
            return
        except RuntimeError:  # the host refused the thread (every pid taken): sent here, as past the threads
            apart.close()
            _senders.release()
    conn.send_bytes(data)


REPLY_SENDERS = 8
SENDER_STALL_S = 600.0
_senders = threading.BoundedSemaphore(REPLY_SENDERS)


def _send_apart(conn: Connection, data: bytes) -> None:
    try:
        set_send_stall(conn, SENDER_STALL_S)
        conn.send_bytes(data)
    except OSError as err:
        print(f"smpd-coord: the client left before its reply ({err})", file=sys.stderr)
    finally:
        conn.close()
        _senders.release()


def fits_send_buffer(conn: Connection, size: int) -> bool:
    """Does a frame of ``size`` bytes fit this connection's send buffer (half of it: the kernel
    counts its own overhead), so that sending it never waits for the client to read?"""
    try:
        with _socket_of(conn) as sock:
            return size + 8 <= sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
    except OSError:
        return False


def set_send_stall(conn: Connection, seconds: float) -> None:
    """A send on ``conn`` that makes no progress for ``seconds`` gives up (SO_SNDTIMEO)."""
    with _socket_of(conn) as sock:
        _set_timeo(sock, socket.SO_SNDTIMEO, seconds)


@contextlib.contextmanager
def _socket_of(conn: Connection):
    """``conn``'s socket, for its options: its own descriptor, left open (no dup() per reply)."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        yield sock
    finally:
        sock.detach()


def _result(data: bytes, raw: bool) -> tuple[bool, Any]:
    """(True, the result: its JSON text when ``raw``) of a successful reply; (False, the reply) of an error."""
    if data.startswith(_RESULT_HEAD) and data.endswith(_RESULT_TAIL):
        body = data[len(_RESULT_HEAD):-len(_RESULT_TAIL)].decode()
        return True, body if raw else json.loads(body)
    return False, json.loads(data.decode())


def error_reply(err: BaseException) -> dict:
    kind = type(err).__name__ if isinstance(err, errors.SmpdError) else "SmpdError"
    status = err.exit_status if isinstance(err, errors.SmpdError) else 1
    return {"ok": False, "error": {"type": kind, "message": str(err), "exit": status}}


def _connect(s: socket.socket, address: str, op: str, timeout_s: float | None,
             server_alive: Callable[[], bool]) -> None:
    """connect(), a try of CONNECT_TRY_S at a time (SO_SNDTIMEO bounds an AF_UNIX connect): a
    listener whose backlog is full would hold a blocking connect for ever, and a name the
    coordinator freed (it stops, or died) may be bound by another user's process that never
    accepts. Between tries: give up when the coordinator is gone, or when ``timeout_s`` ran out."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    _set_timeo(s, socket.SO_SNDTIMEO, CONNECT_TRY_S)
    while True:
        try:
            s.connect(address)
            break
        except BlockingIOError:
            if not server_alive():
                raise errors.CoordinatorGone("the coordinator is gone, and its channel's name is held by a "
                                             "process that does not accept (smpd sent it nothing)") from None
            if deadline is not None and time.monotonic() > deadline:
                raise errors.Timeout(f"the coordinator did not accept '{op}' within {timeout_s:.0f} s "
                                     f"(its queue of waiting clients is full)") from None
    _set_timeo(s, socket.SO_SNDTIMEO, 0)  # a send blocks as before: requests are small


def request(address: str, authkey: bytes, op: str, timeout_s: float | None = None, *, server_pid: int,
            server_alive: Callable[[], bool] = lambda: True, raw: bool = False,
            tick: Callable[[], None] | None = None, **args) -> Any:
    """Send one request to the coordinator ``server_pid`` and return its result, or raise its error here.
    ``server_alive()``: whether that coordinator still runs, asked while a connect waits. ``raw``:
    the result's JSON text, as the coordinator sent it. ``tick()``: called every TICK_S while a
    request with no timeout waits for its answer (`smpd kexec` draws its progress so).

    Raises NotOurs, before anything is sent, when the socket is held by any other process."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _connect(s, address, op, timeout_s, server_alive)
        pid, uid, _gid = peer_credentials(s)
    except (ConnectionRefusedError, FileNotFoundError) as err:
        s.close()
        raise errors.CoordinatorGone(f"the coordinator does not answer on its channel ({err.strerror})") from err
    except BaseException:
        s.close()
        raise
    if uid != os.geteuid() or pid != server_pid:
        s.close()
        # The coordinator frees the name when it closes its channel, going down; anyone may bind it then.
        then = ("its coordinator still runs: the machine is going down, and the name was taken once its channel "
                "closed; `smpd status` again in a moment" if server_alive() else
                "`smpd down` cleans up a machine whose coordinator died")
        raise errors.NotOurs(f"the channel {address[1:]!r} is held by pid {pid} of {trust.describe_uid(uid)}, "
                             f"not by the machine's coordinator (pid {server_pid}): smpd sent it nothing; {then}")
    _set_rcvtimeo(s, HANDSHAKE_TIMEOUT_S)
    conn = Connection(s.detach())
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        send_json(conn, {"op": op, "args": args})
        if timeout_s is not None:
            if not conn.poll(timeout_s):
                raise errors.Timeout(f"the coordinator did not answer '{op}' within {timeout_s:.0f} s")
        else:
            while not conn.poll(1.0 if tick is None else TICK_S):
                if tick is not None:
                    tick()
        ok, reply = _result(conn.recv_bytes(1 << 24), raw)
    except (EOFError, ConnectionResetError, BrokenPipeError) as err:
        raise errors.ChannelClosed(f"the coordinator closed the channel during '{op}'") from err
    except OSError as err:
        if "end of file" not in str(err):  # (multiprocessing's word for a frame cut off)
            raise errors.Timeout(f"the coordinator did not answer '{op}' ({err.strerror or err}); "
                                 f"it may be busy with another request") from err
        raise errors.ChannelClosed(f"the coordinator's reply to '{op}' was cut off: it gives up on a client "
                                   f"that reads none of a reply for {REPLY_STALL_S:.0f} s or more") from err
    finally:
        conn.close()
    if ok:
        return reply
    e = reply["error"]
    cls = getattr(errors, e["type"], errors.SmpdError)
    if not (isinstance(cls, type) and issubclass(cls, errors.SmpdError)):
        cls = errors.SmpdError
    exc = cls.__new__(cls)
    Exception.__init__(exc, e["message"])
    exc.exit_status = e.get("exit", 1)
    raise exc
