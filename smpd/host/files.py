"""Files a user names on the command line (outputs, soak files, configs, the coordinator's log).

smpd often runs as root, and the paths it is given often sit in /tmp, where any
user can plant a symbolic link (at the name, or at any directory on the way to
it), a hard link to a file of root's, or a FIFO under the name root is about to
use. Checking a path and then opening it is a race (the link can appear in
between), so every check is made on the descriptor that is then used, and nothing
is ever reopened by name:

* an output's directory is reached one component at a time, each opened with
  O_NOFOLLOW relative to the last (``_directory``): a symbolic link on the way is
  followed only when root or the user made it, and every directory must be root's
  or the user's and, if others may write in it, sticky (/tmp is; an attacker's
  directory is not). The file is then opened in that directory with O_NOFOLLOW and
  O_NONBLOCK (a FIFO cannot hang us), and fstat must say: a regular file, ours,
  with one name (a second name would be a hard link to someone's file), not on
  /proc, /sys, /dev or /dev/shm; only then is it truncated and written;
* an input's directory is reached the same way (no other user's link or directory
  on the way); the file is opened with O_PATH first (no open side effect: a device
  is never opened for real), must be a regular file of the user's or root's, not on
  /proc, /sys, /dev or /dev/shm, and only then is reopened for reading through that
  descriptor; it is read line by line with a cap on a line's length.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from typing import BinaryIO

from smpd.errors import BadInput, SmpdError
from smpd.host import trust

MAX_LINE = 1 << 20  # no line of a soak file or config comes near 1 MiB
SPECIAL = ("/proc", "/sys", "/dev", "/dev/shm")  # never an output: a kernel knob, a device, a segment


def _special_devices() -> set[int]:
    """The devices of SPECIAL's filesystems and of every one mounted under them (/sys/fs/cgroup,
    /dev/pts, /dev/mqueue, /proc/sys/fs/binfmt_misc...): a mount point's st_dev is its own."""
    points = set(SPECIAL)
    with contextlib.suppress(OSError), open("/proc/self/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1:
                point = fields[1].decode(errors="replace").replace("\\040", " ")
                if any(point == p or point.startswith(p + "/") for p in SPECIAL):
                    points.add(point)
    out = set()
    for p in points:
        try:
            out.add(os.stat(p).st_dev)
        except OSError:
            pass
    return out


def _on_special_device(fd: int) -> bool:
    """Is the file (or directory) ``fd`` on one of the filesystems of _special_devices()?"""
    return os.fstat(fd).st_dev in _special_devices()


def _not_for_output(path: str, what: str) -> str:
    return f"{what} {path} is on /proc, /sys, /dev or /dev/shm: not a place for smpd's output"


def _trusted_dir(st: os.stat_result) -> bool:
    """A directory nobody else can plant a name in unnoticed: root's or ours, and not writable by
    others unless sticky (there they cannot remove or rename what is ours)."""
    if st.st_uid not in (0, trust.me()):
        return False
    return not st.st_mode & 0o022 or bool(st.st_mode & stat.S_ISVTX)


def _directory(path: str, what: str, doing: str = "writes") -> tuple[int, str]:
    """(descriptor of the directory that holds ``path``, the file's name in it), reached safely;
    ``doing`` says what smpd would do there, for the refusal."""
    full = os.path.abspath(path)
    parent, name = os.path.split(full)
    if not name:
        raise BadInput(f"{what} {path} names a directory; give a file name")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = "/"
    hops = 0
    parts = [p for p in parent.split("/") if p]
    try:
        while parts:
            part = parts.pop(0)
            if part in (".", ""):
                continue
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise BadInput(f"{what} {path}: directory {os.path.join(walked, part)} does not exist") from None
            if stat.S_ISLNK(st.st_mode):  # followed only when root or the user made it
                hops += 1
                if st.st_uid not in (0, trust.me()) or hops > 40:
                    raise BadInput(f"{what} {path}: {os.path.join(walked, part)} is a symbolic link made by "
                                   f"{trust.describe_uid(st.st_uid)}; smpd does not follow it")
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd, walked = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "/"
                parts = [p for p in target.split("/") if p] + parts
                continue
            if part == "..":
                nfd = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            else:
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except NotADirectoryError:
                    raise BadInput(f"{what} {path}: {os.path.join(walked, part)} is not a directory") from None
            os.close(fd)
            fd, walked = nfd, os.path.normpath(os.path.join(walked, part))
            if not _trusted_dir(os.fstat(fd)):
                owner = trust.describe_uid(os.fstat(fd).st_uid)
                raise BadInput(f"{what} {path}: directory {walked} is {owner}'s or writable by others without "
                               f"the sticky bit; smpd {doing} only where nobody else can plant a name")
        return fd, name
    except BadInput:
        os.close(fd)
        raise
    except OSError as err:
        os.close(fd)
        if err.errno == errno.ELOOP:
            raise BadInput(f"{what} {path}: a directory on the way became a symbolic link; smpd does not "
                           f"follow it") from None
        raise BadInput(f"{what} {path}: {err.strerror}") from None


def _refuse_opened(st: os.stat_result, path: str, what: str) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file (a device, a FIFO, a socket?)"
    if st.st_uid != trust.me():
        return f"{what} {path} belongs to {trust.describe_uid(st.st_uid)}, not to you: smpd will not write it"
    if st.st_nlink != 1:
        return f"{what} {path} has {st.st_nlink} names (hard links): smpd will not write it"
    if st.st_dev in _special_devices():
        return _not_for_output(path, what)
    return None


def open_output(path: str, what: str, *, append: bool = False, create: bool = True, read: bool = False,
                exclusive: bool = False) -> BinaryIO:
    """An output file, opened safely (see the module's docstring); truncated unless ``append``,
    ``read`` (then read-write) or ``exclusive`` (then it must not exist yet).

    Raises BadInput naming ``what`` (e.g. '--json') when the name or a directory on the way is
    someone else's link, the file a FIFO, a device, another user's file or a second name for one,
    or it cannot be opened."""
    if not path:
        raise BadInput(f"{what} needs a file name; '' is none")
    dfd, name = _directory(path, what)
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_RDWR if read else os.O_WRONLY)
    flags |= os.O_CREAT if create else 0
    flags |= os.O_EXCL if exclusive else 0
    flags |= os.O_APPEND if append else 0
    try:
        fd = _open_in(dfd, name, flags, path, what)
    finally:
        os.close(dfd)
    try:
        refusal = _refuse_opened(os.fstat(fd), path, what)
        if refusal:
            raise BadInput(refusal)
        os.set_blocking(fd, True)
        if not append and not read and not exclusive:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, ("r+b" if read else "ab" if append else "wb"), buffering=0)
    except OSError as err:  # (ftruncate of a file another process executes, ...): bad input, said
        os.close(fd)
        raise BadInput(f"{what} {path} cannot be written ({err.strerror or err})") from None
    except BaseException:
        os.close(fd)
        raise


def _open_in(dfd: int, name: str, flags: int, path: str, what: str) -> int:
    """open_output's open() of ``name`` in directory ``dfd``; BadInput naming ``what`` and ``path``
    when refused. A new file is never made on /proc, /sys, /dev or /dev/shm: judged before O_CREAT,
    which would leave an empty file there."""
    if flags & os.O_CREAT and _on_special_device(dfd):
        raise BadInput(_not_for_output(path, what))
    try:
        return os.open(name, flags, 0o644, dir_fd=dfd)
    except FileExistsError:
        raise
    except OSError as err:
        islink = stat.S_ISLNK(_lstat_in(dfd, name))
        if err.errno == errno.ELOOP or islink:  # (in a sticky directory it may be EACCES)
            raise BadInput(f"{what} {path} is a symbolic link; smpd does not write through links: "
                           f"give the file's own path") from None
        if err.errno == errno.ENOENT and not flags & os.O_CREAT:
            raise BadInput(f"{what} {path} does not exist") from None
        raise BadInput(f"{what} {path} cannot be opened for writing ({err.strerror})") from None


def write_all(f: BinaryIO, data: bytes) -> None:
    """Every byte of ``data`` to ``f`` (open_output's file is unbuffered: one write() may take only
    part of it, on a nearly full filesystem or past a file-size limit, and say so only in its count);
    OSError when the rest cannot be written."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def write_output(path: str, what: str, data: bytes, exclusive: bool = False) -> None:
    """``data`` to the output ``path`` (open_output: no link followed, no other user's file written),
    every byte of it, or SmpdError and nothing of it left (a full filesystem, a file-size limit)."""
    with open_output(path, what, exclusive=exclusive) as f:
        try:
            write_all(f, data)
        except OSError as err:
            remove_output(f, path, what)
            raise SmpdError(f"{what} {path} could not be written ({err.strerror or err}); "
                            f"nothing of it is left") from None


def write_output_or_keep(path: str, what: str, data: bytes, kept_as: str,
                         name: str) -> tuple[str | None, SmpdError | None]:
    """``data`` to the output ``path`` (write_output), or, when that fails now (refused: it may have
    become another user's file since the check before the run, its name being in our command line;
    or the filesystem is full), to a new file of ours in $TMPDIR named ``kept_as``-RANDOM.json, made
    as safely as any output (a directory another user owns or may write without the sticky bit is
    refused), so that a run's result is not lost at its end. Returns where the data went (None:
    nowhere), and the error, which says where ``name`` (what the data is: "the report's JSON") went."""
    try:
        write_output(path, what, data)
        return path, None
    except SmpdError as err:
        first = err
    kept = os.path.join(tempfile.gettempdir(), f"{kept_as}-{secrets.token_hex(6)}.json")
    try:
        write_output(kept, f"{name} kept instead", data, exclusive=True)
    except (SmpdError, FileExistsError) as err:
        return None, type(first)(f"{first}; {name} could not be kept elsewhere either ({err}): the report "
                                 f"above is all there is of this run")
    return kept, type(first)(f"{first}; {name} is in {kept} instead")


def remove_output(f: BinaryIO, path: str, what: str) -> None:
    """Unlink ``path`` if it is still the file ``f`` that open_output gave us (the same inode, reached
    the same careful way: no other user can rename it in a directory open_output accepts); otherwise
    leave it, emptied. For an output whose write failed: no partial file is left."""
    with contextlib.suppress(OSError):
        f.truncate(0)
    try:
        dfd, name = _directory(path, what)
    except (BadInput, OSError):
        return
    try:
        if os.path.samestat(os.fstat(f.fileno()), os.stat(name, dir_fd=dfd, follow_symlinks=False)):
            os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _lstat_in(dfd: int, name: str) -> int:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
    except OSError:
        return 0


def check_output(path: str, what: str) -> None:
    """Refuse, before a run, an output path ``open_output`` would refuse at the end. Creates
    nothing under that name (a new file is judged by an unnamed one in its directory)."""
    if not path:
        raise BadInput(f"{what} needs a file name; '' is none")
    dfd, name = _directory(path, what)
    try:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise BadInput(f"{what} {path} is a symbolic link; smpd does not write through links: "
                           f"give the file's own path")
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise BadInput(f"{what} {path} is a directory; give a file name")
        if st is not None:
            refusal = _refuse_opened(st, path, what)
            if refusal:
                raise BadInput(refusal)
            open_output(path, what, append=True, create=False).close()  # writable? (appending nothing changes nothing)
            return
        if _on_special_device(dfd):  # (a new file: judged by its directory)
            raise BadInput(_not_for_output(path, what))
        try:
            tempfile.TemporaryFile(dir=f"/proc/self/fd/{dfd}").close()
        except OSError as err:
            raise BadInput(f"{what} {path}: its directory is not writable ({err.strerror})") from None
    finally:
        os.close(dfd)


def open_input(path: str, what: str, _hops: int = 0) -> BinaryIO:
    """A file to read: reached as an output's directory is (``_directory``), the user's or root's,
    opened with O_PATH (nothing happens to a device), checked to be a regular file on that
    descriptor, and only then opened for reading through it."""
    if not path:
        raise BadInput(f"{what} needs a file name; '' is none")
    dfd, name = _directory(path, what, "reads")
    try:
        try:
            lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise BadInput(f"{what} {path} does not exist") from None
        if stat.S_ISLNK(lst.st_mode):  # followed only when root or the user made it
            if lst.st_uid not in (0, trust.me()):
                raise BadInput(f"{what} {path} is a symbolic link of {trust.describe_uid(lst.st_uid)}; smpd "
                               f"reads through no other user's link: give the file's own path")
            if _hops >= 40:
                raise BadInput(f"{what} {path}: too many symbolic links")
            target = os.path.join(os.path.dirname(os.path.abspath(path)), os.readlink(name, dir_fd=dfd))
            return open_input(target, what, _hops + 1)
        try:
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as err:
            raise BadInput(f"{what} {path} cannot be read: {err.strerror}") from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(pfd)
        if stat.S_ISDIR(st.st_mode):
            raise BadInput(f"{what} {path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{what} {path} is not a regular file (a device, a FIFO, a socket?)")
        if st.st_dev in _special_devices():  # /proc/kmsg is "regular", and reading it takes the log
            raise BadInput(f"{what} {path} is on /proc, /sys, /dev or /dev/shm: not a file smpd reads")
        if st.st_uid not in (0, trust.me()):  # (checked on the descriptor: no name swapped in since)
            raise BadInput(f"{what} {path} belongs to {trust.describe_uid(st.st_uid)}; smpd reads only your "
                           f"own files or root's: copy it to make it yours")
        try:
            fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise BadInput(f"{what} {path} cannot be read: {err.strerror}") from None
    finally:
        os.close(pfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # the same file, but say it twice
            raise BadInput(f"{what} {path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_lines(f: BinaryIO, path: str, what: str, max_line: int = MAX_LINE):
    """Yield whole lines (without their newline) one at a time, then ``(None, tail)`` with what
    follows the last newline. BadInput when a line is longer than ``max_line``: then it is no file
    of ours, whatever its size (and nothing was kept of it)."""
    n = 0
    while True:
        try:
            line = f.readline(max_line + 1)
        except OSError as err:
            raise BadInput(f"{what} {path} cannot be read: {err.strerror}") from None
        if not line.endswith(b"\n"):
            if len(line) > max_line:
                raise BadInput(f"{what} {path}: line {n + 1} is over {max_line >> 10} KiB; "
                               f"this is not a file smpd wrote")
            yield None, line
            return
        n += 1
        yield line[:-1], b""
