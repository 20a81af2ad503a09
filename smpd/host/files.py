"""Files a user names on the command line (outputs, soak files, configs, the coordinator's log).

smpd often runs as root, and the paths it is given often sit in /tmp, where any
user can plant a symbolic link, a hard link to a file of root's, or a FIFO under
the name root is about to use. Checking a path and then opening it is a race
(the link can appear in between), so checks are made on the descriptor that is
then used, and nothing is ever reopened by name:

* an output is opened with O_NOFOLLOW (a link at the name is refused, not
  followed) and O_NONBLOCK (a FIFO cannot hang us), then fstat must say: a regular
  file, ours, with one name (a second name would be a hard link to someone's
  file); only then is it truncated and written;
* an input is opened with O_NONBLOCK and must be a regular file (a FIFO or a
  device is refused before a byte is read), and is read line by line with a cap
  on a line's length, so a huge or endless file costs nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from smpd.errors import BadInput
from smpd.host import trust

MAX_LINE = 1 << 20  # no line of a soak file or config comes near 1 MiB


def _refuse_opened(st: os.stat_result, path: str, what: str) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file (a device, a FIFO, a socket?)"
    if st.st_uid != trust.me():
        return f"{what} {path} belongs to {trust.describe_uid(st.st_uid)}, not to you: smpd will not write it"
    if st.st_nlink != 1:
        return f"{what} {path} has {st.st_nlink} names (hard links): smpd will not write it"
    return None


def open_output(path: str, what: str, *, append: bool = False, create: bool = True, read: bool = False) -> BinaryIO:
    """An output file, opened safely (see the module's docstring); truncated unless ``append``.

    Raises BadInput naming ``what`` (e.g. '--json') when the name is a link, a FIFO,
    a device, another user's file or a second name for one, or cannot be opened."""
    if not path:
        raise BadInput(f"{what} needs a file name; '' is none")
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_RDWR if read else os.O_WRONLY)
    flags |= os.O_CREAT if create else 0
    flags |= os.O_APPEND if append else 0
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP or os.path.islink(path):  # (in a sticky directory it may be EACCES)
            raise BadInput(f"{what} {path} is a symbolic link; smpd does not write through links: "
                           f"give the file's own path") from None
        raise BadInput(f"{what} {path} cannot be opened for writing ({err.strerror})") from None
    try:
        refusal = _refuse_opened(os.fstat(fd), path, what)
        if refusal:
            raise BadInput(refusal)
        os.set_blocking(fd, True)
        if not append and not read:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, ("r+b" if read else "ab" if append else "wb"), buffering=0)
    except BaseException:
        os.close(fd)
        raise


def check_output(path: str, what: str) -> None:
    """Refuse, before a run, an output path ``open_output`` would refuse at the end. Creates
    nothing under that name (a new file is judged by an unnamed one in its directory)."""
    import tempfile

    if not path:
        raise BadInput(f"{what} needs a file name; '' is none")
    p = os.path.abspath(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise BadInput(f"{what} {path}: {err.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise BadInput(f"{what} {path} is a symbolic link; smpd does not write through links: give the file's own path")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{what} {path} is a directory; give a file name")
    if st is not None:
        refusal = _refuse_opened(st, path, what)
        if refusal:
            raise BadInput(refusal)
        open_output(path, what, append=True, create=False).close()  # writable? (appending nothing changes nothing)
        return
    parent = os.path.dirname(p)
    if not os.path.isdir(parent):
        raise BadInput(f"{what} {path}: directory {parent} does not exist")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as err:
        raise BadInput(f"{what} {path}: directory {parent} is not writable ({err.strerror})") from None


def open_input(path: str, what: str) -> BinaryIO:
    """A file to read: a regular file (checked on the descriptor, before a byte is read)."""
    if not path:
        raise BadInput(f"{what} needs a file name; '' is none")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadInput(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise BadInput(f"{what} {path} is a directory") from None
    except OSError as err:
        raise BadInput(f"{what} {path} cannot be read: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadInput(f"{what} {path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{what} {path} is not a regular file (a device, a FIFO, a socket?)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_lines(f: BinaryIO, path: str, what: str, max_line: int = MAX_LINE) -> tuple[list[bytes], bytes]:
    """Whole lines (without their newline) and what follows the last newline; BadInput when a
    line is longer than ``max_line`` (then it is no file of ours, whatever its size)."""
    lines: list[bytes] = []
    while True:
        try:
            line = f.readline(max_line + 1)
        except OSError as err:
            raise BadInput(f"{what} {path} cannot be read: {err.strerror}") from None
        if not line:
            return lines, b""
        if not line.endswith(b"\n"):
            if len(line) > max_line:
                raise BadInput(f"{what} {path}: line {len(lines) + 1} is over {max_line >> 20} MiB; "
                               f"this is not a file smpd wrote")
            return lines, line
        lines.append(line[:-1])
