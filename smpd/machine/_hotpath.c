/*
 * smpd._hotpath: the two halves of a kick, and an INIT with what follows it, compiled.
 *
 * A kick is a cache-line conversation: the coordinator stores control, the parked
 * CPU sees it and stores status, the coordinator sees that. In Python each side
 * pays for its interpreter between those moves (the woken CPU's path to its
 * acknowledgement was ~3 us warm and ~55 us cache-cold after a sleep), so the
 * latency measured was CPython's, not the conversation's. This module runs the
 * same steps, over the same segment, with the same outcomes, in C (one step is its
 * own: a spinning CPU with an Ack also watches the control word it monitors, which
 * the Python Waiter leaves to the bus's WRITE byte; same outcome, sooner):
 *
 *   Waiter.wait()       the CPU's watch loop (smpd.cpu.Cpu.wait): spin on the
 *                       wake words (and, when armed with an Ack, first on the
 *                       control word it monitors), optionally sleep in sigwaitinfo() until
 *                       the bus rings the doorbell signal, and, with the Ack, the
 *                       woken path of mwait_play_dead() through its
 *                       acknowledgement: page checks, control, status.
 *   Kicker.kick_one()   the coordinator's kick of one CPU (smpd.kick.kick_one):
 *                       smp_kick_mwait_play_dead()'s loop of control writes
 *                       through the bus's rule (store, fence, directory, wake
 *                       byte, fence, doorbell; for a CPU that watches its
 *                       control word, its first looks at status come between the store and the
 *                       rest) and udelay(5) rounds. Kicker.kick_each(): its
 *                       loop over CPUs ("Does it sit in mwait_play_dead() ?").
 *
 *   Init                an INIT that comes to an idle, halted, parked (MWAIT: its
 *                       monitor disarmed) or INIT-held CPU: alone (a reset's first message; 6.5's
 *                       smp_park_other_cpus_in_init()), or followed by SIPI (a kernel
 *                       starting its APs), or by SIPI and CPU_DOWN (a reset that
 *                       leaves the CPU offline). A wait given one takes it
 *                       (init_reset(), wait-for-SIPI's stores; for a SIPI,
 *                       start_secondary() and smp_callin() in a generation the Python
 *                       path has started this CPU in before, or generation 1 as the
 *                       template found it; for CPU_DOWN,
 *                       play_dead() into mwait_play_dead()'s MONITOR; the
 *                       acknowledgement) and goes on waiting (take_init): parked, as
 *                       MWAIT, with that generation's Ack (the pre-fix kernel's: none).
 *                       So does a CPU_DOWN alone to a CPU running a generation it knows
 *                       (`smpd offline`), and a REBOOT alone, into HLT.
 *
 * Everything outside those paths (interrupt handlers, other IPIs, foreign bytes)
 * stays in Python: the C returns to it whenever the wake-up is anything but a kick
 * it can acknowledge or such an INIT. smpd.hotpath chooses between this and the
 * pure Python loops; both are tested against the same machine.
 *
 * Signals: Python handlers (NMI/SMI/MCE) only run when the interpreter gets
 * control, so the spin loop calls PyErr_CheckSignals() every SIGNAL_POLL
 * iterations; a handler raises the CPU's interrupt byte, which ends the spin.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>  /* PyMemberDef, T_LONGLONG (Python 3.11) */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sched.h>

#define SIGNAL_POLL 1024
#define UDELAY_LOOKS 128  /* looks at status between two clock reads in the kick's udelay() */
#define EARLY_NS 5000LL  /* looking at status before the bus's rule, for a CPU watching control (at most a udelay) */
#define EARLY_LOOKS 512  /* looks at status between two clock reads there */
#define MAX_TAGS 8
#define PAGE_BYTES 4096  /* smpd.machine.layout.PAGE: write_pages stores whole pages */

enum { WOKE = 0, TIMEOUT = 1, SIGNAL = 2 };

static inline int64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

#define LOAD32(p) __atomic_load_n((uint32_t *)(p), __ATOMIC_ACQUIRE)
#define LOAD64(p) __atomic_load_n((uint64_t *)(p), __ATOMIC_ACQUIRE)
#define LOAD16(p) __atomic_load_n((uint16_t *)(p), __ATOMIC_ACQUIRE)
#define STORE8(p, v) __atomic_store_n((uint8_t *)(p), (v), __ATOMIC_RELEASE)
#define STORE16(p, v) __atomic_store_n((uint16_t *)(p), (v), __ATOMIC_RELEASE)
#define STORE32(p, v) __atomic_store_n((uint32_t *)(p), (v), __ATOMIC_RELEASE)
#define STORE64(p, v) __atomic_store_n((uint64_t *)(p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/*
 * The segment's bytes, exported for one call only: an object that held the export
 * for its life would keep Segment.close() from releasing the mapping. A closed
 * segment gives a clean ValueError here instead of a stale pointer.
 */
static char *acquire(PyObject *buf, Py_buffer *view, Py_ssize_t need)
{
	if (PyObject_GetBuffer(buf, view, PyBUF_WRITABLE) < 0)
		return NULL;
	if (view->len < need) {
		PyBuffer_Release(view);
		PyErr_Format(PyExc_ValueError, "the segment has %zd bytes, %zd needed", view->len, need);
		return NULL;
	}
	return view->buf;
}

/* [off, off + size) inside a buffer of len bytes, with no sum that could overflow. */
static int fits(Py_ssize_t off, Py_ssize_t size, Py_ssize_t len)
{
	return off >= 0 && size >= 0 && off <= len && size <= len - off;
}

/* A field of ``size`` bytes at ``off`` that an Ack's or an Init's wait loads or stores: aligned (to
 * its size, at most 8), its end within what any buffer can hold; ``*need`` grows to that end. */
static int extend_need(const char *what, Py_ssize_t off, Py_ssize_t size, Py_ssize_t *need)
{
	Py_ssize_t align = size > 8 ? 8 : size;

	if (!fits(off, size, PY_SSIZE_T_MAX) || off % align) {
		PyErr_Format(PyExc_ValueError, "%s offset %zd is negative, too large or not aligned to %zd bytes",
			     what, off, align);
		return -1;
	}
	if (off + size > *need)
		*need = off + size;
	return 0;
}

static int in_range(Py_buffer *view, Py_ssize_t off, Py_ssize_t size, const char *what)
{
	if (!fits(off, size, view->len) || off % size) {
		PyErr_Format(PyExc_ValueError, "%s offset %zd is not an aligned %zd-byte field of the segment",
			     what, off, size);
		return -1;
	}
	return 0;
}

/* ---- Ack: what the woken CPU in mwait_play_dead() checks and stores ------- */

typedef struct {
	PyObject_HEAD
	Py_ssize_t control, status, seen, dir_entry, armed;
	uint32_t kexec_hlt;  /* CPUDEAD_MWAIT_KEXEC_HLT, from smpd.layout */
	/* What the CPU records on its way from the acknowledgement into HLT (smpd.cpu). */
	Py_ssize_t wake_write, activity, busy, state, ev_head, ev_ring;
	int ready;
	uint32_t line, st_hlt, ev_slots, ev_wake_write, ev_kick_seen, ev_hlt;
	Py_ssize_t ev_entry;  /* bytes per event: (u64 ns, u32 code, u32 arg), smpd.machine.layout.EV_ENTRY */
	Py_ssize_t need;  /* the segment must be this long: the last byte any offset names */
	/* The page tags, and past ntags, fillers that try_ack() reads and masks out (tag_mask 0): it
	 * reads all MAX_TAGS with no branch between them (kick_checks_fail). */
	int ntags;
	Py_ssize_t tag_off[MAX_TAGS];
	uint64_t tag_lo[MAX_TAGS], tag_hi[MAX_TAGS], tag_mask[MAX_TAGS];
} Ack;

static int Ack_init(Ack *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"control", "status", "seen", "dir_entry", "armed", "tags", "kexec_hlt",
				"wake_write", "activity", "busy", "state", "ev_head", "ev_ring", "line", "state_hlt",
				"ev_slots", "ev_wake_write", "ev_kick_seen", "ev_hlt", "ev_entry", NULL};
	PyObject *tags;
	unsigned int hlt, line, st_hlt, slots, e_ww, e_ks, e_hlt;

	if (self->ready) {
		PyErr_SetString(PyExc_RuntimeError, "Ack is already initialised");
		return -1;
	}
	if (!PyArg_ParseTupleAndKeywords(args, kw, "nnnnnOInnnnnnIIIIIIn", names, &self->control, &self->status,
					 &self->seen, &self->dir_entry, &self->armed, &tags, &hlt,
					 &self->wake_write, &self->activity, &self->busy, &self->state,
					 &self->ev_head, &self->ev_ring, &line, &st_hlt, &slots, &e_ww, &e_ks, &e_hlt,
					 &self->ev_entry))
		return -1;
	if (self->ev_entry != 16) {  /* log_event() stores exactly these three fields */
		PyErr_Format(PyExc_ValueError, "ev_entry is %zd bytes; this hot path writes 16-byte events "
			     "(u64 ns, u32 code, u32 arg)", self->ev_entry);
		return -1;
	}
	if (slots == 0) {
		PyErr_SetString(PyExc_ValueError, "ev_slots must be at least 1");
		return -1;
	}
	self->kexec_hlt = hlt;
	self->line = line;
	self->st_hlt = st_hlt;
	self->ev_slots = slots;
	self->ev_wake_write = e_ww;
	self->ev_kick_seen = e_ks;
	self->ev_hlt = e_hlt;
	tags = PySequence_Fast(tags, "tags must be a sequence of (offset, lo, hi)");
	if (!tags)
		return -1;
	self->ntags = (int)PySequence_Fast_GET_SIZE(tags);
	if (self->ntags > MAX_TAGS) {
		Py_DECREF(tags);
		PyErr_Format(PyExc_ValueError, "at most %d page tags, got %d", MAX_TAGS, self->ntags);
		return -1;
	}
	for (int k = 0; k < self->ntags; k++) {
		unsigned long long lo, hi;

		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(tags, k), "nKK", &self->tag_off[k], &lo, &hi)) {
			Py_DECREF(tags);
			return -1;
		}
		self->tag_lo[k] = lo;
		self->tag_hi[k] = hi;
	}
	Py_DECREF(tags);
	{
		enum { N = 11 };
		Py_ssize_t off[N] = {self->control, self->status, self->seen, self->dir_entry, self->armed,
				     self->wake_write, self->activity, self->busy, self->state, self->ev_head,
				     self->ev_ring};
		Py_ssize_t size[N] = {4, 4, 8, 2, 4, 8, 4, 4, 4, 4, self->ev_entry * (Py_ssize_t)self->ev_slots};

		self->need = 0;
		for (int k = 0; k < N; k++)
			if (extend_need("Ack", off[k], size[k], &self->need) < 0)
				return -1;
		for (int k = 0; k < self->ntags; k++)
			if (extend_need("Ack", self->tag_off[k], 16, &self->need) < 0)
				return -1;
	}
	/* Fillers, masked out: tag 0 again, or without tags the 16 bytes around control (its line,
	 * already in the cache), or where those would pass `need`, the 16 bytes below it: a filler
	 * never makes the Ack ask for more of the segment. */
	for (int k = 0; k < MAX_TAGS; k++) {
		Py_ssize_t around = self->control & ~(Py_ssize_t)15;

		self->tag_mask[k] = k < self->ntags ? ~0ULL : 0;
		if (k >= self->ntags)
			self->tag_off[k] = self->ntags ? self->tag_off[0]
				: around + 16 <= self->need ? around : (self->need - 16) & ~(Py_ssize_t)7;
	}
	self->ready = 1;
	return 0;
}

static PyTypeObject AckType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "smpd._hotpath.Ack",
	.tp_doc = "Ack(control, status, seen, dir_entry, armed, tags, kexec_hlt): byte offsets of "
		  "mwait_cpu_dead's control and status, kick_seen_ns, the armed line's directory entry and "
		  "mon_armed; the page tags (offset, lo, hi) the resume must find; the control value that "
		  "sends the CPU to HLT",
	.tp_basicsize = sizeof(Ack),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Ack_init,
};

/* ---- Init: an INIT (and what follows it) taken without the interpreter ---- */

/*
 * A CPU online and idle (smpd.kernel.cpu's `running`), halted (`hlt`), parked in MWAIT (whose
 * exit, mwait_exit(), disarms the monitor and counts the IPI's wake-up first: a pre-fix kernel's
 * parked CPUs, which a kexec'd kernel starts, get INIT there), held in wait-for-SIPI, or dead
 * (SHUTDOWN after a triple fault, halted in foreign bytes: `_dead_end`, which only INIT leaves), that is
 * sent INIT runs init_reset() and enters wait-for-SIPI, where it
 * executes nothing: the stores those leave (init_count, the INIT event, state and hotplug) and,
 * when INIT came alone (a power cycle's first message: smpd.daemon.kernel_ops' reset; 6.5's
 * smp_park_other_cpus_in_init(), smpd.kernel.stop, to CPUs halted by REBOOT), the
 * acknowledgement. take_init() makes them here, from the wake-up, and the wait goes on.
 *
 * A SIPI after the INIT in the same message (a kernel starting its APs, smpd.kernel.boot) is
 * taken too when the generation the header names is one this CPU knows (``learn``: the Python
 * path started it there before, or the template taught it generation 1 before its process ran,
 * smpd.kernel.handoff's learn_boot; never one that kernel parks at boot): start_secondary()
 * and smp_callin() (sipi_count, the SIPI event, cpu_gen; the fix's kernels clear mwait_cpu_dead
 * through the bus's rule), then running. A CPU_DOWN after those (a reset leaving the CPU
 * offline) goes on through play_dead() into that kernel's mwait_play_dead(): its entry count
 * (and the fix's stores to mwait_cpu_dead), MONITOR on the line it watches (the fix's
 * mwait_cpu_dead; pre-fix, the idle task's thread_info->flags), the acknowledgement; the wait
 * goes on as MWAIT, with that generation's Ack (pre-fix: none, so a write to the line returns
 * to Python, whose mwait_play_dead() takes it as its own MWAIT's). NMI or SMI held from
 * wait-for-SIPI (delivered by smp_callin) leave it to Python.
 *
 * A CPU_DOWN alone (cpu_down(): `smpd offline`) to a CPU running (state and hotplug say so) a
 * generation it knows, as the table holds that generation now (mwait_play_dead() reads its
 * flavour there: a rewritten entry, Kexec.become, is the Python path's), goes the same way from
 * running: play_dead() into mwait_play_dead(), parked, acknowledged. To any other state the
 * Python path answers it (ignored there). So does a REBOOT alone (stop_other_cpus()' vector to
 * the CPUs still online) to such a CPU: stop_this_cpu() (its event, offline), then hlt() (the
 * state, its event), acknowledged; the wait goes on as HLT's, which sleeps at once.
 *
 * The interpreter runs only at the next wake-up, which the Python state machine then takes in
 * the state the take left (``taken_state``, ``taken_ns``). Anything else (another command, an
 * interrupt byte raised or an interrupt signal not taken yet, a timer or a write byte, a
 * monitor armed outside MWAIT) is left untouched for the Python path.
 *
 * Two choices of interleaving, where the Python path has others: the message is taken in one
 * step, so an interrupt that arrives during it is taken after it (in the state it left), never
 * between the INIT and the SIPI, where wait-for-SIPI would hold an NMI or SMI and an MCE would
 * shut the machine down (the Python path takes the IPIs one per wake-up; the race there is the
 * host's scheduling, and tests make it happen on that path: smpd.kernel.boot's tests). And the
 * state the take leaves waits with a spurious wake-up (``spurious_per_s``) at ``spurious_ns``
 * after the take, an interval the Python path drew for this call (CpuCore.wait), where it
 * draws one for each state's wait: the same rate, as the draws are memoryless.
 */
#define KNOWN 8  /* generations a CPU can be started in without the interpreter (kexec'd kernels, and the first: a soak
                  * of the three flavours starts CPUs in six, generation 1 and 2 of each) */
#define GEN_ENTRY_MAX 64
#define HELD_MAX 4  /* interrupt kinds a dead CPU holds (Init.holds): NMI, SMI, MCE, and room */

typedef struct Kicker Kicker;
static PyTypeObject KickerType;
static void bus_write(Kicker *k, char *base, Py_ssize_t off, const uint32_t *words, int n);
static int kicker_line(Kicker *k, Py_ssize_t off, Py_ssize_t n, uint32_t *line, Py_ssize_t *dir, Py_ssize_t *need);
static int kicker_has_cpu(Kicker *k, uint32_t cpu);
static char *kicker_dir_entry(Kicker *k, char *base, uint32_t line);

/* A generation this CPU may be started in here (Init.learn), and what its SIPI stores. */
typedef struct {
	int used;
	unsigned char entry[GEN_ENTRY_MAX];  /* its entry in the header's generation table, as it was then */
	Ack *ack;  /* the kick's acknowledgement there (owned); NULL: the pre-fix kernel (no mwait_cpu_dead, no kick) */
	Py_ssize_t mon, dir;  /* the word mwait_play_dead() monitors there (the fix's mwait_cpu_dead.control; pre-fix,
			       * thread_info->flags): its offset in emulated memory; its line's directory entry */
	uint32_t line;
} Known;

typedef struct {
	PyObject_HEAD
	int ready;
	int busy;  /* a wait is using it (learn() refuses then) */
	Py_ssize_t mbox_seq, mbox_cmd, mbox_arg, mbox_ack, mbox_result, armed;
	Py_ssize_t init_count, state, hotplug, activity, busy_word, ev_head, ev_ring;
	uint32_t cmd_init, st_wait_for_sipi, hp_offline, ev_init, ev_slots;
	int ipi_byte;  /* the IPI byte's index in `wake` (smpd.machine.layout.WAKE_IPI) */
	Py_ssize_t ev_entry, need;
	/* SIPI and CPU_DOWN */
	Py_ssize_t hdr_gen, gen_table, gen_entry, sipi_count, cpu_gen, nmi_pending, smi_pending, mwait_entries, mon_line;
	int gen_slots;
	uint32_t cpu, cmd_sipi, cmd_cpu_down, st_running, st_mwait, hp_online, ev_sipi, ev_offline;
	uint32_t cmd_reboot, st_hlt, ev_reboot, ev_hlt;  /* REBOOT: stop_this_cpu() into HLT */
	uint32_t mwait_wait;  /* CPUDEAD_MWAIT_WAIT */
	Py_ssize_t wake_write, wake_ipi;  /* MWAIT's wake-up counts (u64), for an INIT that ends it */
	Kicker *bus;  /* the bus's rule, for smp_callin()'s clear of mwait_cpu_dead (owned) */
	Known known[KNOWN];
	int next_known;
	long long taken_ns;  /* when an INIT was taken in this wait() (read-only to Python; 0 at each call) */
	uint32_t taken_state;  /* the ExecState the last take left (wait-for-SIPI, running, MWAIT) */
	int taken_known;  /* past a SIPI: the Known it started the CPU in (-1: none) */
	long long spin_ns;  /* the CPU's spin budget (-1: a spin watch), for the wait after a take */
	long long spurious_ns;  /* the spurious wake-up after a take, this long after it (0: none); Python's to set */
	/* A dead CPU (SHUTDOWN, halted in foreign bytes: smpd.kernel.cpu's _dead_end) executes no
	 * interrupt handler: each interrupt signal taken asleep there is counted held (its
	 * `*_held`), and the sleep goes on (hold_if_dead). */
	int dead;  /* this wait is a dead CPU's; Python's to set */
	int nheld;
	int held_sig[HELD_MAX];
	Py_ssize_t held_off[HELD_MAX];  /* the u32 `*_held` of the interrupt signal held_sig[k] */
} Init;

static int Init_init(Init *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"mbox_seq", "mbox_cmd", "mbox_arg", "mbox_ack", "mbox_result", "armed",
				"init_count", "state", "hotplug", "activity", "busy", "ev_head", "ev_ring",
				"cmd_init", "state_wait_for_sipi", "hotplug_offline", "ev_init", "ev_slots", "ev_entry",
				"ipi_byte", "hdr_generation", "gen_table", "gen_entry", "gen_slots", "sipi_count",
				"cpu_gen", "nmi_pending", "smi_pending", "mwait_entries", "mon_line", "cpu", "cmd_sipi",
				"cmd_cpu_down", "state_running", "state_mwait", "hotplug_online", "ev_sipi",
				"ev_offline", "mwait_wait", "cmd_reboot", "state_hlt", "ev_reboot", "ev_hlt",
				"wake_write", "wake_ipi", "spin_ns", "bus", NULL};
	PyObject *bus;

	if (self->ready) {
		PyErr_SetString(PyExc_RuntimeError, "Init is already initialised");
		return -1;
	}
	if (!PyArg_ParseTupleAndKeywords(args, kw, "nnnnnnnnnnnnnIIIIIninnninnnnnnIIIIIIIIIIIIInnLO!", names,
					 &self->mbox_seq, &self->mbox_cmd,
					 &self->mbox_arg, &self->mbox_ack, &self->mbox_result, &self->armed,
					 &self->init_count, &self->state, &self->hotplug, &self->activity, &self->busy_word,
					 &self->ev_head, &self->ev_ring, &self->cmd_init, &self->st_wait_for_sipi,
					 &self->hp_offline, &self->ev_init, &self->ev_slots, &self->ev_entry, &self->ipi_byte,
					 &self->hdr_gen, &self->gen_table, &self->gen_entry, &self->gen_slots,
					 &self->sipi_count, &self->cpu_gen, &self->nmi_pending, &self->smi_pending,
					 &self->mwait_entries, &self->mon_line, &self->cpu, &self->cmd_sipi,
					 &self->cmd_cpu_down, &self->st_running, &self->st_mwait, &self->hp_online,
					 &self->ev_sipi, &self->ev_offline, &self->mwait_wait, &self->cmd_reboot, &self->st_hlt,
					 &self->ev_reboot, &self->ev_hlt, &self->wake_write, &self->wake_ipi, &self->spin_ns,
					 &KickerType, &bus))
		return -1;
	if (self->ev_entry != 16 || self->ev_slots == 0 || self->ipi_byte < 1 || self->ipi_byte > 3) {
		PyErr_SetString(PyExc_ValueError, "Init: events are 16 bytes, at least one slot; the IPI byte is "
				"byte 1, 2 or 3 of `wake`");
		return -1;
	}
	if (self->gen_entry < 4 || self->gen_entry > GEN_ENTRY_MAX || self->gen_slots < 1 ||
	    self->cmd_sipi == 0 || self->cmd_sipi > 0xFF || self->cmd_cpu_down == 0 || self->cmd_cpu_down > 0xFF ||
	    self->cmd_reboot == 0 || self->cmd_reboot > 0xFF ||
	    self->cpu >= 0xFFFF) {
		PyErr_Format(PyExc_ValueError, "Init: a generation entry is 4..%d bytes, at least one slot; SIPI, "
			     "CPU_DOWN and REBOOT are IPI bytes 1..255; the CPU a u16 directory owner", GEN_ENTRY_MAX);
		return -1;
	}
	{
		enum { N = 23 };
		Py_ssize_t off[N] = {self->mbox_seq, self->mbox_cmd, self->mbox_arg, self->mbox_ack,
				     self->mbox_result, self->armed, self->init_count, self->state, self->hotplug,
				     self->activity, self->busy_word, self->ev_head, self->ev_ring, self->hdr_gen,
				     self->gen_table, self->sipi_count, self->cpu_gen, self->nmi_pending,
				     self->smi_pending, self->mwait_entries, self->mon_line, self->wake_write,
				     self->wake_ipi};
		Py_ssize_t size[N] = {4, 4, 8, 4, 4, 4, 4, 4, 4, 4, 4, 4, 16 * (Py_ssize_t)self->ev_slots, 4,
				      self->gen_entry * (Py_ssize_t)self->gen_slots, 4, 4, 4, 4, 8, 4, 8, 8};

		self->need = 0;
		for (int k = 0; k < N; k++)
			if (extend_need("Init", off[k], size[k], &self->need) < 0)
				return -1;
		if (self->gen_entry % 4) {  /* each entry's first field, its generation, is a u32 */
			PyErr_SetString(PyExc_ValueError, "Init: a generation entry's size is a multiple of 4");
			return -1;
		}
	}
	if (!kicker_has_cpu((Kicker *)bus, self->cpu)) {
		PyErr_Format(PyExc_ValueError, "Init: CPU %u is not one of an initialised bus's CPUs", self->cpu);
		return -1;
	}
	Py_INCREF(bus);
	self->bus = (Kicker *)bus;
	self->taken_ns = 0;
	self->taken_known = -1;
	self->ready = 1;
	return 0;
}

static void Init_dealloc(Init *self)
{
	for (int i = 0; i < KNOWN; i++)
		Py_XDECREF(self->known[i].ack);
	Py_XDECREF(self->bus);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* holds(signal, held): see Init.dead. */
static PyObject *Init_holds(Init *self, PyObject *args)
{
	int sig;
	Py_ssize_t off, need = self->need;

	if (!PyArg_ParseTuple(args, "in", &sig, &off))
		return NULL;
	if (sig <= 0 || sig >= NSIG || self->nheld >= HELD_MAX) {
		PyErr_Format(PyExc_ValueError, "holds(signal, held): a signal 1..%d, for at most %d interrupts", NSIG - 1,
			     HELD_MAX);
		return NULL;
	}
	if (extend_need("Init.holds", off, 4, &need) < 0)
		return NULL;
	if (self->busy) {
		PyErr_SetString(PyExc_RuntimeError, "holds(): this Init is in use by a wait");
		return NULL;
	}
	self->held_sig[self->nheld] = sig;
	self->held_off[self->nheld++] = off;
	self->need = need;
	Py_RETURN_NONE;
}

/* learn(entry, md, ack): see Init. */
static PyObject *Init_learn(Init *self, PyObject *args)
{
	Py_buffer entry;
	Py_ssize_t mon, dir, need = 0;
	uint32_t line;
	PyObject *ack;
	Known *g;

	if (!PyArg_ParseTuple(args, "y*nO", &entry, &mon, &ack))
		return NULL;
	if (!self->ready || self->busy || entry.len != self->gen_entry ||
	    (ack != Py_None && (!PyObject_TypeCheck(ack, &AckType) || !((Ack *)ack)->ready)) ||
	    kicker_line(self->bus, mon, 8, &line, &dir, &need) < 0) {
		if (!PyErr_Occurred())
			PyErr_Format(PyExc_ValueError, "learn(entry, mon, ack) takes a %zd-byte generation entry and "
				     "an initialised Ack or None, on an initialised Init no wait is using",
				     self->gen_entry);
		PyBuffer_Release(&entry);
		return NULL;
	}
	g = NULL;
	for (int i = 0; i < KNOWN && !g; i++)  /* the same entry learnt again: refreshed in place */
		if (self->known[i].used && !memcmp(self->known[i].entry, entry.buf, entry.len))
			g = &self->known[i];
	if (!g) {
		g = &self->known[self->next_known];
		self->next_known = (self->next_known + 1) % KNOWN;
	}
	memcpy(g->entry, entry.buf, entry.len);
	PyBuffer_Release(&entry);
	Py_XDECREF(g->ack);
	g->ack = ack == Py_None ? NULL : (Ack *)ack;
	Py_XINCREF(g->ack);
	g->mon = mon;
	g->dir = dir;
	g->line = line;
	g->used = 1;
	if (need > self->need)
		self->need = need;
	if (g->ack && g->ack->need > self->need)
		self->need = g->ack->need;
	Py_RETURN_NONE;
}

static PyObject *Init_taken_entry(Init *self, void *Py_UNUSED(closure))
{
	if (self->taken_known < 0)
		return PyBytes_FromStringAndSize("", 0);
	return PyBytes_FromStringAndSize((const char *)self->known[self->taken_known].entry, self->gen_entry);
}

static PyObject *Init_taken_ack(Init *self, void *Py_UNUSED(closure))
{
	PyObject *a = NULL;

	if (self->taken_known >= 0 && self->taken_state == self->st_mwait)
		a = (PyObject *)self->known[self->taken_known].ack;
	if (!a)
		a = Py_None;
	Py_INCREF(a);
	return a;
}

static PyMemberDef Init_members[] = {
	{"taken_ns", T_LONGLONG, offsetof(Init, taken_ns), READONLY,
	 "CLOCK_MONOTONIC ns of the last INIT taken in the last wait() given this Init (0: none)"},
	{"spurious_ns", T_LONGLONG, offsetof(Init, spurious_ns), 0,
	 "a wait after a take ends as TIMEOUT (a spurious wake-up) this many ns after the take; 0: never"},
	{"taken_state", T_UINT, offsetof(Init, taken_state), READONLY,
	 "the ExecState that take left the CPU in: WAIT_FOR_SIPI, RUNNING, or MWAIT (armed, acknowledged)"},
	{"dead", T_INT, offsetof(Init, dead), 0,
	 "true: the wait is a dead CPU's (SHUTDOWN, halted in foreign bytes), which holds each interrupt\n"
	 "signal taken asleep (its held count, see holds()) and sleeps on"},
	{NULL},
};

static PyGetSetDef Init_getset[] = {
	{"taken_ack", (getter)Init_taken_ack, NULL,
	 "after a take that parked the CPU (taken_state MWAIT): the Ack the wait went on with; else None", NULL},
	{"taken_entry", (getter)Init_taken_entry, NULL,
	 "after a take past a SIPI: the generation entry (as learnt) the CPU was started in; else b''", NULL},
	{NULL},
};

static PyMethodDef Init_methods[] = {
	{"holds", (PyCFunction)Init_holds, METH_VARARGS,
	 "holds(signal, held): interrupt signal ``signal`` taken asleep in a dead CPU's wait (dead) is\n"
	 "counted in the u32 at segment offset ``held`` (its `*_held`)."},
	{"learn", (PyCFunction)Init_learn, METH_VARARGS,
	 "learn(entry, mon, ack): this CPU was started (not parked at boot) in the generation whose\n"
	 "header table entry is ``entry`` (bytes); the word its mwait_play_dead() monitors is at offset\n"
	 "``mon`` of emulated memory (mwait_cpu_dead.control; the pre-fix kernel's thread_info->flags),\n"
	 "and ``ack`` is the kick's Ack there (None: the pre-fix kernel). A later INIT, SIPI (and\n"
	 "CPU_DOWN) into that generation is then taken without the interpreter."},
	{NULL},
};

static PyTypeObject InitType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "smpd._hotpath.Init",
	.tp_doc = "Init(...): byte offsets of a CPU's mailbox, its mon_armed and what init_reset(), "
		  "wait-for-SIPI, start_secondary() and play_dead() store, for a wait to take an INIT and "
		  "what follows it (see take_init)",
	.tp_basicsize = sizeof(Init),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Init_init,
	.tp_dealloc = (destructor)Init_dealloc,
	.tp_members = Init_members,
	.tp_getset = Init_getset,
	.tp_methods = Init_methods,
};

/* ---- Waiter: a CPU's watch loop ------------------------------------------- */

typedef struct {
	PyObject_HEAD
	PyObject *buf;
	char *base;  /* valid during a call only */
	Py_ssize_t wake, write, sleeping, watch;  /* `wake` (interrupt, IPI, timer bytes), `mon_write`, ..., `mon_watch` */
	Py_ssize_t sleep_core;  /* `sleep_core`: the host core it sleeps on, stored before `sleeping` (-1: none) */
	Py_ssize_t woke;  /* `woke_ns`: when its doorbell last ended a sleep, as the process ran again (-1: none) */
	int yield;  /* spinning CPUs outnumber host cores: give the core away between polls */
	int busy;  /* a wait() is running: it releases the GIL, so a second thread could enter */
	Init *init;  /* the running call's, or NULL: an INIT (and what follows it) is taken there (take_init) */
	Ack *parked;  /* the running call's: a take parked the CPU, and the wait goes on as MWAIT with this */
	int taken;  /* a take in this step of the wait (wait_step): the wait starts over */
	Ack *ans_ack;  /* the last kick answered (see answered()): its Ack, when, after a sleep? */
	int64_t ans_seen;
	int ans_slept;
	signed char lone;  /* no other thread of its process may take an interrupt signal; -1: not asked (lone_now) */
	int64_t slept_ans;  /* a kick answered while asleep, by sleep_until itself: when (0: none) */
	Py_ssize_t need;  /* the buffer must be this long: the last byte of its words */
	sigset_t irq, sleep_set;
	int irq_list[NSIG], nirq;  /* the members of `irq`, for irq_pending() */
	int wrapped;  /* each of `irq` goes through irq_arrived() (install_signal_handlers; checked by wait()) */
	pthread_t wrapper;  /* the thread that wrapped them: Python's main thread, which runs their handlers */
} Waiter;

static int sigset_from(PyObject *seq, sigset_t *set)
{
	PyObject *fast = PySequence_Fast(seq, "signals must be a sequence of signal numbers");

	if (!fast)
		return -1;
	sigemptyset(set);
	for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(fast); k++) {
		long s = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, k));

		if (s == -1 && PyErr_Occurred()) {
			Py_DECREF(fast);
			return -1;
		}
		if (sigaddset(set, (int)s)) {
			Py_DECREF(fast);
			PyErr_Format(PyExc_ValueError, "%ld is not a signal number", s);
			return -1;
		}
	}
	Py_DECREF(fast);
	return 0;
}

static int Waiter_init(Waiter *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"buf", "wake", "write", "sleeping", "watch", "irq_signals", "doorbell", "spin_yields",
				"sleep_core", "woke", NULL};
	PyObject *buf, *irq;
	int doorbell;
	Py_buffer view;
	int bad;

	if (self->buf) {  /* first: a second __init__ must not touch the checked offsets */
		PyErr_SetString(PyExc_RuntimeError, "Waiter is already initialised");
		return -1;
	}
	self->yield = 0;
	self->lone = -1;
	self->sleep_core = -1;
	self->woke = -1;
	if (!PyArg_ParseTupleAndKeywords(args, kw, "OnnnnOi|pnn", names, &buf, &self->wake, &self->write,
					 &self->sleeping, &self->watch, &irq, &doorbell, &self->yield, &self->sleep_core,
					 &self->woke))
		return -1;
	if (sigset_from(irq, &self->irq) < 0)
		return -1;
	self->nirq = 0;
	for (int sig = 1; sig < NSIG; sig++)
		if (sigismember(&self->irq, sig) == 1)
			self->irq_list[self->nirq++] = sig;
	self->sleep_set = self->irq;
	sigaddset(&self->sleep_set, doorbell);
	if (!acquire(buf, &view, 0))
		return -1;
	bad = in_range(&view, self->wake, 4, "wake") < 0 || in_range(&view, self->write, 4, "write") < 0 ||
	      in_range(&view, self->sleeping, 4, "sleeping") < 0 || in_range(&view, self->watch, 4, "watch") < 0 ||
	      (self->sleep_core != -1 && in_range(&view, self->sleep_core, 4, "sleep_core") < 0) ||
	      (self->woke != -1 && in_range(&view, self->woke, 8, "woke") < 0);
	PyBuffer_Release(&view);
	if (bad)
		return -1;
	self->need = 4 + (self->wake > self->write ? self->wake : self->write);
	if (4 + self->sleeping > self->need)
		self->need = 4 + self->sleeping;
	if (4 + self->watch > self->need)
		self->need = 4 + self->watch;
	if (self->sleep_core >= 0 && 4 + self->sleep_core > self->need)
		self->need = 4 + self->sleep_core;
	if (self->woke >= 0 && 8 + self->woke > self->need)
		self->need = 8 + self->woke;
	Py_INCREF(buf);
	self->buf = buf;
	return 0;
}

static void Waiter_dealloc(Waiter *self)
{
	Py_XDECREF(self->buf);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* events.log(): one (ns, code, arg) entry in the CPU's ring, ev_head written last. */
static void log_at(char *b, Py_ssize_t ev_head, Py_ssize_t ev_ring, uint32_t slots, uint32_t code, uint32_t arg,
		   int64_t ns)
{
	uint32_t head = LOAD32(b + ev_head);
	char *e = b + ev_ring + (Py_ssize_t)(head % slots) * 16;

	STORE64(e, (uint64_t)ns);
	STORE32(e + 8, code);
	STORE32(e + 12, arg);
	STORE32(b + ev_head, head + 1);
}

static void log_event(char *b, Ack *a, uint32_t code, uint32_t arg, int64_t ns)
{
	log_at(b, a->ev_head, a->ev_ring, a->ev_slots, code, arg, ns);
}

enum { NOT_TAKEN = 0, LONE_INIT, START, START_DOWN, LONE_DOWN, LONE_REBOOT };

/* Is an interrupt signal pending for this process: sent while blocked (asleep, the signals are
 * blocked), not delivered yet? sigpending() names only blocked signals: one delivered while
 * unblocked, its Python handler not run yet, is for PyErr_CheckSignals() (must_return,
 * answer_kick). Also 1 when the host does not say (sigpending() failed): the caller then leaves
 * the wake-up to the Python path, which takes an interrupt first. */
static int irq_pending(Waiter *w)
{
	sigset_t pending;

	if (sigpending(&pending) < 0)
		return 1;
	for (int k = 0; k < w->nirq; k++)
		if (sigismember(&pending, w->irq_list[k]) == 1)
			return 1;
	return 0;
}

/*
 * Emulator machinery, no kernel counterpart: has an interrupt signal reached this process since the
 * answer's path last looked? The CPU's interrupt handlers are Python's (smpd.machine.core's
 * _on_interrupt raises the interrupt's byte): the signal only trips Python's C handler, and the
 * interpreter runs the handler at the next PyErr_CheckSignals(). Called on the spin's way from the
 * kick to its answer, that is ~20 ns of calls into the interpreter (measured, a sixth of the host's
 * cache-line round trip) to learn, nearly always, that nothing came. Waiter.install_signal_handlers()
 * (after the CPU's own handlers) puts irq_arrived() in front of Python's C handler for each of the
 * Waiter's interrupt signals: Python's handler first, then `irq_came`. answer_kick() runs the
 * handlers only when `irq_came` says one came, and every time while it cannot tell: before the wrap,
 * for a signal with no handler to wrap, and once a wait finds one no longer wrapped (a
 * signal.signal() since: irq_still_wrapped()).
 */
static struct sigaction python_action[NSIG];  /* the handler irq_arrived() runs first: Python's */
static volatile sig_atomic_t irq_came;  /* an interrupt signal came since the last look */

static void irq_arrived(int sig, siginfo_t *info, void *uc)
{
	struct sigaction *py = &python_action[sig];

	if (py->sa_flags & SA_SIGINFO)
		py->sa_sigaction(sig, info, uc);
	else
		py->sa_handler(sig);
	/* After Python's handler noted it: whoever sees the flag then finds the signal noted. */
	__atomic_store_n(&irq_came, 1, __ATOMIC_SEQ_CST);
}

static int is_irq_arrived(const struct sigaction *act)
{
	return (act->sa_flags & SA_SIGINFO) && act->sa_sigaction == irq_arrived;
}

/* Does each of the Waiter's interrupt signals still go through irq_arrived()? */
static int irq_still_wrapped(Waiter *w)
{
	struct sigaction cur;

	for (int k = 0; k < w->nirq; k++)
		if (sigaction(w->irq_list[k], NULL, &cur) < 0 || !is_irq_arrived(&cur))
			return 0;
	return 1;
}

/* Run the Python handlers of the interrupt signals that came (PyErr_CheckSignals()), if any may have:
 * -1 when one raised (an exception is set). The flag is cleared before the handlers run: a signal
 * that comes after the clear sets it again, and one that came before is run here. */
static inline int run_irq_handlers(Waiter *w)
{
	if (w->wrapped && !__atomic_load_n(&irq_came, __ATOMIC_RELAXED))
		return 0;
	/* Only the thread that runs Python's handlers (the main one, which wrapped them) may say they
	 * ran: elsewhere PyErr_CheckSignals() runs none, and the flag stays for the main thread. */
	if (!pthread_equal(pthread_self(), w->wrapper))
		return PyErr_CheckSignals();
	__atomic_store_n(&irq_came, 0, __ATOMIC_SEQ_CST);
	if (PyErr_CheckSignals() < 0) {
		/* A handler raised: Python runs the others later; look again then. */
		__atomic_store_n(&irq_came, 1, __ATOMIC_SEQ_CST);
		return -1;
	}
	return 0;
}

static PyObject *Waiter_install_signal_handlers(Waiter *w, PyObject *Py_UNUSED(ignored))
{
	sigset_t old;
	int all = 1;

	if (!w->buf) {
		PyErr_SetString(PyExc_RuntimeError, "Waiter is not initialised");
		return NULL;
	}
	/* Blocked meanwhile: irq_arrived() never reads a python_action being written. */
	pthread_sigmask(SIG_BLOCK, &w->irq, &old);
	for (int k = 0; k < w->nirq; k++) {
		int sig = w->irq_list[k];
		struct sigaction cur, mine;

		if (sigaction(sig, NULL, &cur) < 0) {
			all = 0;
			continue;
		}
		if (is_irq_arrived(&cur))
			continue;
		if (!(cur.sa_flags & SA_SIGINFO) && (cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN)) {
			all = 0;  /* no handler to run first: left as it is, and looked for every time */
			continue;
		}
		python_action[sig] = cur;
		mine = cur;
		mine.sa_sigaction = irq_arrived;
		mine.sa_flags |= SA_SIGINFO;
		if (sigaction(sig, &mine, NULL) < 0)
			all = 0;
	}
	/* A signal that came before the wrap was noted by Python alone: the interpreter runs its handler
	 * at its next instruction, before any wait. One held off meanwhile comes at the unblock. */
	__atomic_store_n(&irq_came, 0, __ATOMIC_SEQ_CST);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	w->wrapper = pthread_self();
	w->wrapped = all;
	return PyBool_FromLong(all);
}

/* An unacknowledged message in the mailbox that take_init() takes (its seq in *seq): INIT alone,
 * INIT then SIPI, INIT, SIPI, CPU_DOWN, CPU_DOWN alone, or REBOOT alone; NOT_TAKEN for any other. */
static int init_message(char *b, Init *n, uint32_t *seq)
{
	uint64_t arg;
	uint32_t cmd;

	*seq = LOAD32(b + n->mbox_seq);
	if (*seq == LOAD32(b + n->mbox_ack))
		return NOT_TAKEN;
	cmd = LOAD32(b + n->mbox_cmd);
	arg = LOAD64(b + n->mbox_arg);
	if (cmd == n->cmd_cpu_down)
		return arg ? NOT_TAKEN : LONE_DOWN;
	if (cmd == n->cmd_reboot)
		return arg ? NOT_TAKEN : LONE_REBOOT;
	if (cmd != n->cmd_init)
		return NOT_TAKEN;
	if (!arg)
		return LONE_INIT;
	if (arg == n->cmd_sipi)
		return START;
	if (arg == (n->cmd_sipi | (uint64_t)n->cmd_cpu_down << 8))
		return START_DOWN;
	return NOT_TAKEN;
}

/* The directory entry of the line this CPU's MONITOR is armed on (``mon_line``, its own record), or
 * NULL when that names no line of emulated memory. */
static char *armed_entry(char *b, Init *n)
{
	return kicker_dir_entry(n->bus, b, LOAD32(b + n->mon_line));
}

/* The message take_init() takes: the IPI byte raised alone of the kinds (`wake`'s byte 0 is not
 * one), no write byte, nothing armed but an MWAIT's MONITOR, and such a message. */
static int init_to_take(Waiter *w, Init *n, uint32_t *seq)
{
	char *b = w->base;
	uint32_t wake = LOAD32(b + w->wake), ipi = 0xFFu << (8 * n->ipi_byte);

	if (!(wake & ipi) || (wake & ~0xFFu & ~ipi) || LOAD32(b + w->write))
		return NOT_TAKEN;
	if (LOAD32(b + n->armed) && (LOAD32(b + n->state) != n->st_mwait || !armed_entry(b, n)))
		return NOT_TAKEN;
	return init_message(b, n, seq);
}

/* What this CPU knows (Init.learn) of generation ``gen`` as the table holds it now: its entry,
 * found as smpd.kernel.generations finds it, compared whole with those learnt. NULL: not known. */
static Known *known_as(char *b, Init *n, uint32_t gen)
{
	for (int k = 0; k < n->gen_slots; k++) {
		char *e = b + n->gen_table + (Py_ssize_t)((gen % (uint32_t)n->gen_slots + k) % n->gen_slots) * n->gen_entry;

		if (LOAD32(e) != gen)
			continue;
		for (int i = 0; i < KNOWN; i++)
			if (n->known[i].used && !memcmp(n->known[i].entry, e, n->gen_entry))
				return &n->known[i];
		return NULL;
	}
	return NULL;
}

/* known_as() of the generation the header names now (in *gen), the one a SIPI starts the CPU in
 * (smp_callin() reads it so). */
static Known *known_now(char *b, Init *n, uint32_t *gen)
{
	*gen = LOAD32(b + n->hdr_gen);
	return known_as(b, n, *gen);
}

/* See Init. 1: taken (its byte cleared, its stores made, the wait goes on); 0: the Python path's. */
static int take_init(Waiter *w, Init *n)
{
	char *b = w->base;
	uint32_t seq, again, gen = 0, steps = 1;
	int kind = init_to_take(w, n, &seq);
	Known *g = NULL;
	int64_t now;

	if (kind == NOT_TAKEN)
		return 0;
	if (kind == LONE_DOWN || kind == LONE_REBOOT) {
		/* cpu_down() or stop_other_cpus()' REBOOT vector to a CPU running a generation it knows,
		 * as the table holds that generation now (mwait_play_dead() reads its flavour so: a
		 * rewritten one is Python's); to any other state the Python path answers it (ignored) */
		g = known_as(b, n, LOAD32(b + n->cpu_gen));
		if (!g || LOAD32(b + n->state) != n->st_running || LOAD32(b + n->hotplug) != n->hp_online)
			return 0;
	} else if (kind != LONE_INIT) {
		/* A generation this CPU learnt (its entry as the table holds it now); no NMI or SMI held from
		 * wait-for-SIPI (smp_callin() delivers them: Python's). */
		g = known_now(b, n, &gen);
		if (!g || LOAD32(b + n->nmi_pending) || LOAD32(b + n->smi_pending))
			return 0;
	}
	/* An interrupt signal that came first and is not taken yet (asleep: blocked, pending)
	 * goes first: the Python path takes it, then the INIT (see must_return). */
	if (irq_pending(w))
		return 0;
	/* Acting on a wake-up (smpd.kernel.kexec's settle) from before its byte's clear, as try_ack;
	 * then, as CpuCore._consume, the byte cleared and fenced before the mailbox is read again */
	STORE32(b + n->busy_word, 1);
	STORE8(b + w->wake + n->ipi_byte, 0);
	FENCE();
	if (init_message(b, n, &again) != kind || again != seq) {
		STORE8(b + w->wake + n->ipi_byte, 1);  /* not the message looked at: raised again for Python */
		STORE32(b + n->busy_word, 0);
		return 0;
	}
	now = now_ns();
	if (LOAD32(b + n->armed)) {
		/* In MWAIT (an INIT only gets here so: the REBOOT and CPU_DOWN above need running):
		 * the IPI ends it, as mwait_exit() takes it: the monitor disarmed, then the wake-up
		 * counted. A write that reached the line before the disarm raised the WRITE byte
		 * meanwhile: it ended MWAIT with the IPI, counted with it, and goes no further
		 * (mwait_play_dead() takes the IPI first, and INIT leaves the loop). */
		char *entry = armed_entry(b, n);  /* looked up again: mon_line is a word of the segment */

		if (entry)
			STORE16(entry, 0);
		STORE32(b + n->armed, 0);
		FENCE();
		STORE64(b + n->wake_ipi, LOAD64(b + n->wake_ipi) + 1);
		if (LOAD32(b + w->write)) {
			STORE64(b + n->wake_write, LOAD64(b + n->wake_write) + 1);
			STORE8(b + w->write, 0);
		}
	}
	w->parked = NULL;  /* parked only by a CPU_DOWN below */
	/* the generation it now runs, halts or parks in (after a SIPI: the one it started in); none
	 * after an INIT alone */
	n->taken_known = g ? (int)(g - n->known) : -1;
	if (kind == LONE_REBOOT) {
		/* stop_this_cpu(): its event, offline; then hlt(): the state, its event (the Python
		 * path's order); the wait goes on as HLT's */
		log_at(b, n->ev_head, n->ev_ring, n->ev_slots, n->ev_reboot, 0, now);
		STORE32(b + n->hotplug, n->hp_offline);
		STORE32(b + n->state, n->st_hlt);
		log_at(b, n->ev_head, n->ev_ring, n->ev_slots, n->ev_hlt, 0, now_ns());
		n->taken_state = n->st_hlt;
	} else if (kind != LONE_DOWN) {
		/* init_reset(): nothing is armed now; the count and the event */
		STORE32(b + n->init_count, LOAD32(b + n->init_count) + 1);
		log_at(b, n->ev_head, n->ev_ring, n->ev_slots, n->ev_init, 0, now);
		/* wait_for_sipi(): the state */
		STORE32(b + n->hotplug, n->hp_offline);
		STORE32(b + n->state, n->st_wait_for_sipi);
		n->taken_state = n->st_wait_for_sipi;
	}
	if (kind == START || kind == START_DOWN) {
		/* start_secondary(): the SIPI; smp_callin(): the generation, the fix's clear of
		 * mwait_cpu_dead (a bus write: it wakes whoever monitors the line), running */
		steps++;
		STORE32(b + n->sipi_count, LOAD32(b + n->sipi_count) + 1);
		log_at(b, n->ev_head, n->ev_ring, n->ev_slots, n->ev_sipi, 0, now);
		STORE32(b + n->cpu_gen, gen);
		if (g->ack) {
			static const uint32_t zero[2] = {0, 0};

			bus_write(n->bus, b, g->mon, zero, 2);
		}
		STORE32(b + n->hotplug, n->hp_online);
		STORE32(b + n->state, n->st_running);
		n->taken_state = n->st_running;
	}
	if (kind == START_DOWN || kind == LONE_DOWN) {
		/* running: CPU_DOWN -> play_dead() -> mwait_play_dead(): the fix's entry (none
		 * before it), then MONITOR on the line that kernel watches (as CpuCore.monitor: the
		 * WRITE byte cleared, the directory entry, the CPU's record of it, a fence) */
		if (kind == START_DOWN)
			steps++;
		STORE32(b + n->hotplug, n->hp_offline);
		log_at(b, n->ev_head, n->ev_ring, n->ev_slots, n->ev_offline, 0, now_ns());
		if (g->ack) {  /* state for the kexec() hack: status first, then control, each a bus write */
			bus_write(n->bus, b, g->mon + 4, &n->mwait_wait, 1);
			bus_write(n->bus, b, g->mon, &n->mwait_wait, 1);
		}
		STORE64(b + n->mwait_entries, LOAD64(b + n->mwait_entries) + 1);
		STORE32(b + n->state, n->st_mwait);
		STORE8(b + w->write, 0);
		STORE16(b + g->dir, (uint16_t)(n->cpu + 1));
		STORE32(b + n->mon_line, g->line);
		STORE32(b + n->armed, 1);
		FENCE();
		n->taken_state = n->st_mwait;
		w->parked = g->ack;  /* the wait goes on as MWAIT (pre-fix: with no kick to answer) */
	}
	/* the acknowledgement of the message (its result first: the coordinator polls ack) */
	STORE32(b + n->mbox_result, 0);  /* IPI_DONE */
	STORE32(b + n->mbox_ack, seq);
	/* wait()'s count of its returns: one for each IPI of the message, as the Python path takes them */
	STORE32(b + n->activity, LOAD32(b + n->activity) + steps);
	STORE32(b + n->busy_word, 0);
	n->taken_ns = now;
	n->dead = 0;  /* out of the dead end: interrupts are the state's again */
	w->taken = 1;  /* the wait starts over, in the state the take left (wait_on) */
	return 1;
}

/* Is a byte raised in either wake word? */
static inline int raised(Waiter *w)
{
	return LOAD32(w->base + w->wake) != 0 || LOAD32(w->base + w->write) != 0;
}

/*
 * Must the wait return for a raised byte? 0: nothing is raised, or it was an INIT the call
 * takes (``w->init``, take_init) and the wait goes on (as MWAIT, when ``w->parked`` is set now); 1: return; -1: a handler raised (an
 * exception is set). An interrupt whose signal was sent before the INIT is taken before it, in
 * the state that was waiting, as on the Python path (there the interpreter runs its handler,
 * which raises its byte, before CpuCore._consume reads the wake words). With the GIL held
 * (``gil``; the signals unblocked), a system call first: a signal kill() has already sent (its
 * sender then raised the IPI byte we saw) is delivered on its way back to user mode; then its
 * handler runs here. Asleep (the signals blocked), take_init finds it pending.
 */
static inline int must_return(Waiter *w, int gil)
{
	uint32_t seq;

	if (!raised(w))
		return 0;
	if (!w->init || !init_to_take(w, w->init, &seq))
		return 1;
	if (gil) {
		sigset_t pending;

		sigpending(&pending);  /* the system call; take_init asks again, blocked or not */
		if (PyErr_CheckSignals() < 0)
			return -1;
	}
	return !take_init(w, w->init);
}

/*
 * The WRITE byte of a write the CPU has already seen on its monitored line: the bus
 * raises it right after its store and a fence. Bounded (a writer stopped between its
 * store and its byte must not hold this CPU): a byte later than that reaches HLT, where
 * writes do not wake, and is taken there as nothing.
 */
#define WRITE_BYTE_WAIT_NS 50000000LL  /* 50 ms, yielding the core between looks */

static void await_write_byte(char *wake)
{
	int64_t end = now_ns() + WRITE_BYTE_WAIT_NS;

	for (unsigned n = 1; !__atomic_load_n((uint8_t *)wake, __ATOMIC_ACQUIRE); n++)
		if (n % 64 == 0) {
			if (now_ns() >= end)
				return;
			sched_yield();  /* the writer may be waiting for this host core */
		}
}

/*
 * Nonzero when the compiled path leaves the wake-up to the Python path: an interrupt, IPI or timer
 * byte (Python takes it first, in MWAIT, then rechecks control as mwait_play_dead() does, and
 * answers there); no WRITE byte, unless the write was seen on the control word itself (the bus
 * raises the byte after that); a tag the resume does not find; control not
 * CPUDEAD_MWAIT_KEXEC_HLT. In that order, the loads then one test (``by_content`` is the call
 * site's, its branch predicted): this code runs once per kick, its branches cold (the interpreter
 * ran in between), and each mispredicted one cost ~5 ns of the way to the answer (rdtsc around
 * the checks: 40 ns with a branch per check, 20 ns without).
 */
static inline uint64_t kick_checks_fail(Waiter *w, Ack *a, int by_content)
{
	char *b = w->base;
	uint64_t bad = LOAD32(b + w->wake) & ~0xFFu;

	if (!by_content)
		bad |= !LOAD32(b + w->write);
	for (int k = 0; k < MAX_TAGS; k++)
		bad |= a->tag_mask[k] & ((LOAD64(b + a->tag_off[k]) ^ a->tag_lo[k]) |
					 (LOAD64(b + a->tag_off[k] + 8) ^ a->tag_hi[k]));
	return bad | (LOAD32(b + a->control) ^ a->kexec_hlt);
}

/*
 * The woken CPU's path in mwait_play_dead(), when the only thing that woke it is a
 * bus write (its WRITE byte; or, ``by_content``, while it spins, the control word it
 * monitors seen to change: a write to the line, which is what ends MWAIT): the resume
 * checks (page tables, text, stack: the tags of the old kernel's pages), then
 * control == CPUDEAD_MWAIT_KEXEC_HLT, then the status store the kicker waits for.
 * Anything else (a foreign page, another control value, an interrupt or IPI byte)
 * is left untouched for the Python path.
 *
 * The line moves (bench/bench_kick.py counts them against the floor's): `wake` is
 * on a line no bus write touches (the WRITE byte has its own), so the look for an
 * interrupt that came with the kick finds it in this CPU's cache; the tags are
 * read-only lines; control came with the line the kicker wrote, and the status
 * store sends that line back. The status line is this CPU's own (only its owner may
 * monitor it), so the store needs no directory look. kick_seen_ns (a clock read,
 * ~30 ns, a fifth of the host's round trip here) comes right after the store when the
 * kick was seen on the control word, with the rest of the bookkeeping (the spin keeps
 * that clock warm), and right before it after a wake-up; smpd.kernel.kick takes no
 * one-way sample from a stamp later than the kicker's own sight of the answer.
 */
static void after_answer(Waiter *w, Ack *a, int64_t *seen, int by_content);

static int try_ack(Waiter *w, Ack *a, int64_t *seen, int by_content)
{
	if (kick_checks_fail(w, a, by_content))
		return 0;
	/* Seen on the control word, while spinning: answer first, then stamp (a clock the spin
	 * keeps warm). Woken by the WRITE byte (asleep, or the process was off its core): stamp
	 * first; the wake-up took microseconds, and a clock read cold after it would come after
	 * the kicker's look at the answer. */
	if (!by_content)
		*seen = now_ns();
	STORE32(w->base + a->status, a->kexec_hlt);
	after_answer(w, a, seen, by_content);
	return 1;
}

/* try_ack()'s way from its status store into HLT (also the spin's, which answers itself). */
static void after_answer(Waiter *w, Ack *a, int64_t *seen, int by_content)
{
	char *b = w->base;

	if (by_content)
		*seen = now_ns();
	/* Acting on a wake-up until HLT (smpd.kernel.kexec's settle): from before the WRITE
	 * byte's clear below, which the settle also looks at, so it never sees neither. */
	STORE32(b + a->busy, 1);
	STORE64(b + a->seen, (uint64_t)*seen);
	/* MWAIT's exit ends the monitor, and the write that woke us is consumed: seen on
	 * the control word, its WRITE byte is on its way (the bus raises it after the
	 * store, for as long as the directory names us), so take it before leaving the
	 * directory, not later in HLT. */
	if (by_content)
		await_write_byte(b + w->write);
	STORE16(b + a->dir_entry, 0);
	STORE32(b + a->armed, 0);
	STORE8(b + w->write, 0);
	/* Then what smpd.cpu records on this way into `while (1) native_halt();`:
	 * mwait()'s wake count, wait()'s activity, the two events of the wake-up, the
	 * state and the HLT event. HLT then sleeps right here (sleep_until), so a
	 * cache-cold interpreter runs only after the next interrupt or IPI. */
	STORE64(b + a->wake_write, LOAD64(b + a->wake_write) + 1);
	log_event(b, a, a->ev_wake_write, a->line, *seen);
	log_event(b, a, a->ev_kick_seen, 0, *seen);
	STORE32(b + a->state, a->st_hlt);
	log_event(b, a, a->ev_hlt, 0, now_ns());
	STORE32(b + a->activity, LOAD32(b + a->activity) + 1);
	STORE32(b + a->busy, 0);
}

static PyObject *wait_on(Waiter *w, long long spin_ns, long long deadline, Ack *a);

/* What a step of the wait returns when it acknowledged a kick (at w->ans_seen, with w->ans_ack;
 * w->ans_slept: after a sleep): the CPU is in HLT, and wait_on() waits on there. */
static char answered_tag, taken_tag;
#define ANSWERED ((PyObject *)&answered_tag)
#define TAKEN ((PyObject *)&taken_tag)  /* a step's end: take_init moved the CPU to another state */

static PyObject *answered(Waiter *w, Ack *a, int slept, int64_t seen)
{
	w->ans_seen = seen;
	w->ans_ack = a;
	w->ans_slept = slept;
	return ANSWERED;
}

/* try_ack(), once any interrupt that came with the kick has gone first: its signal (arrived
 * with the kick, or while we spun) has its Python handler pending; run it (run_irq_handlers:
 * when one came), so its byte is raised and try_ack leaves the wake-up to the Python path,
 * which takes the interrupt first, in MWAIT, and then answers the kick as mwait_play_dead()
 * does after an NMI: control read again.
 * -1: a handler raised (an exception is set), 0: left to the Python path, 1: answered. */
static int answer_kick(Waiter *w, Ack *a, int64_t *seen, int by_content)
{
	if (run_irq_handlers(w) < 0)
		return -1;
	return try_ack(w, a, seen, by_content);
}

/* A wake word is raised: acknowledge a kick if ``a`` says so and it is one. */
static PyObject *woke(Waiter *w, Ack *a, int slept)
{
	int64_t seen;
	int r;

	if (!a)
		return Py_BuildValue("(iiL)", WOKE, 0, 0LL);
	r = answer_kick(w, a, &seen, 0);
	if (r < 0)
		return NULL;
	if (!r)
		return Py_BuildValue("(iiL)", WOKE, 0, 0LL);
	return answered(w, a, slept, seen);
}

/* A kick answered (with ``a``): the CPU is in HLT now, where a take that came first in this call
 * left it, with no monitor and nothing to acknowledge. */
static void now_in_hlt(Waiter *w, Ack *a)
{
	if (w->init && w->init->taken_ns)
		w->init->taken_state = a->st_hlt;
	w->parked = NULL;
}

/* Just before sigwaitinfo(): where `smpd status` finds a sleeping CPU's host core (not in /proc),
 * then `sleeping`, and the fence that pairs with the bus's: we see its byte or it sees `sleeping`. */
static void fall_asleep(Waiter *w)
{
	if (w->sleep_core >= 0)
		STORE32(w->base + w->sleep_core, (uint32_t)sched_getcpu());
	STORE32(w->base + w->sleeping, 1);
	FENCE();
}

/*
 * A dead CPU's wait (Init.dead: SHUTDOWN, or halted in foreign bytes) took interrupt signal ``sig``
 * asleep: nothing executes its handler, as in _dead_end (smpd.kernel.cpu), which counts it held.
 * Counted so here, with wait()'s count of its returns (one for the interrupt's), while `busy`
 * says it acts on a wake-up; the sleep goes on. 0: not a dead CPU's wait, or not a signal it holds.
 */
static int hold_if_dead(Waiter *w, int sig)
{
	Init *n = w->init;
	char *b = w->base;

	if (!n || !n->dead)
		return 0;
	for (int k = 0; k < n->nheld; k++) {
		if (n->held_sig[k] != sig)
			continue;
		STORE32(b + n->busy_word, 1);
		STORE32(b + n->held_off[k], LOAD32(b + n->held_off[k]) + 1);
		STORE32(b + n->activity, LOAD32(b + n->activity) + 1);
		STORE32(b + n->busy_word, 0);
		return 1;
	}
	return 0;
}

/*
 * Asleep (the signals blocked, no GIL): wait until a byte is raised, a message is taken, the
 * deadline passes (*code TIMEOUT), an interrupt signal comes (*code SIGNAL, *signo) or a system
 * call fails (*failed). Returns when the doorbell last ended sigwaitinfo() and the process ran
 * again (0: it did not).
 */
static int64_t sigwait_loop(Waiter *w, int64_t deadline, int *code, int *signo, int *failed)
{
	int64_t rung = 0;

	while (!must_return(w, 0) && !w->taken) {
		siginfo_t info;
		int r;

		if (deadline) {
			int64_t left = deadline - now_ns();
			struct timespec ts;

			if (left <= 0) {
				*code = TIMEOUT;
				break;
			}
			ts.tv_sec = left / 1000000000LL;
			ts.tv_nsec = left % 1000000000LL;
			r = sigtimedwait(&w->sleep_set, &info, &ts);
		} else {
			r = sigwaitinfo(&w->sleep_set, &info);
		}
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;  /* the deadline is checked above; EINTR: another handler ran */
			*failed = errno;
			break;
		}
		if (sigismember(&w->irq, r)) {
			if (hold_if_dead(w, r))
				continue;
			*code = SIGNAL;
			*signo = r;
			break;
		}
		rung = now_ns();  /* the doorbell: look at the wake words again */
	}
	return rung;
}

/*
 * The doorbell ended MWAIT's sleep: answer the kick right here, still asleep to the interpreter
 * (no GIL, the signals still blocked), and go on to HLT's sleep, as wait_on() would after
 * answered() with the mask restored and blocked again. Only where no interrupt can be waiting
 * for the interpreter instead: no other thread that could have taken its signal (``lone``),
 * none pending for this one (sigpending(): it is taken first, on the Python path). 1: answered
 * (when: w->slept_ans), the CPU in HLT.
 */
static int answer_asleep(Waiter *w, Ack *a)
{
	int64_t seen;

	if (!w->lone || irq_pending(w))
		return 0;
	if (!try_ack(w, a, &seen, 0))
		return 0;
	w->slept_ans = seen;
	now_in_hlt(w, a);
	return 1;
}

/* Sleep until a byte is raised, the deadline passes, or an interrupt signal comes. */
static PyObject *sleep_until(Waiter *w, Ack *a, int64_t deadline)
{
	sigset_t old;
	int code = WOKE, signo = 0, failed = 0;
	int64_t rung;

	pthread_sigmask(SIG_BLOCK, &w->irq, &old);
	/* An interrupt that landed before the block has its Python handler pending:
	 * run it now, so its byte is raised before we look. */
	if (PyErr_CheckSignals() < 0) {
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		return NULL;
	}
	fall_asleep(w);
	Py_BEGIN_ALLOW_THREADS  /* no Python below until the wake-up: other threads may run */
	for (;;) {
		rung = sigwait_loop(w, deadline, &code, &signo, &failed);
		if (!rung || code != WOKE || w->taken)
			break;
		/* Woken by the doorbell, this process running again: a kick of a sleeping CPU
		 * is timed in two parts with it (smpd.kernel.kick). Not for a timeout, an
		 * interrupt, an INIT taken, or a byte raised before the sleep began. */
		if (w->woke >= 0)
			STORE64(w->base + w->woke, (uint64_t)rung);
		if (!a)
			break;
		STORE32(w->base + w->sleeping, 0);  /* awake: the kicker's next udelay rings no doorbell */
		if (!answer_asleep(w, a))
			break;
		a = NULL;  /* HLT: no monitor, nothing to acknowledge, no deadline */
		deadline = 0;
		fall_asleep(w);
	}
	Py_END_ALLOW_THREADS
	STORE32(w->base + w->sleeping, 0);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (failed) {
		errno = failed;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	if (w->taken)
		return TAKEN;
	if (code == WOKE)
		return woke(w, a, 1);
	return Py_BuildValue("(iiL)", code, signo, 0LL);
}

/*
 * Is the calling thread its process's only one? Asked of the kernel (num_threads, the 20th field of
 * /proc/self/stat), at a Waiter's first wait, in the process that waits: a CPU's Waiter is built in
 * the template, before the fork. 0 when the kernel does not say. Here, not in Python
 * (os.listdir("/proc/self/task") in cpu_main): ~20 copy-on-write page faults of the interpreter's
 * in a CPU process just forked.
 */
static signed char lone_now(void)
{
	char buf[1024], *p;
	ssize_t n;
	int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC), field;

	if (fd < 0)
		return 0;
	do
		n = read(fd, buf, sizeof buf - 1);
	while (n < 0 && errno == EINTR);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	p = strrchr(buf, ')');  /* the end of comm, which may hold anything */
	for (field = 2; p && field < 20; field++)
		p = strchr(p + 1, ' ');
	return p && strtol(p + 1, NULL, 10) == 1;
}

static PyObject *Waiter_wait(Waiter *w, PyObject *args)
{
	long long spin_ns, deadline;
	PyObject *ack, *init = Py_None, *r;
	Ack *a = NULL;
	Init *n = NULL;
	Py_buffer view;
	Py_ssize_t need = w->need;

	if (!PyArg_ParseTuple(args, "LLO|O", &spin_ns, &deadline, &ack, &init))
		return NULL;
	if (!w->buf) {
		PyErr_SetString(PyExc_RuntimeError, "Waiter is not initialised");
		return NULL;
	}
	if (ack != Py_None) {
		if (!PyObject_TypeCheck(ack, &AckType) || !((Ack *)ack)->ready) {
			PyErr_SetString(PyExc_TypeError, "ack must be an initialised Ack, or None");
			return NULL;
		}
		a = (Ack *)ack;
		if (a->need > need)
			need = a->need;
	}
	if (init != Py_None) {
		if (!PyObject_TypeCheck(init, &InitType) || !((Init *)init)->ready) {
			PyErr_SetString(PyExc_TypeError, "init must be an initialised Init, or None");
			return NULL;
		}
		n = (Init *)init;
		if (n->need > need)
			need = n->need;
	}
	/* A wait that may answer a kick (answer_kick; with an Init, once a take parks the CPU): a
	 * signal.signal() since the wrap makes it look every time. Only here: the look costs a system
	 * call per interrupt signal (~0.3 us each on this host). */
	if ((a || n) && w->wrapped && !irq_still_wrapped(w))
		w->wrapped = 0;
	if (w->busy) {  /* w->base is the running call's: one wait() per Waiter at a time */
		PyErr_SetString(PyExc_RuntimeError, "this Waiter is already waiting in another thread");
		return NULL;
	}
	w->base = acquire(w->buf, &view, need);
	if (!w->base)
		return NULL;
	if (n && n->busy) {
		PyErr_SetString(PyExc_RuntimeError, "this Init is in use by another wait");
		PyBuffer_Release(&view);
		w->base = NULL;
		return NULL;
	}
	w->busy = 1;
	if (w->lone < 0)
		w->lone = lone_now();
	if (n) {
		n->taken_ns = 0;
		n->taken_known = -1;
		n->busy = 1;
	}
	w->init = n;  /* the call holds it (args) */
	w->parked = NULL;
	w->slept_ans = 0;
	r = wait_on(w, spin_ns, deadline, a);
	w->init = NULL;
	w->parked = NULL;
	if (n)
		n->busy = 0;
	w->busy = 0;
	w->base = NULL;
	PyBuffer_Release(&view);
	return r;
}

enum { SPIN_ERROR = -1, SPIN_ANSWERED, SPIN_RAISED, SPIN_END, SPIN_TAKEN };

/*
 * Spin on the wake words, for spin_ns (< 0: until woken). In mwait_play_dead() with a kick to
 * answer (``a``), the spin also watches the monitored line's control word itself, as MWAIT
 * watches its line: a change is a write, and the kick's cache line then moves to this CPU and
 * back alone, before the bus's WRITE byte (a second line) arrives. Writes that change nothing
 * still come as that byte. Control is loaded first: the wake words' loads then come after it
 * in program order (x86 keeps loads in order), and no look at them stands between the kick and
 * its answer. SPIN_ANSWERED: the kick was answered, at *seen.
 *
 * The resume's checks (try_ack's: the tags, `wake`, control == CPUDEAD_MWAIT_KEXEC_HLT) are
 * made in every round, right after control's load: loaded after it in program order, what they
 * read is at least as new as every write before the one control shows, so in the round that sees
 * control change they are the checks made after the wake-up, as try_ack's. (A kick's store is a
 * release, control's load an acquire. A kexec copy's memmove() may make one page's stores seen
 * out of order, but store_page() fences after each page, and no tag shares a page with a struct
 * mwait_cpu_dead: the tags are of page-table, text and stack pages.) Their loads hit this CPU's cache while control's line is on its
 * way, and only a compare stands between the line's arrival and the status store: made after
 * the change, behind the loop's mispredicted exit, they had cost ~20 ns of a ~200 ns round
 * trip here (one machine, the two ways alternated between bench kick runs: stretch medians
 * 181 -> 161 and 200 -> 180 ns where the floor was ~120 ns). An interrupt signal that came
 * (irq_came; or handlers not wrapped) sends the kick the long way, answer_kick, whose
 * handlers run first.
 */
static int spin(Waiter *w, Ack *a, long long spin_ns, long long deadline, int64_t *seen)
{
	int64_t end = spin_ns < 0 ? INT64_MAX : now_ns() + spin_ns;
	unsigned n = 0;
	volatile uint32_t *control = a ? (uint32_t *)(w->base + a->control) : NULL;
	uint32_t before = control ? LOAD32(control) : 0;

	if (deadline && deadline < end)
		end = deadline;
	for (;;) {
		/* THE HOT LOOP: a load and a compare of each word */
		if (control) {
			uint32_t now = LOAD32(control);
			/* try_ack's checks, made in every round, after control's load: see above */
			uint64_t bad = kick_checks_fail(w, a, 1) | !w->wrapped | irq_came;

			if (now != before) {
				int r;

				if (!bad) {
					STORE32(w->base + a->status, a->kexec_hlt);
					after_answer(w, a, seen, 1);
					return SPIN_ANSWERED;
				}
				r = answer_kick(w, a, seen, 1);  /* the long way: an interrupt came, or not a kick */
				if (r < 0)
					return SPIN_ERROR;
				if (r)
					return SPIN_ANSWERED;
				control = NULL;  /* not a kick to answer here: its WRITE byte follows */
				STORE32(w->base + w->watch, 0);
			}
		}
		switch (must_return(w, 1)) {
		case -1:
			return SPIN_ERROR;
		case 1:
			return SPIN_RAISED;
		}
		if (w->taken)  /* the CPU is in another state: its wait starts over (wait_on) */
			return SPIN_TAKEN;
		if (++n % SIGNAL_POLL == 0) {
			/* run_irq_handlers: an interrupt's handler that runs here also clears irq_came, which
			 * would otherwise send this CPU's next kick the long way */
			if (run_irq_handlers(w) < 0 || PyErr_CheckSignals() < 0)
				return SPIN_ERROR;
			/* More spinning processes than host cores: without this, a CPU
			 * whose core another spinner holds waits out a scheduler slice
			 * (ms) before it sees its kick. */
			/* Hand the GIL round while here: a thread of this process
			 * (a test's helper) may be the one that raises our byte. */
			Py_BEGIN_ALLOW_THREADS
			if (w->yield)
				sched_yield();
			Py_END_ALLOW_THREADS
			/* The clock is read here even with no end: the acknowledgement's stamp
			 * (try_ack) then finds it warm, not microseconds cold after a long spin. */
			if (now_ns() >= end)
				return SPIN_END;
		}
	}
}

/* One wait: until a byte is raised that is not taken here, the deadline, an interrupt signal, a
 * kick answered (ANSWERED) or a message taken (TAKEN). */
static PyObject *wait_step(Waiter *w, long long spin_ns, long long deadline, Ack *a)
{
	int must;

	w->taken = 0;
	must = must_return(w, 1);
	if (must < 0)
		return NULL;
	if (w->taken)
		return TAKEN;
	if (must)
		return woke(w, a, 0);
	if (spin_ns != 0) {
		int64_t seen = 0;
		int r;

		/* `mon_watch`: the kicker looks for the answer of a CPU that watches its control
		 * word itself before the rest of the bus's rule (Kicker_kick_one). */
		if (a)
			STORE32(w->base + w->watch, 1);
		r = spin(w, a, spin_ns, deadline, &seen);
		if (a)
			STORE32(w->base + w->watch, 0);
		if (r == SPIN_ERROR)
			return NULL;
		if (r == SPIN_TAKEN)
			return TAKEN;
		if (r == SPIN_ANSWERED)
			return answered(w, a, 0, seen);
		must = must_return(w, 1);
		if (must < 0)
			return NULL;
		if (w->taken)
			return TAKEN;
		if (must)
			return woke(w, a, 0);
		if (spin_ns < 0 || (deadline && now_ns() >= deadline))  /* spin ends only so */
			return Py_BuildValue("(iiL)", TIMEOUT, 0, 0LL);
	}
	return sleep_until(w, a, deadline);
}

/*
 * Emulator machinery, no kernel counterpart: the pages the resume checks will read (the tags of
 * the old kernel's page tables, text and stack), read once before the wait. The segment is
 * mapped shared, so a forked CPU process maps each page at its first touch: without this, a
 * CPU's first kick in each generation took a page fault per tag (three, ~2-3 us each on a VM)
 * on its way to the answer. Only reads: the bus acts on writes, and the checks themselves
 * still come after the wake-up (try_ack).
 */
static void map_tags(char *b, Ack *a)
{
	for (int k = 0; k < a->ntags; k++)
		(void)*(volatile uint64_t *)(b + a->tag_off[k]);
}

/*
 * The wait: its steps, until one returns what the caller must see. A kick answered (the CPU
 * acknowledged and is in HLT) is followed by HLT's wait, until an interrupt or an IPI (a
 * spin-watch CPU spins, others sleep at once), in a loop, not a call: an INIT taken there may
 * park the CPU again (take_init), and the next kick be answered in the same call. A message
 * taken starts the wait over in the state it left (the CPU's spin budget, then sleep). What
 * ended the last wait is returned with when the last kick was seen. Each step with an Ack
 * first maps the pages its resume checks read (map_tags).
 */
static PyObject *wait_on(Waiter *w, long long spin_ns, long long deadline, Ack *a)
{
	int64_t seen = 0;

	for (;;) {
		PyObject *r, *out;

		if (a)
			map_tags(w->base, a);
		r = wait_step(w, spin_ns, deadline, a);
		if (w->slept_ans) {  /* sleep_until answered a kick and slept on in HLT: r ended that */
			seen = w->slept_ans;
			w->slept_ans = 0;
		}
		if (r == TAKEN) {  /* a new state's wait, as the Python path's next: its spin budget first */
			a = w->parked;  /* parked: MWAIT, with that generation's Ack */
			spin_ns = w->init->spin_ns;
			if (w->init->taken_state == w->init->st_hlt && spin_ns > 0)
				spin_ns = 0;  /* HLT sleeps at once (a spin watch spins: -1) */
			deadline = w->init->spurious_ns > 0 ? now_ns() + w->init->spurious_ns : 0;
			continue;
		}
		if (r != ANSWERED) {
			if (!r || !seen)
				return r;
			out = Py_BuildValue("(OOL)", PyTuple_GET_ITEM(r, 0), PyTuple_GET_ITEM(r, 1), (long long)seen);
			Py_DECREF(r);
			return out;
		}
		seen = w->ans_seen;
		now_in_hlt(w, w->ans_ack);
		/* Acknowledged after a sleep: the kicker may be waiting for this host core
		 * (it yields it while we sleep). Hand it back before anything else. */
		if (w->ans_slept)
			sched_yield();
		a = NULL;
		spin_ns = spin_ns < 0 ? -1 : 0;
		deadline = 0;
	}
}

static PyMethodDef Waiter_methods[] = {
	{"install_signal_handlers", (PyCFunction)Waiter_install_signal_handlers, METH_NOARGS,
	 "install_signal_handlers() -> bool\n\n"
	 "After the process's own handlers of the interrupt signals (Python's): put a C handler in front of\n"
	 "each that runs it, then notes that an interrupt came, so that the answer to a kick runs the\n"
	 "interpreter's pending handlers only when one did (irq_arrived). True when every interrupt signal\n"
	 "had a handler to wrap; a wait that finds one replaced since (signal.signal()) looks every time."},
	{"wait", (PyCFunction)Waiter_wait, METH_VARARGS,
	 "wait(spin_ns, deadline_ns, ack, init=None) -> (code, arg, acked_ns)\n\n"
	 "Wait for the wake words: spin for spin_ns (-1: until woken; 0: not at all), then sleep\n"
	 "in sigwaitinfo() on the doorbell and interrupt signals; deadline_ns (CLOCK_MONOTONIC, 0 =\n"
	 "none) ends the wait as TIMEOUT. code is WOKE (the wake words are left for the caller),\n"
	 "TIMEOUT, or SIGNAL with arg = the interrupt signal taken while asleep. acked_ns is 0,\n"
	 "or, when ack was given and the wake-up was a kick it could acknowledge, when the CPU saw\n"
	 "the kick (the last one): it then acknowledged, went into HLT, and code/arg say what ended\n"
	 "HLT. With init (an Init), an INIT, alone or followed by SIPI (and CPU_DOWN), is taken on the\n"
	 "way, in HLT after a kick too (see take_init); the wait then starts over in the state the take\n"
	 "left: init.taken_ns says when, init.taken_state where (WAIT_FOR_SIPI, RUNNING, MWAIT; HLT\n"
	 "when a kick came after), init.taken_entry in which generation, init.taken_ack with what\n"
	 "Ack it waits parked; code/arg are the next wake-up's, for that state to take."},
	{NULL},
};

static PyObject *Waiter_get_lone(Waiter *w, void *Py_UNUSED(closure))
{
	if (w->lone < 0)
		Py_RETURN_NONE;
	return PyBool_FromLong(w->lone);
}

static int Waiter_set_lone(Waiter *w, PyObject *value, void *Py_UNUSED(closure))
{
	int lone;

	if (!value) {
		PyErr_SetString(PyExc_TypeError, "lone cannot be deleted");
		return -1;
	}
	lone = PyObject_IsTrue(value);
	if (lone < 0)
		return -1;
	w->lone = (signed char)lone;
	return 0;
}

static PyGetSetDef Waiter_getset[] = {
	{"lone", (getter)Waiter_get_lone, (setter)Waiter_set_lone,
	 "True where this thread is its process's only one (a CPU process: forked), so no other thread can take an\n"
	 "interrupt signal while it sleeps: a kick that rings its doorbell is then answered without waking the\n"
	 "interpreter (no Python handler can be waiting to run first). None until set, or until the first wait\n"
	 "asks the kernel (num_threads in /proc/self/stat)."},
	{NULL}
};

static PyTypeObject WaiterType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "smpd._hotpath.Waiter",
	.tp_doc = "Waiter(buf, wake, sleeping, irq_signals, doorbell): one CPU's watch loop over the segment",
	.tp_basicsize = sizeof(Waiter),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Waiter_init,
	.tp_dealloc = (destructor)Waiter_dealloc,
	.tp_methods = Waiter_methods,
	.tp_getset = Waiter_getset,
};

/* ---- Kicker: the coordinator's side ---------------------------------------- */

struct Kicker {
	PyObject_HEAD
	PyObject *buf;
	char *base;  /* valid during a call only */
	Py_ssize_t mem_off, mem_len, dir_off, cb_off, cb_size, cb_write, cb_sleeping, cb_pid, cb_watch;
	Py_ssize_t line, dir_entry;  /* bytes: a cache line, one directory entry (u16 owner) */
	int line_shift;
	long ncpus;
	int doorbell;
	int yield;  /* spinning CPUs outnumber host cores: udelay yields the core, as for a sleeper */
	Py_ssize_t need;  /* the buffer must be this long: the last byte the checked geometry names */
};

static int Kicker_init(Kicker *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"buf", "mem_off", "mem_len", "dir_off", "cb_off", "cb_size", "cb_write",
				"cb_sleeping", "cb_pid", "cb_watch", "ncpus", "doorbell", "line", "dir_entry",
				"spin_yields", NULL};
	PyObject *buf;
	Py_buffer view;
	int bad;

	if (self->buf) {  /* first: a second __init__ must not touch the checked offsets */
		PyErr_SetString(PyExc_RuntimeError, "Kicker is already initialised");
		return -1;
	}
	self->yield = 0;
	if (!PyArg_ParseTupleAndKeywords(args, kw, "Onnnnnnnnnlinn|p", names, &buf, &self->mem_off, &self->mem_len,
					 &self->dir_off, &self->cb_off, &self->cb_size, &self->cb_write,
					 &self->cb_sleeping, &self->cb_pid, &self->cb_watch, &self->ncpus, &self->doorbell,
					 &self->line, &self->dir_entry, &self->yield))
		return -1;
	if (self->line < 8 || self->line > PAGE_BYTES || (self->line & (self->line - 1))) {
		PyErr_Format(PyExc_ValueError, "line is %zd bytes; a power of two of 8 to %d is needed",
			     self->line, PAGE_BYTES);
		return -1;
	}
	if (self->mem_len % self->line) {  /* every line of memory has its directory entry */
		PyErr_Format(PyExc_ValueError, "mem_len %zd is not a whole number of %zd-byte lines",
			     self->mem_len, self->line);
		return -1;
	}
	if (self->dir_entry != 2) {  /* monitor_owner() loads a u16 owner */
		PyErr_Format(PyExc_ValueError, "dir_entry is %zd bytes; this hot path reads 2-byte (u16) owners",
			     self->dir_entry);
		return -1;
	}
	self->line_shift = __builtin_ctzl((unsigned long)self->line);
	if (!acquire(buf, &view, 0))
		return -1;
	/* In this order, each product is of terms already bounded by the buffer's length. */
	bad = !fits(self->mem_off, self->mem_len, view.len) ||
	      !fits(self->dir_off, self->dir_entry * (self->mem_len / self->line), view.len) ||
	      self->cb_size <= 0 || self->ncpus < 0 || self->ncpus > view.len / self->cb_size ||
	      !fits(self->cb_off, self->ncpus * self->cb_size, view.len) ||
	      /* each control-block field the kick loop touches lies inside the block, its u32s aligned */
	      self->cb_write < 0 || self->cb_write >= self->cb_size ||
	      self->cb_sleeping < 0 || self->cb_sleeping + 4 > self->cb_size || (self->cb_sleeping & 3) ||
	      self->cb_pid < 0 || self->cb_pid + 4 > self->cb_size || (self->cb_pid & 3) ||
	      self->cb_watch < 0 || self->cb_watch + 4 > self->cb_size || (self->cb_watch & 3);
	PyBuffer_Release(&view);
	if (bad) {
		PyErr_SetString(PyExc_ValueError, "the geometry does not fit the segment");
		return -1;
	}
	self->need = self->mem_off + self->mem_len;
	if (self->dir_off + self->dir_entry * (self->mem_len / self->line) > self->need)
		self->need = self->dir_off + self->dir_entry * (self->mem_len / self->line);
	if (self->cb_off + self->ncpus * self->cb_size > self->need)
		self->need = self->cb_off + self->ncpus * self->cb_size;
	Py_INCREF(buf);
	self->buf = buf;
	return 0;
}

static void Kicker_dealloc(Kicker *self)
{
	Py_XDECREF(self->buf);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The directory entry of ``line`` of emulated memory in the segment at ``base``, which the caller
 * has bounded (kicker_dir_entry does). */
static inline char *dir_entry_at(Kicker *k, char *base, Py_ssize_t line)
{
	return base + k->dir_off + k->dir_entry * line;
}

/* The control block of the CPU whose monitor is armed on the line holding ``off``, or NULL, in the
 * segment at ``base`` (the caller's: a Kicker's own is valid during its own calls only). */
static char *monitor_owner(Kicker *k, char *base, Py_ssize_t off)
{
	uint16_t owner = LOAD16(dir_entry_at(k, base, off >> k->line_shift));

	if (!owner || owner > k->ncpus)
		return NULL;
	return base + k->cb_off + (owner - 1) * k->cb_size;
}

/* Wake the monitor's owner, control block ``cb``: raise its WRITE byte (`mon_write`), fence, and
 * ring its doorbell if it sleeps (smpd.machine.bus.Bus.wake). Returns 1 when it slept. */
static int ring(Kicker *k, char *cb)
{
	STORE8(cb + k->cb_write, 1);
	FENCE();
	if (LOAD32(cb + k->cb_sleeping)) {
		uint32_t pid = LOAD32(cb + k->cb_pid);

		if (pid && pid <= INT_MAX)  /* a pid, never -1 or a process group */
			kill((pid_t)pid, k->doorbell);  /* gone: the coordinator marks it GONE */
		return 1;
	}
	return 0;
}

/*
 * The bus's rule after a u32 store at ``off`` (smpd.bus.Bus.write): fence, look up the
 * line's monitor in the directory; wake its owner by raising the WRITE byte
 * (`mon_write`), fence, and ring the doorbell if it sleeps. Returns 1 when the owner was asleep.
 */
static int bus_rule(Kicker *k, char *base, Py_ssize_t off)
{
	char *cb;

	FENCE();
	cb = monitor_owner(k, base, off);
	return cb ? ring(k, cb) : 0;
}

/* smpd.machine.bus.Bus.write of ``n`` u32 ``words`` (within one line) at ``off`` of emulated
 * memory in the segment at ``base``, from a CPU's wait (take_init): the stores, then the rule. */
static void bus_write(Kicker *k, char *base, Py_ssize_t off, const uint32_t *words, int n)
{
	for (int i = 0; i < n; i++)
		STORE32(base + k->mem_off + off + 4 * i, words[i]);
	bus_rule(k, base, off);
}

/* Is ``cpu`` one of the CPUs an initialised bus's directory can name? */
static int kicker_has_cpu(Kicker *k, uint32_t cpu)
{
	return k->buf && cpu < (unsigned long)k->ncpus;
}

/* The directory entry of ``line`` of emulated memory in the segment at ``base``, or NULL when
 * memory has no such line. */
static char *kicker_dir_entry(Kicker *k, char *base, uint32_t line)
{
	if ((Py_ssize_t)line >= k->mem_len >> k->line_shift)
		return NULL;
	return dir_entry_at(k, base, (Py_ssize_t)line);
}

/* ``n`` bytes (u32s) at ``off`` of emulated memory, within one line: that line (*line), its
 * directory entry (*dir, segment bytes) and the segment length all that needs (*need). -1: not so (an
 * exception is set). */
static int kicker_line(Kicker *k, Py_ssize_t off, Py_ssize_t n, uint32_t *line, Py_ssize_t *dir, Py_ssize_t *need)
{
	if (!k->buf) {
		PyErr_SetString(PyExc_ValueError, "the bus (a Kicker) is not initialised");
		return -1;
	}
	if (!fits(off, n, k->mem_len) || off % 4 || n % 4 || (off & (k->line - 1)) + n > k->line) {
		PyErr_Format(PyExc_ValueError, "%zd bytes at offset %zd are not u32s of one line of emulated memory",
			     n, off);
		return -1;
	}
	*line = (uint32_t)(off >> k->line_shift);
	*dir = k->dir_off + k->dir_entry * *line;
	*need = k->need;
	return 0;
}

/* Up to ``looks`` looks at status, stamping the first that finds the answer. */
static void look_at_status(volatile uint32_t *status, uint32_t hlt, int looks, int64_t *t_ack)
{
	for (int look = 0; look < looks && !*t_ack; look++)
		if (LOAD32(status) == hlt)
			*t_ack = now_ns();  /* read after the load: never before the ack */
}

/* One kick's outcome: smp_kick_mwait_play_dead()'s loop for one CPU, timed. */
typedef struct {
	int acked;
	long rounds;
	int64_t t_first, t_ack;
} KickResult;

static int md_in_memory(Kicker *k, Py_ssize_t md)
{
	if (!fits(md, 8, k->mem_len) || md % 4) {
		PyErr_Format(PyExc_ValueError, "mwait_cpu_dead offset %zd is outside emulated memory", md);
		return 0;
	}
	return 1;
}

/* The kick of the CPU whose mwait_cpu_dead sits at ``md`` (checked), with k->base set. */
static KickResult kick_md(Kicker *k, Py_ssize_t md, uint32_t hlt, long long delay_ns, long rounds)
{
	long i = 0;
	int64_t t_first, t_ack = 0;
	int watching, done, give_core = 0;
	char *owner;
	volatile uint32_t *status = (uint32_t *)(k->base + k->mem_off + md + 4);
	KickResult out;

	/* Emulator machinery, no kernel counterpart: before the kick's first instant (as
	 * smpd.machine.pyhotpath's Kicker looks up its owner), does the monitoring CPU spin
	 * watching its control word itself (`mon_watch`, set by the compiled Waiter)? A hint
	 * only: the rule follows in any case. */
	owner = monitor_owner(k, k->base, md);
	watching = owner && LOAD32(owner + k->cb_watch);
	/* The loop's first test, READ_ONCE(md->status), reads the line before the first write
	 * (it comes over from the CPU, which wrote it when it parked; smp_kick_mwait_play_dead()
	 * has read it just before, in "Does it sit in mwait_play_dead() ?"): the kick's first
	 * instant is the write, after that test (DESIGN.md §6). */
	done = LOAD32(status) == hlt;
	t_first = now_ns();
	/* Wait up to 5ms */
	while (i < rounds && !done) {
		/* udelay() counts from the write (t_first is read just before the first): the
		 * bus's rule, the emulator's way for the write to reach the monitor, is inside
		 * it, and so is whatever the CPU it wakes does on this host core meanwhile. */
		int64_t end = (i ? now_ns() : t_first) + delay_ns;

		/* Bring it out of mwait */
		STORE32(k->base + k->mem_off + md, hlt);
		/* A CPU in mwait_play_dead() that spins watching the control word itself, as
		 * MWAIT watches its line (Waiter.wait with an Ack), answers within a few line
		 * moves (a few us when its caches went cold in a long spin): look for that
		 * first, for up to EARLY_NS (at most the udelay), before the rest of the bus's
		 * rule (two fences, a directory entry and the WRITE byte's line: as long as the
		 * whole answer), which follows; the CPU takes that byte after its answer. Any
		 * other CPU (asleep, running Python) gets the rule first; so does one whose
		 * process shares host cores with other spinners (it may need this one). */
		if (watching && i == 0 && !k->yield) {
			/* From t_first, just before the store: no clock read (~30 ns with no look)
			 * before the first EARLY_LOOKS looks, where a quick answer comes. */
			do
				look_at_status(status, hlt, EARLY_LOOKS, &t_ack);
			while (!t_ack && now_ns() < t_first + (delay_ns < EARLY_NS ? delay_ns : EARLY_NS));
		}
		/* The CPU sleeps, or spinners outnumber cores: either way it needs a host
		 * core to see the kick on, maybe this one; for the rest of its kick too, once
		 * its doorbell rang (woken, it clears `sleeping` before it answers). */
		give_core = bus_rule(k, k->base, md) || k->yield || give_core;
		for (;;) {  /* udelay(), watching status to time the acknowledgement */
			/* Look at status first, and between clock reads: a clock read
			 * (~30 ns) is longer than a line move, and a spinning CPU answers
			 * within a few of those (the floor's ping-pong reads no clock
			 * between its store and its look). */
			look_at_status(status, hlt, UDELAY_LOOKS, &t_ack);
			if (now_ns() >= end)
				break;
			if (give_core)
				sched_yield();
		}
		i++;
		done = LOAD32(status) == hlt;
	}
	out.acked = done;
	if (out.acked && !t_ack && i)  /* it answered between the udelay's last look and the loop's test */
		t_ack = now_ns();
	out.rounds = i;
	out.t_first = t_first;
	out.t_ack = t_ack;
	return out;
}

static PyObject *kick_result(KickResult r)
{
	return Py_BuildValue("(OlLL)", r.acked ? Py_True : Py_False, r.rounds, (long long)r.t_first, (long long)r.t_ack);
}

static PyObject *Kicker_kick_one(Kicker *k, PyObject *args)
{
	Py_ssize_t md;  /* mwait_cpu_dead's offset in emulated memory */
	unsigned int hlt;  /* CPUDEAD_MWAIT_KEXEC_HLT */
	long long delay_ns;
	long rounds;
	Py_buffer view;
	KickResult r;

	if (!PyArg_ParseTuple(args, "nILl", &md, &hlt, &delay_ns, &rounds))
		return NULL;
	if (!md_in_memory(k, md))
		return NULL;
	if (!k->buf) {
		PyErr_SetString(PyExc_RuntimeError, "Kicker is not initialised");
		return NULL;
	}
	k->base = acquire(k->buf, &view, k->need);  /* checked again: a buffer can shrink (mmap.resize) */
	if (!k->base)
		return NULL;
	r = kick_md(k, md, hlt, delay_ns, rounds);
	k->base = NULL;
	PyBuffer_Release(&view);
	return kick_result(r);
}

/*
 * smp_kick_mwait_play_dead()'s loop over CPUs: for each mwait_cpu_dead offset in turn, skip
 * it (None) unless its status is ``waiting`` now ("Does it sit in mwait_play_dead() ?"),
 * else kick it as kick_one() does. Returns the results so far after the first CPU that does
 * not answer, for the caller to report it (pr_err_once) and go on with the rest: no Python
 * runs between two kicks, where it had cost ~7 us a CPU.
 */
static PyObject *Kicker_kick_each(Kicker *k, PyObject *args)
{
	PyObject *seq, *fast, *out = NULL;
	unsigned int hlt, waiting;
	long long delay_ns;
	long rounds;
	Py_ssize_t n, j;
	Py_ssize_t *mds;
	Py_buffer view;

	if (!PyArg_ParseTuple(args, "OIILl", &seq, &hlt, &waiting, &delay_ns, &rounds))
		return NULL;
	if (!k->buf) {
		PyErr_SetString(PyExc_RuntimeError, "Kicker is not initialised");
		return NULL;
	}
	fast = PySequence_Fast(seq, "md_offs must be a sequence of offsets");
	if (!fast)
		return NULL;
	n = PySequence_Fast_GET_SIZE(fast);
	mds = PyMem_New(Py_ssize_t, n ? n : 1);
	if (!mds) {
		Py_DECREF(fast);
		return PyErr_NoMemory();
	}
	for (j = 0; j < n; j++) {
		mds[j] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fast, j));
		if ((mds[j] == -1 && PyErr_Occurred()) || !md_in_memory(k, mds[j]))
			goto done;
	}
	out = PyList_New(0);
	if (!out)
		goto done;
	k->base = acquire(k->buf, &view, k->need);
	if (!k->base) {
		Py_CLEAR(out);
		goto done;
	}
	for (j = 0; j < n; j++) {
		PyObject *item;
		KickResult r = {0};

		if (LOAD32(k->base + k->mem_off + mds[j] + 4) != waiting) {
			item = Py_NewRef(Py_None);
		} else {
			r = kick_md(k, mds[j], hlt, delay_ns, rounds);
			item = kick_result(r);
		}
		if (!item || PyList_Append(out, item) < 0) {
			Py_XDECREF(item);
			Py_CLEAR(out);
			break;
		}
		Py_DECREF(item);
		if (item != Py_None && !r.acked)
			break;
	}
	k->base = NULL;
	PyBuffer_Release(&view);
done:
	PyMem_Free(mds);
	Py_DECREF(fast);
	return out;
}

/* format(v, "#x"), a new reference (NULL: an exception is set). */
static PyObject *hex_of(PyObject *v)
{
	PyObject *spec = PyUnicode_FromString("#x"), *out;

	if (!spec)
		return NULL;
	out = PyObject_Format(v, spec);
	Py_DECREF(spec);
	return out;
}

/* ValueError(f"{head}{addr:#x}") or, with ``mid``, f"{head}{addr:#x}{mid}{lo:#x}..{hi:#x}": the
 * Python loop's words exactly, through Python's own formatting of the numbers. */
static void bad_page(const char *head, PyObject *addr, const char *mid, long long lo, long long hi)
{
	PyObject *a = hex_of(addr), *l = NULL, *h = NULL, *fl = NULL, *fh = NULL, *msg = NULL;

	if (a && mid && (l = PyLong_FromLongLong(lo)) && (h = PyLong_FromLongLong(hi)) && (fl = hex_of(l)) &&
	    (fh = hex_of(h)))
		msg = PyUnicode_FromFormat("%s%U%s%U..%U", head, a, mid, fl, fh);
	else if (a && !mid)
		msg = PyUnicode_FromFormat("%s%U", head, a);
	if (msg) {
		PyErr_SetObject(PyExc_ValueError, msg);
		Py_DECREF(msg);
	}
	Py_XDECREF(a);
	Py_XDECREF(l);
	Py_XDECREF(h);
	Py_XDECREF(fl);
	Py_XDECREF(fh);
}

/* The page at ``off`` (``addr``) just stored: the owner of each monitor armed on its lines woken
 * (ring), counted, and named in ``woken`` with the page's time. */
static int page_woke(Kicker *k, char *base, Py_ssize_t off, long long addr, PyObject *woken, long *count)
{
	int64_t ns = 0;

	for (Py_ssize_t at = 0; at < PAGE_BYTES; at += k->line) {
		char *cb = monitor_owner(k, base, off + at);
		PyObject *t, *r;

		if (!cb)
			continue;
		if (!ns)
			ns = now_ns();
		ring(k, cb);
		(*count)++;
		if (woken == Py_None)
			continue;
		t = Py_BuildValue("(LnL)", addr + at, (cb - base - k->cb_off) / k->cb_size, (long long)ns);
		if (!t)
			return -1;
		r = PyList_CheckExact(woken) ? (PyList_Append(woken, t) < 0 ? NULL : Py_NewRef(Py_None))
					      : PyObject_CallMethod(woken, "append", "(O)", t);
		Py_DECREF(t);
		if (!r)
			return -1;
		Py_DECREF(r);
	}
	return 0;
}

/* One page's (addr, data) stored at ``base``'s emulated memory; its offset there in *off, its
 * address in *addr. Errors as Bus.write_pages raises them (its bounds and length are len(data)'s). */
static int store_page(Kicker *k, char *base, PyObject *item, long long phys_base, Py_ssize_t *off, long long *addr)
{
	PyObject *pair = PySequence_Fast(item, "write_pages takes (addr, data) pairs"), *index, *data;
	Py_buffer page;
	Py_ssize_t items;
	int overflow, got;
	char head[64];

	if (!pair)
		return -1;
	if (PySequence_Fast_GET_SIZE(pair) != 2) {
		PyErr_Format(PyExc_ValueError, "write_pages takes (addr, data) pairs, not %zd values",
			     PySequence_Fast_GET_SIZE(pair));
		Py_DECREF(pair);
		return -1;
	}
	/* our own references: the Python below (__index__, __len__) may empty a list pair */
	index = Py_NewRef(PySequence_Fast_GET_ITEM(pair, 0));
	data = Py_NewRef(PySequence_Fast_GET_ITEM(pair, 1));
	Py_DECREF(pair);
	Py_SETREF(index, PyNumber_Index(index));
	if (!index) {
		Py_DECREF(data);
		return -1;
	}
	*addr = PyLong_AsLongLongAndOverflow(index, &overflow);
	items = PyObject_Size(data);
	got = items >= 0 && PyObject_GetBuffer(data, &page, PyBUF_SIMPLE) == 0;
	Py_DECREF(data);  /* the buffer, when got, holds it */
	if (!got) {
		Py_DECREF(index);
		return -1;
	}
	/* as Bus._check, of len(data) bytes: inside emulated memory (no arithmetic that can overflow first) */
	if (overflow || *addr < phys_base || items == 0 || *addr - phys_base > k->mem_len ||
	    items > k->mem_len - (*addr - phys_base)) {
		snprintf(head, sizeof(head), "bus write of %zd bytes at ", items);
		bad_page(head, index, " is outside emulated memory ", phys_base, phys_base + (long long)k->mem_len);
	} else if (items != PAGE_BYTES || page.len != PAGE_BYTES || (*addr - phys_base) % PAGE_BYTES) {
		snprintf(head, sizeof(head), "write_pages writes whole pages: %zd bytes at ", items);
		bad_page(head, index, NULL, 0, 0);
	} else {
		*off = (Py_ssize_t)(*addr - phys_base);
		memmove(base + k->mem_off + *off, page.buf, PAGE_BYTES);  /* data may be a view of the segment */
	}
	PyBuffer_Release(&page);
	Py_DECREF(index);
	if (PyErr_Occurred())
		return -1;
	FENCE();
	return 0;
}

/*
 * smpd.machine.bus.Bus.write_pages: whole pages, each (addr, data) of ``pages`` (any iterable,
 * read one page at a time: its images may be made as they are asked for) stored, a fence, then
 * each monitor armed on the page's lines woken (ring), named in ``woken`` (None, or anything
 * with append) as (the line's address, the CPU, the page's time after its store). ``phys_base``:
 * emulated memory's first address. Returns how many monitors the pages woke. The Python loop
 * cost ~2 us a page beside its image (a 64-CPU soak trial writes ~1000).
 *
 * Python runs between two pages (the iterator) and inside one (an address's __index__, its
 * data's __len__, an entry's allocation, which may collect garbage): the segment is held, and its address kept,
 * by this call's own Py_buffer and local pointer, never by the Kicker, which a call made from
 * that Python may use too.
 */
static PyObject *Kicker_write_pages(Kicker *k, PyObject *args)
{
	PyObject *pages, *woken = Py_None, *it, *item;
	long long phys_base;
	long count = 0;
	int failed = 0;

	if (!PyArg_ParseTuple(args, "OL|O", &pages, &phys_base, &woken))
		return NULL;
	if (!k->buf) {
		PyErr_SetString(PyExc_RuntimeError, "Kicker is not initialised");
		return NULL;
	}
	if (phys_base < 0 || phys_base > LLONG_MAX - (long long)k->mem_len) {
		PyErr_Format(PyExc_ValueError, "phys_base %lld leaves no room for emulated memory", phys_base);
		return NULL;
	}
	it = PyObject_GetIter(pages);
	if (!it)
		return NULL;
	while (!failed && (item = PyIter_Next(it))) {
		Py_buffer view;
		char *base = acquire(k->buf, &view, k->need);  /* for this page only: Python runs between two */
		Py_ssize_t off;
		long long addr;

		if (base) {
			failed = store_page(k, base, item, phys_base, &off, &addr) < 0 ||
				 page_woke(k, base, off, addr, woken, &count) < 0;
			PyBuffer_Release(&view);
		} else {
			failed = 1;
		}
		Py_DECREF(item);
	}
	Py_DECREF(it);
	if (failed || PyErr_Occurred())
		return NULL;
	return PyLong_FromLong(count);
}

static PyMethodDef Kicker_methods[] = {
	{"write_pages", (PyCFunction)Kicker_write_pages, METH_VARARGS,
	 "write_pages(pages, phys_base, woken=None) -> monitors woken\n\n"
	 "smpd.machine.bus.Bus.write_pages: each (addr, data) whole page of pages stored, a fence, and the\n"
	 "monitors armed on its lines woken (each named in woken as (line address, cpu, ns))."},
	{"kick_one", (PyCFunction)Kicker_kick_one, METH_VARARGS,
	 "kick_one(md_off, kexec_hlt, delay_ns, rounds) -> (acknowledged, rounds, t_first_ns, t_ack_ns)\n\n"
	 "smp_kick_mwait_play_dead() for one CPU whose mwait_cpu_dead sits at md_off in emulated\n"
	 "memory: write control = kexec_hlt through the bus, udelay(delay), at most rounds times,\n"
	 "until status says so. t_ack_ns is 0 when the CPU never answered."},
	{"kick_each", (PyCFunction)Kicker_kick_each, METH_VARARGS,
	 "kick_each(md_offs, kexec_hlt, waiting, delay_ns, rounds) -> [kick_one's tuple, or None]\n\n"
	 "kick_one() of each mwait_cpu_dead in turn whose status is `waiting` at its turn (None for\n"
	 "the others), without returning to Python between two; the list ends after the first CPU\n"
	 "that did not answer."},
	{NULL},
};

static PyTypeObject KickerType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "smpd._hotpath.Kicker",
	.tp_doc = "Kicker(buf, mem_off, mem_len, dir_off, cb_off, cb_size, cb_write, cb_sleeping, cb_pid, "
		  "ncpus, doorbell): the coordinator's kick over the segment",
	.tp_basicsize = sizeof(Kicker),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Kicker_init,
	.tp_dealloc = (destructor)Kicker_dealloc,
	.tp_methods = Kicker_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "smpd._hotpath",
	"The kick's hot paths (the CPU's watch loop and acknowledgement, the coordinator's kick loop) "
	"in C. See smpd.hotpath.", -1, NULL,
};

PyMODINIT_FUNC PyInit__hotpath(void)
{
	PyObject *m;

	if (PyType_Ready(&AckType) < 0 || PyType_Ready(&InitType) < 0 || PyType_Ready(&WaiterType) < 0 || PyType_Ready(&KickerType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddIntConstant(m, "WOKE", WOKE) || PyModule_AddIntConstant(m, "TIMEOUT", TIMEOUT) ||
	    PyModule_AddIntConstant(m, "SIGNAL", SIGNAL) || PyModule_AddIntConstant(m, "PAGE_BYTES", PAGE_BYTES) ||
	    PyModule_AddType(m, &AckType) || PyModule_AddType(m, &InitType) || PyModule_AddType(m, &WaiterType) || PyModule_AddType(m, &KickerType)) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
