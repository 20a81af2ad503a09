"""The CLI <-> coordinator channel: local, owner-only, authenticated, one request per connection.

* Transport: an abstract-namespace Unix socket (``@smpd-<user>-<machine>``): no file
  to leave behind, gone the instant the coordinator is.
* Access: the server reads the peer's uid (SO_PEERCRED) and refuses any other user
  before a byte is exchanged; then both sides prove they hold the machine's
  32-byte key with multiprocess's HMAC challenge (the key lives in the 0600 segment).
* Messages: JSON in length-prefixed frames (multiprocess Connection.send_bytes), never
  pickles: a request from a client cannot make the coordinator run code.
* Every read has a deadline (SO_RCVTIMEO), so a stalled client cannot wedge the
  coordinator.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from multiprocess.connection import Connection, answer_challenge, deliver_challenge

from smpd import errors

HANDSHAKE_TIMEOUT_S = 5.0


def _set_rcvtimeo(sock: socket.socket, seconds: float) -> None:
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


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

    def accept(self) -> Connection | None:
        """Accept one client; None when it is another user or fails the handshake."""
        s, _ = self.sock.accept()
        try:
            pid, uid, gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                s.close()
                return None
            _set_rcvtimeo(s, HANDSHAKE_TIMEOUT_S)
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
        return conn

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def recv_json(conn: Connection) -> Any:
    return json.loads(conn.recv_bytes(1 << 24).decode())


def send_json(conn: Connection, obj: Any) -> None:
    conn.send_bytes(json.dumps(obj).encode())


def error_reply(err: BaseException) -> dict:
    kind = type(err).__name__ if isinstance(err, errors.SmpdError) else "SmpdError"
    status = err.exit_status if isinstance(err, errors.SmpdError) else 1
    return {"ok": False, "error": {"type": kind, "message": str(err), "exit": status}}


def request(address: str, authkey: bytes, op: str, timeout_s: float | None = None, **args) -> Any:
    """Send one request and return its result, or raise the coordinator's error here."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(address)
    except (ConnectionRefusedError, FileNotFoundError) as err:
        s.close()
        raise errors.CoordinatorGone(f"the coordinator does not answer on its channel ({err.strerror})") from err
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
            while not conn.poll(1.0):
                pass
        reply = recv_json(conn)
    except (EOFError, ConnectionResetError, BrokenPipeError) as err:
        raise errors.CoordinatorGone(f"the coordinator closed the channel during '{op}'") from err
    except OSError as err:  # the handshake's SO_RCVTIMEO ran out: it is busy or wedged
        raise errors.Timeout(f"the coordinator did not answer '{op}' ({err.strerror or err}); "
                             f"it may be busy with another request") from err
    finally:
        conn.close()
    if reply.get("ok"):
        return reply.get("result")
    e = reply["error"]
    cls = getattr(errors, e["type"], errors.SmpdError)
    if not (isinstance(cls, type) and issubclass(cls, errors.SmpdError)):
        cls = errors.SmpdError
    exc = cls.__new__(cls)
    Exception.__init__(exc, e["message"])
    exc.exit_status = e.get("exit", 1)
    raise exc
