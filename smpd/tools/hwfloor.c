/*
 * The physical floors of a kick, measured on this host in the same run.
 *
 * hwfloor CORE_A CORE_B ITERATIONS — the host's coherence floor: one round trip between two
 * cores. Thread A (on CORE_A) stores i into `ping` and spins until `pong` says i; thread B
 * (on CORE_B) spins until `ping` says i and stores it into `pong`. Each sits alone on its own
 * 64-byte line: two line transfers a round trip, about what a kick costs the coherence fabric;
 * not what real MWAIT adds, the exit from the C-state mwait_play_dead() asked for. The same
 * ping-pong is also run on the two words of one line (`one`: control and status, as in one
 * struct mwait_cpu_dead, the kick's own layout), alternated with the first in batches of at
 * most BATCH_MAX rounds (at least BATCHES of each) so both see the same host: printed as
 * line1_ns_*. With BUDGET_MS (hwfloor CORE_A CORE_B ITERATIONS BUDGET_MS), it stops at the
 * first end of a pair of batches past that budget: on a loaded host, where two pinned threads
 * wait for each other to be scheduled, 200,000 rounds took 31 s. It prints `rounds` (of each
 * layout) and `budget_cut 1` when it stopped early.
 *
 * hwfloor wake CORE_A CORE_B ITERATIONS — the same round trip to a *sleeping* process:
 * process A (on CORE_A) stores i into `ping` (a shared page), sends SIGURG to process B
 * (on CORE_B), which sleeps in sigwaitinfo(), and spins until B's `pong` says i. B wakes,
 * reads ping, stores pong and sleeps again; A waits 300 us before the next round, so B is
 * asleep and its core idle, as for a long-parked CPU. What smpd's adaptive watch adds to a
 * kick of a sleeping CPU (smpd.machine.bus rings the CPU's doorbell, SIGURG, and the kicker
 * spins on its status): a reference, not a bound (a core not idle yet wakes faster).
 *
 * hwfloor wakeseq CORE|any N ITERATIONS [PAUSE_US] — a whole kick's floor: N sleeping processes
 * woken one after the other, as smp_kick_mwait_play_dead() kicks N parked CPUs. For each k in
 * turn, process A stores i into sleeper k's `ping`, sends it SIGURG and polls its `pong`,
 * yielding its core between looks (sched_yield(), as smpd's kicker does for a sleeping CPU),
 * until it says i; sleeper k wakes in sigwaitinfo(), stores pong and sleeps again. All of them on
 * CORE: each wake-up a hand-off on one host core (on a VM one on the other, idle vCPU costs
 * several times more). CORE `any` pins nothing: the host's scheduler places each one, as it
 * places the processes of a machine brought up with the default `--pin none` (a reference for
 * such a machine, not a bound: where they land decides). A waits PAUSE_US (default
 * 2000) between rounds, the sleepers asleep all that time: 2 ms is about a kick right after a
 * reset, longer pauses cost more here (colder caches). Prints the whole round's time.
 *
 * Each prints p50, p99 and min in ns. smpd builds and runs it on the fly
 * (smpd/tools/hwfloor.py) when a C compiler exists.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct line {
	_Alignas(64) atomic_long v;
};

static struct line ping, pong;
static struct {
	_Alignas(64) atomic_long control;
	atomic_long status;
} one;  /* the same ping-pong on one line's two words: struct mwait_cpu_dead's layout */
static long iters;

#define BATCHES 10  /* at least this many of each layout, alternated: two lines, one line, two lines... */
#define BATCH_MAX 1000  /* rounds of one layout in a batch: a budget's cut comes at most 2 * BATCH_MAX rounds late */
static long batch;  /* rounds of one layout in a batch (iters is a multiple of it) */
static long budget_ns;  /* line_floor() stops at the end of a pair of batches past this (0: never) */

/* Does round i of line_floor() (1 .. 2 * iters) play on the one line, by its batch? */
static int in_one_line(long i)
{
	return (i - 1) / batch % 2;
}

static atomic_long *ping_of(long i)
{
	return in_one_line(i) ? &one.control : &ping.v;
}

static atomic_long *pong_of(long i)
{
	return in_one_line(i) ? &one.status : &pong.v;
}

static void pin(int core)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(core, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/* A forked child of ours never outlives its parent (a killed measurement leaves no sleeper). */
static void die_with(pid_t parent)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(0);
}

static long now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* B's side: for each round, spin until its ping says i, then pong; a negative ping (line_floor() cut
 * by its budget) ends it. The sign is looked at only on a mismatch, in a register: no more loads. */
static void *responder(void *arg)
{
	pin(*(int *)arg);
	for (long i = 1; i <= 2 * iters; i++) {
		atomic_long *p = ping_of(i), *q = pong_of(i);
		long v;

		while ((v = atomic_load_explicit(p, memory_order_acquire)) != i)
			if (v < 0)
				return NULL;
		atomic_store_explicit(q, i, memory_order_release);
	}
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;

	return (x > y) - (x < y);
}

static void report_as(const char *name, long *rtt, long n)
{
	qsort(rtt, n, sizeof(*rtt), cmp);
	printf("%s_p50 %ld\n%s_p99 %ld\n%s_min %ld\n", name, rtt[n / 2], name, rtt[n * 99 / 100], name, rtt[0]);
}

/* Two lines into rtt[], one line into rtt1[]: iters rounds each, or fewer when the budget cuts it
 * (*done: the rounds of each). */
static int line_floor(int a, int b, long *rtt, long *rtt1, long *done)
{
	pthread_t t;
	long start = now_ns(), two = 0, on1 = 0;

	if (pthread_create(&t, NULL, responder, &b)) {  /* (a process limit): nobody would answer */
		fprintf(stderr, "could not start the responder thread\n");
		return 2;
	}
	pin(a);
	for (long i = 1; i <= 2 * iters; i++) {
		atomic_long *p = ping_of(i), *q = pong_of(i);
		long t0 = now_ns();

		atomic_store_explicit(p, i, memory_order_release);
		while (atomic_load_explicit(q, memory_order_acquire) != i)
			;
		if (in_one_line(i))
			rtt1[on1++] = now_ns() - t0;
		else
			rtt[two++] = now_ns() - t0;
		/* Past the budget at the end of a pair of batches (both layouts as many rounds): stop
		 * the responder, which waits for round i + 1's ping, and stop. */
		if (budget_ns && i % (2 * batch) == 0 && i < 2 * iters && now_ns() - start > budget_ns) {
			atomic_store_explicit(ping_of(i + 1), -1, memory_order_release);
			break;
		}
	}
	pthread_join(t, NULL);
	*done = two;  /* == on1 */
	return 0;
}

static void pause_us(long us)
{
	long end = now_ns() + us * 1000;

	while (now_ns() < end)
		;
}

/* SIGURG blocked in this process (and so in its children): it waits for sigwaitinfo(). */
static void block_urg(sigset_t *urg)
{
	sigemptyset(urg);
	sigaddset(urg, SIGURG);
	sigprocmask(SIG_BLOCK, urg, NULL);
}

struct slot {
	_Alignas(64) atomic_long ping;
	_Alignas(64) atomic_long pong;
};

/* A forked sleeper: for each round i, asleep in sigwaitinfo() until `ping` says i, then `pong`. */
static void sleeper(struct slot *me, const sigset_t *urg, pid_t parent)
{
	die_with(parent);
	for (long i = 1; i <= iters; i++) {
		siginfo_t si;

		while (atomic_load_explicit(&me->ping, memory_order_acquire) != i)
			sigwaitinfo(urg, &si);
		atomic_store_explicit(&me->pong, i, memory_order_release);
	}
	_exit(0);
}

/* Has the sleeper ended (killed by someone, the OOM killer) without storing `pong` = i? Asked every
 * 2^16 looks of a poll for its `pong`, so that a floor with one sleeper gone fails at once instead of
 * polling until the caller's timeout (smpd.tools.hwfloor). A sleeper reaped here, whatever it had
 * stored (it may have answered its last round and exited between our look and waitpid()), is
 * forgotten: *child = 0, its pid no longer ours to signal or wait for; so is one the kernel reaped
 * for us (ECHILD: SIGCHLD inherited as ignored). `pong` is read again after the reap. */
static int gone(pid_t *child, unsigned long looks, atomic_long *pong, long i)
{
	pid_t pid = *child, r;

	if ((looks & 0xFFFF) || pid <= 0)
		return 0;
	r = waitpid(pid, NULL, WNOHANG);
	if (r != pid && !(r < 0 && errno == ECHILD))
		return 0;
	*child = 0;
	if (atomic_load_explicit(pong, memory_order_acquire) == i)
		return 0;
	fprintf(stderr, "sleeper %d ended before it answered\n", (int)pid);
	return 1;
}

static int wake_floor(int a, int b, long *rtt)
{
	struct slot *shared = mmap(NULL, sizeof(struct slot), PROT_READ | PROT_WRITE,
				   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	sigset_t urg;
	pid_t child, parent = getpid();
	int status;

	if (shared == MAP_FAILED)
		return 2;
	block_urg(&urg);
	child = fork();
	if (child < 0)
		return 2;
	if (child == 0) {
		pin(b);
		sleeper(shared, &urg, parent);
	}
	pin(a);
	for (long i = 1; i <= iters; i++) {
		long t0;

		pause_us(300);	/* B is back in sigwaitinfo(): asleep, as a parked CPU is */
		t0 = now_ns();
		atomic_store_explicit(&shared->ping, i, memory_order_release);
		if (child > 0)  /* never kill() 0 or -1 */
			kill(child, SIGURG);
		for (unsigned long looks = 1; atomic_load_explicit(&shared->pong, memory_order_acquire) != i; looks++)
			if (gone(&child, looks, &shared->pong, i))
				return 2;
		rtt[i - 1] = now_ns() - t0;
	}
	if (child > 0)  /* not reaped by gone() already */
		waitpid(child, &status, 0);
	return 0;
}

static int wake_sequence(long n, long pause, long *rtt)
{
	struct slot *slots = mmap(NULL, n * sizeof(struct slot), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	pid_t *child = calloc(n, sizeof(*child));
	sigset_t urg;
	pid_t parent = getpid();
	int rc = 0;

	if (slots == MAP_FAILED || !child)
		return 2;
	block_urg(&urg);
	for (long k = 0; k < n; k++) {
		child[k] = fork();
		if (child[k] < 0) {
			rc = 2;
			n = k;
			break;
		}
		if (child[k] == 0)
			sleeper(&slots[k], &urg, parent);
	}
	for (long i = 1; i <= iters && !rc; i++) {
		long t0;

		pause_us(pause);	/* every sleeper back in sigwaitinfo(), and asleep for a while */
		t0 = now_ns();
		for (long k = 0; k < n; k++) {
			atomic_store_explicit(&slots[k].ping, i, memory_order_release);
			if (child[k] > 0)
				kill(child[k], SIGURG);
			for (unsigned long looks = 1; !rc && atomic_load_explicit(&slots[k].pong, memory_order_acquire) != i; looks++) {
				if (gone(&child[k], looks, &slots[k].pong, i))
					rc = 2;
				sched_yield();
			}
		}
		rtt[i - 1] = now_ns() - t0;
	}
	for (long k = 0; k < n; k++) {
		if (child[k] <= 0)  /* reaped already; never kill() 0 or -1 */
			continue;
		if (rc)
			kill(child[k], SIGKILL);
		waitpid(child[k], NULL, 0);
	}
	return rc;
}

int main(int argc, char **argv)
{
	int wake = argc == 5 && !strcmp(argv[1], "wake");
	int seq = (argc == 5 || argc == 6) && !strcmp(argv[1], "wakeseq");
	int line = !wake && !seq && (argc == 4 || argc == 5);
	long *rtt, *rtt1, n = 0, pause = 2000, done = 0;
	int a, b = 0, rc;

	if (!line && !wake && !seq) {
		fprintf(stderr, "usage: %s CORE_A CORE_B ITERATIONS [BUDGET_MS] | %s wake CORE_A CORE_B ITERATIONS | "
			"%s wakeseq CORE|any N ITERATIONS [PAUSE_US]\n", argv[0], argv[0], argv[0]);
		return 2;
	}
	if (seq) {
		a = strcmp(argv[2], "any") ? atoi(argv[2]) : -1;  /* -1: not pinned */
		n = atol(argv[3]);
		iters = atol(argv[4]);
		if (argc == 6)
			pause = atol(argv[5]);
		if (n < 1 || pause < 0)
			return 2;
	} else {
		a = atoi(argv[1 + wake]);
		b = atoi(argv[2 + wake]);
		iters = atol(argv[3 + wake]);
		if (line && argc == 5 && (budget_ns = atol(argv[4]) * 1000000L) <= 0)
			return 2;
	}
	if (line && iters > 0) {  /* whole batches of each layout */
		batch = (iters + BATCHES - 1) / BATCHES;
		if (batch > BATCH_MAX)
			batch = BATCH_MAX;
		iters = (iters + batch - 1) / batch * batch;
	}
	if (iters < 1 || !(rtt = malloc(iters * sizeof(*rtt))) || !(rtt1 = malloc(iters * sizeof(*rtt1))))
		return 2;
	if (seq) {
		if (a >= 0)
			pin(a);  /* the sleepers inherit it */
		rc = wake_sequence(n, pause, rtt);
	} else {
		rc = wake ? wake_floor(a, b, rtt) : line_floor(a, b, rtt, rtt1, &done);
	}
	if (rc)
		return rc;
	report_as("rtt_ns", rtt, line ? done : iters);
	if (line) {
		report_as("line1_ns", rtt1, done);
		printf("rounds %ld\n", done);
		if (done < iters)
			printf("budget_cut 1\n");
	}
	return 0;
}
