/*
 * The physical floor of a kick: one cache line's round trip between two host cores.
 *
 * Thread A (on CORE_A) stores i into `ping` and spins until `pong` says i; thread B
 * (on CORE_B) spins until `ping` says i and stores it into `pong`. Each line sits
 * alone on its own 64-byte cache line, so every round trip moves exactly two lines
 * between the cores: what a kick (control write, status acknowledgement) costs the
 * hardware when nothing else is in the way.
 *
 * usage: hwfloor CORE_A CORE_B ITERATIONS    (prints p50, p99 and min in ns)
 * smpd builds and runs it on the fly (smpd/tools/hwfloor.py) when a C compiler exists.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct line {
	_Alignas(64) atomic_long v;
};

static struct line ping, pong;
static long iters;

static void pin(int core)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(core, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static long now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *responder(void *arg)
{
	pin(*(int *)arg);
	for (long i = 1; i <= iters; i++) {
		while (atomic_load_explicit(&ping.v, memory_order_acquire) != i)
			;
		atomic_store_explicit(&pong.v, i, memory_order_release);
	}
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;

	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	pthread_t t;
	long *rtt;
	int a, b;

	if (argc != 4) {
		fprintf(stderr, "usage: %s CORE_A CORE_B ITERATIONS\n", argv[0]);
		return 2;
	}
	a = atoi(argv[1]);
	b = atoi(argv[2]);
	iters = atol(argv[3]);
	if (iters < 1 || !(rtt = malloc(iters * sizeof(*rtt))))
		return 2;
	pthread_create(&t, NULL, responder, &b);
	pin(a);
	for (long i = 1; i <= iters; i++) {
		long t0 = now_ns();

		atomic_store_explicit(&ping.v, i, memory_order_release);
		while (atomic_load_explicit(&pong.v, memory_order_acquire) != i)
			;
		rtt[i - 1] = now_ns() - t0;
	}
	pthread_join(t, NULL);
	qsort(rtt, iters, sizeof(*rtt), cmp);
	printf("rtt_ns_p50 %ld\nrtt_ns_p99 %ld\nrtt_ns_min %ld\n", rtt[iters / 2], rtt[iters * 99 / 100], rtt[0]);
	return 0;
}
