"""The one POSIX shared-memory segment of a machine: create, attach, close, unlink.

Its creator keeps the descriptor (``fd``) for the lean process the CPU processes are forked
from (smpd.daemon.template), which maps the same segment by that descriptor: no name to trust.

Lifetime follows posix_ipc's rule (nothing is unlinked behind your back):
``close()`` lets go of this process's mapping; ``unlink()`` destroys the name, once,
by its owner (the coordinator, its janitor, or ``smpd down`` on a stale machine).
Fields start as "nothing open" so ``close()`` works at any point, even after a
constructor that failed halfway.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import TYPE_CHECKING

from smpd.machine import layout as L
from smpd.host import names
from smpd.errors import BadInput, HostTooSmall, LayoutMismatch

if TYPE_CHECKING:
    import posix_ipc

# posix_ipc is imported where a segment is made, attached or unlinked by name: the template the CPU
# processes are forked from maps its segment by the descriptor it is handed (``inherit``), and each
# library it loads (posix_ipc, librt, libpthread) is five more memory areas every fork copies
# (smpd.daemon.template).


class SegmentBeingCreated(BadInput):
    """The segment exists but its header is not written yet: a machine is coming up."""


class SegmentExists(BadInput):
    """``create`` found the name taken by a segment of ours: a machine is up or coming up."""


FOREIGN_REMEDY = "pick another --name, or ask its owner or an administrator to remove it"
OWN_REMEDY = "remove it with `smpd down --force`"




class Segment:
    def __init__(self, name: str):
        self.name = name
        self.mm: mmap.mmap | None = None
        self.buf: memoryview | None = None
        self.u32: memoryview | None = None  # the whole segment as u32 words (hot path)
        self.u16: memoryview | None = None
        self.u64: memoryview | None = None
        self._cb_cols: dict[str, tuple[memoryview, int, int]] = {}  # cb_column() of each word field, once mapped
        self.geo: L.Geometry | None = None
        self.fd = -1  # the creator's descriptor (create), kept until close()
        self._ram_reserved = False  # reserve_ram() done

    # -- construction ------------------------------------------------------

    @classmethod
    def create(cls, name: str, geo: L.Geometry, owner_pid: int, owner_start: int, machine: str = "") -> "Segment":
        """Create the segment O_EXCL, mode 0600, sized for ``geo``, for machine ``machine``.

        The owner (coordinator pid and create time) and the machine's name are written
        before the magic, so a reader that sees the magic can always tell whether the
        owner is alive, and whose name this is.
        Raises SegmentExists when the name is taken (NotOurs when someone else took it),
        HostTooSmall when the host refuses its size.
        """
        import posix_ipc

        seg = cls(name)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=geo.size)
        except posix_ipc.ExistentialError:
            try:  # a name someone else took says so; one of ours is a machine, up or coming up
                cls.attach(name).close()
            except SegmentBeingCreated:
                pass
            raise SegmentExists(f"segment {name} exists: another `smpd up` made it first") from None
        except (ValueError, OSError) as err:  # ftruncate refused: RLIMIT_FSIZE (EFBIG), or tmpfs full
            posix_ipc.unlink_shared_memory(name)  # ours: O_CREX succeeded before the size failed
            raise HostTooSmall(f"the host refused a {geo.size / 2**20:.1f} MiB shared-memory segment "
                               f"({err}); check `ulimit -f` and the free space of {names.SHM_DIR}") from None
        try:
            seg.fd = os.dup(shm.fd)
            seg._map(shm, geo.size)
            _reserve(seg.fd, 0, geo.mem_off)  # RAM: reserve_ram(), by its first writer
            seg.geo = geo
            seg.set_hdr("coordinator_pid", owner_pid)
            seg.set_hdr("coordinator_start", owner_start)
            seg.set_hdr("name", machine.encode())
            seg._write_geometry(geo)
        except BaseException:
            seg.close()
            posix_ipc.unlink_shared_memory(name)
            raise
        return seg

    @classmethod
    def attach(cls, name: str) -> "Segment":
        """Map an existing segment after checking it is ours and of our layout version.

        Ownership comes first, before a byte is read (smpd.trust): a regular file of
        our uid, mode 0600; a symbolic link is not followed. Raises
        posix_ipc.ExistentialError when there is no such segment, NotOurs when the
        name is someone else's, and LayoutMismatch when it is not a segment this smpd
        can read.
        """
        # Imported here, not above: a CPU process maps its segment by inheritance and never attaches
        # by name, and trust's psutil imports threading, whose at-fork hook then runs in every CPU
        # process the template forks (~120 of its ~600 page faults: smpd.daemon.template).
        import posix_ipc

        from smpd.host import trust

        seg = cls(name)
        path = names.SHM_DIR + name
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise
        except (posix_ipc.Error, OSError, ValueError) as err:  # a link, a directory, a socket, a 0600 file...
            raise trust.refuse_entry(path, "an smpd segment", FOREIGN_REMEDY) or \
                LayoutMismatch(f"{path} cannot be opened as a segment ({err}); {OWN_REMEDY}") from None
        try:
            st = os.fstat(shm.fd)
            trust.check_stat(st, path, "an smpd segment",
                             FOREIGN_REMEDY if st.st_uid != trust.me() else OWN_REMEDY)
            size = st.st_size
            if size == 0:  # shm_open() done, ftruncate() not yet: a machine is coming up
                raise SegmentBeingCreated(f"segment {name} is being created")
            if size < L.PAGE or size % 8:  # not even the page that says which layout it is; or words
                # that do not tile it (its views are u32 and u64 arrays): never one smpd made
                raise LayoutMismatch(f"segment {name} is {size} bytes, not the size of an smpd segment; "
                                     f"{OWN_REMEDY}")
            seg._map(shm, size)
            magic = seg.hdr("magic")
            if magic == bytes(8):
                raise SegmentBeingCreated(f"segment {name} is being created")
            version = seg.hdr("layout_version")
            if magic != L.MAGIC or version != L.LAYOUT_VERSION:
                what = f"layout version {version}" if magic == L.MAGIC else "no smpd magic"
                raise LayoutMismatch(
                    f"segment {name} has {what}; this smpd reads layout version "
                    f"{L.LAYOUT_VERSION} only. Stop that machine with the smpd that made it, "
                    f"or {OWN_REMEDY}"
                )
            if size < L.HEADER_SIZE:
                raise LayoutMismatch(f"segment {name} is {size} bytes, smaller than its header; {OWN_REMEDY}")
            seg._read_geometry()
            if seg.geo.size != size or seg.geo.mem_off != seg.hdr("mem_off"):
                raise LayoutMismatch(f"segment {name} header does not match its size ({size} bytes)")
        except BaseException:
            if shm.fd >= 0:
                shm.close_fd()
            seg.close()
            raise
        return seg

    @classmethod
    def inherit(cls, name: str, fd: int) -> "Segment":
        """Map the segment whose descriptor ``fd`` our creator handed down (smpd.daemon.template); ``fd`` is closed."""
        seg = cls(name)
        try:
            seg.mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        seg._views()
        try:
            seg._read_geometry()
            if seg.geo.size != len(seg.mm):  # its header is the segment's words: as attach() checks
                raise LayoutMismatch(f"segment {name} header does not match its size ({len(seg.mm)} bytes)")
        except BaseException:
            seg.close()
            raise
        return seg

    def _read_geometry(self) -> None:
        self.geo = L.Geometry(ncpus=self.hdr("ncpus"), ram_pages=self.hdr("ram_pages"))

    def _map(self, shm: posix_ipc.SharedMemory, size: int) -> None:
        try:
            self.mm = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        self._views()

    def _views(self) -> None:
        self.buf = memoryview(self.mm)
        self.u32 = self.buf.cast("I")
        self.u16 = self.buf.cast("H")
        self.u64 = self.buf.cast("Q")
        # Each word field of the control blocks as cb_column() gives it, looked up once per read: cb()
        # and set_cb() are the coordinator's commonest calls (~4000 a soak trial at 64 CPUs).
        self._cb_cols = {field: self.cb_column(field) for field in _CB_WORDS}

    def _write_geometry(self, geo: L.Geometry) -> None:
        for field, value in (
            ("layout_version", L.LAYOUT_VERSION), ("ncpus", geo.ncpus),
            ("nlines", geo.nlines), ("npages", geo.npages),
            ("mem_off", geo.mem_off), ("dir_off", geo.dir_off), ("seg_size", geo.size),
            ("ram_pages", geo.ram_pages),
        ):
            self.set_hdr(field, value)
        self.set_hdr("magic", L.MAGIC)  # last: a reader sees a whole header or none

    # -- teardown ----------------------------------------------------------

    def close(self) -> None:
        """Let go of this process's mapping (the segment itself stays)."""
        self._cb_cols = {}  # its views are released next
        for view in ("u16", "u32", "u64", "buf"):
            v = getattr(self, view)
            if v is not None:
                v.release()
                setattr(self, view, None)
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def unlink(self) -> None:
        """Destroy the segment's name; mappings stay valid until closed."""
        unlink(self.name)

    # -- fields ------------------------------------------------------------

    def hdr(self, field: str):
        word = _HDR_WORDS.get(field)
        if word is not None:
            i, size = word
            return (self.u64 if size == 8 else self.u32)[i]
        off, s = L.HEADER[field]
        (v,) = s.unpack_from(self.buf, off)
        return v

    def set_hdr(self, field: str, value) -> None:
        word = _HDR_WORDS.get(field)
        if word is not None:
            i, size = word
            (self.u64 if size == 8 else self.u32)[i] = value
            return
        off, s = L.HEADER[field]
        s.pack_into(self.buf, off, value)

    def hdr_str(self, field: str) -> str:
        return self.hdr(field).rstrip(b"\0").decode("utf-8", "replace")

    def cb(self, cpu: int, field: str):
        col = self._cb_cols.get(field)
        if col is not None:
            words, i0, stride = col
            return words[i0 + cpu * stride]
        off, s = L.CB[field]
        (v,) = s.unpack_from(self.buf, self.geo.cb_off(cpu) + off)
        return v

    def set_cb(self, cpu: int, field: str, value) -> None:
        col = self._cb_cols.get(field)
        if col is not None:
            words, i0, stride = col
            words[i0 + cpu * stride] = value
            return
        off, s = L.CB[field]
        s.pack_into(self.buf, self.geo.cb_off(cpu) + off, value)

    def clear_cb(self, cpu: int, ranges: tuple[tuple[int, int], ...]) -> None:
        """Zero ``cpu``'s control-block bytes in ``ranges`` (L.cb_ranges of the fields)."""
        base, buf = self.geo.cb_off(cpu), self.buf
        for off, n in ranges:
            buf[base + off:base + off + n] = bytes(n)

    def wake_mask(self, cpu: int) -> int:
        """What is raised in ``cpu``'s wake words and not taken yet, as a wake mask: one byte per
        L.WAKE_* kind (WAKE_WRITE from `mon_write`, the others from `wake`), as CpuCore takes it."""
        return self.cb(cpu, "wake") & ~0xFF | (1 if self.cb(cpu, "mon_write") else 0)

    def wake_raised(self, cpu: int) -> bool:
        """Is a byte raised in either of ``cpu``'s wake words: something it has not taken yet?"""
        return self.wake_mask(cpu) != 0

    def cb_index32(self, cpu: int, field: str) -> int:
        """Index of a u32 control-block field in ``self.u32`` (for hot loops)."""
        off, s = L.CB[field]
        assert s.size == 4
        return (self.geo.cb_off(cpu) + off) // 4

    def cb_index(self, cpu: int, field: str) -> int:
        """Index of a control-block field in ``self.u32`` or ``self.u64``, by its size."""
        off, s = L.CB[field]
        return (self.geo.cb_off(cpu) + off) // s.size

    def cb_column(self, field: str) -> tuple[memoryview, int, int]:
        """An unsigned word field of every CPU's control block, for loops over all CPUs: the array
        that holds it, CPU 0's index there and one CPU's stride (``a[i0 + cpu * stride]``)."""
        i, size = _CB_WORDS[field]
        return (self.u64 if size == 8 else self.u32), L.CB_OFF // size + i, L.CB_SIZE // size

    def cb_byte(self, cpu: int, field: str, byte: int) -> int:
        return self.geo.cb_off(cpu) + L.CB[field][0] + byte

    def reserve_ram(self) -> None:
        """Back emulated RAM, once, before its first write (smpd.kernel.boot.write_ram, before any
        SIPI: nothing reads or writes RAM before it). Not in create(): there it would cost the bring-up
        its time (~15 ms at 1024 CPUs) before the template may fork; here it overlaps the forks, as
        the page faults it spares the RAM's writes did."""
        if not self._ram_reserved:
            _reserve(self.fd, self.geo.mem_off, self.geo.size - self.geo.mem_off)
            self._ram_reserved = True

    def mem_u32(self, addr: int) -> int:
        """Read a u32 of emulated memory (reads never need the bus)."""
        return struct.unpack_from("<I", self.buf, self.geo.mem_off + addr - L.PHYS_BASE)[0]

    def mem_off(self, addr: int) -> int:
        """Offset in ``buf`` of emulated physical ``addr``."""
        return self.geo.mem_off + addr - L.PHYS_BASE


def _reserve(fd: int, off: int, size: int) -> None:
    """Give the segment's pages in [off, off + size) their memory now. tmpfs gives a page memory only
    when it is first written: a /dev/shm that fills after smpd.host.hostinfo's free-space check
    (another user's files, another machine coming up) would end whichever process first wrote a page
    it cannot have with SIGBUS. Here it is ENOSPC, said as the host's refusal. Memory the machine
    takes anyway: the bring-up writes every control block and all of RAM."""
    try:
        os.posix_fallocate(fd, off, size)
    except OSError as err:
        raise HostTooSmall(f"the host refused to back {size / 2**20:.1f} MiB of a shared-memory segment "
                           f"({err.strerror or err}); check the free space of {names.SHM_DIR}") from None


def _words(fields: dict) -> dict[str, tuple[int, int]]:
    """The unsigned words of a field table, each read and written by one aligned load or store: its
    index in ``u32`` or ``u64`` (from the table's start) and its size. A struct packs a value byte
    by byte into the segment, after zeroing its bytes, so a process reading it meanwhile (a CPU,
    the coordinator, `smpd status`, the janitor) could see 0 or half of it."""
    return {name: (off // s.size, s.size) for name, (off, s) in fields.items()
            if s.format in ("<I", "<Q") and off % s.size == 0}


assert L.CB_OFF % 8 == 0 and L.CB_SIZE % 8 == 0
_HDR_WORDS, _CB_WORDS = _words(L.HEADER), _words(L.CB)


def unlink(name: str) -> bool:
    """Unlink a segment by name; True if it existed."""
    import posix_ipc

    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False
