/*
 * smpd.daemon._forkloop: the template's fork loop (smpd.daemon.template), compiled.
 *
 * The template forks every CPU process of a bring-up. Its Python loop paid, per CPU, for the
 * interpreter between two forks: the loop's objects (a pipe's descriptors, ctypes' call
 * machinery around clone, the answer packed and sent) are in pages each fork had just shared
 * with the child, so the template copied them again after every fork (~45 page faults), and the
 * child copied them once more on its way out of ctypes. This loop runs the same steps in C, and
 * returns to Python only in a child, and in the template once every CPU of the request is forked:
 *
 *   fork_cpus(sock, plan, parent, comm) for each (cpu, core) int32 pair of ``plan``: a pipe;
 *       clone with CLONE_PARENT (the child is the coordinator's, ``parent``:
 *       smpd.host.proc.fork_sibling), the child dying with it (PR_SET_PDEATHSIG, and at once if
 *       its parent is another already: smpd.host.proc.die_with_parent) and named ``comm`` and
 *       its CPU's number (PR_SET_NAME: smpd.host.proc.set_process_name); the answer
 *       (cpu, pid) on ``sock``, or (cpu, -errno) when the host refused the fork or its pipe, which
 *       ends the loop (the coordinator gives up the batch: forking on would only leave it
 *       children it was never told of); then one byte
 *       down the pipe, which the child waits for: a child whose answer never left (the send
 *       failed) reads EOF and exits at once, so every CPU process that runs is one the coordinator
 *       was told of. The child then closes every descriptor it inherited but 0-2: a CPU needs
 *       none, its memory is the inherited mapping (close_descriptors), and makes the calls
 *       ``starts`` (an optional dict) names for its CPU, if any: its first wait, among them
 *       (start_cpu). Returns (cpu, core), or (cpu, core, what the last call returned), in the
 *       child, None in the template; raises OSError when the answer cannot be sent (the
 *       coordinator is gone).
 *
 * The interpreter's fork hooks run around the clone (PyOS_BeforeFork, PyOS_AfterFork_Parent /
 * _Child) with the GIL held, as in os.fork(); for a single-threaded caller only, like
 * fork_sibling: glibc's own fork handlers do not run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CLONE_PARENT_FLAG 0x00008000

static int answer(int sock, int32_t cpu, int32_t pid_or_err)
{
	int32_t pair[2] = {cpu, pid_or_err};
	ssize_t n;

	do
		n = send(sock, pair, sizeof pair, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)sizeof pair ? 0 : -1;
}

static void close_keep_errno(int fd)
{
	int saved = errno;

	close(fd);
	errno = saved;
}

/* In the child: wait until the template says the answer left; exit at once if it never does. */
static void await_told(int told)
{
	char c;
	ssize_t n;

	do
		n = read(told, &c, 1);
	while (n < 0 && errno == EINTR);
	close(told);
	if (n != 1)
		_exit(0);
}

/* In the child: the process facts every process of ours sets on itself (smpd.host.proc). */
static void become_cpu(pid_t parent, const char *comm, int32_t cpu)
{
	char name[16];

	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (getppid() != parent)  /* it died before the prctl: nothing would kill us */
		_exit(1);
	snprintf(name, sizeof name, "%s%d", comm, (int)cpu);
	prctl(PR_SET_NAME, name, 0, 0, 0);
}

/*
 * In the child: close every descriptor from 3 up (the template's socket, the segment's own
 * descriptor: a CPU never resizes or closes its mapping), in one system call where the kernel
 * has close_range (5.9); os.closerange() in cpu_main did the same from Python, ~20 copy-on-write
 * page faults of the interpreter's in each CPU process just forked.
 */
static void close_descriptors(void)
{
	long max;

#ifdef SYS_close_range
	if (syscall(SYS_close_range, 3U, ~0U, 0U) == 0)
		return;
#endif
	max = sysconf(_SC_OPEN_MAX);
	for (long fd = 3; fd < (max > 0 && max < INT_MAX ? max : 1024); fd++)
		close((int)fd);
}

/*
 * In the child: (cpu, core), or, when ``starts`` names calls for ``cpu`` (CpuCore.first_wait_calls:
 * its host core, its interrupt signals owned, its first wait), (cpu, core, what the last returned),
 * each call made in order from here. They are calls into C alone, so no Python runs in the CPU
 * process until its first wait returns: on a bring-up, not before its first wake-up that needs it
 * (~40 copy-on-write page faults of the interpreter's fewer in each). NULL when a call raised (it
 * is printed; a SystemExit too, which PyErr_Print would have acted on: the caller exits at once).
 */
static void say_error(void)
{
	if (PyErr_ExceptionMatches(PyExc_SystemExit)) {  /* PyErr_Print would end the interpreter as the template's */
		PyErr_Clear();
		fputs("smpd: SystemExit in a CPU process's start\n", stderr);
		return;
	}
	PyErr_Print();
}

static PyObject *start_cpu(PyObject *starts, int32_t cpu, int32_t core)
{
	PyObject *key, *calls, *last = NULL;

	if (!starts)
		return Py_BuildValue("(ii)", (int)cpu, (int)core);
	key = PyLong_FromLong(cpu);
	calls = key ? PyDict_GetItemWithError(starts, key) : NULL;
	Py_XDECREF(key);
	if (!calls || !PyTuple_Check(calls) || PyTuple_GET_SIZE(calls) == 0) {
		if (PyErr_Occurred())
			say_error();
		return Py_BuildValue("(ii)", (int)cpu, (int)core);
	}
	Py_INCREF(calls);  /* held: a signal handler runs Python in the calls */
	for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(calls); k++) {
		Py_XDECREF(last);
		last = PyObject_CallNoArgs(PyTuple_GET_ITEM(calls, k));
		if (!last) {
			say_error();
			Py_DECREF(calls);
			return NULL;
		}
	}
	Py_DECREF(calls);
	return Py_BuildValue("(iiN)", (int)cpu, (int)core, last);
}

static PyObject *fork_cpus(PyObject *mod, PyObject *args)
{
	int sock, parent;
	const char *comm;
	Py_buffer plan;
	Py_ssize_t i, n;

	PyObject *starts = NULL;

	if (!PyArg_ParseTuple(args, "iy*is|O!:fork_cpus", &sock, &plan, &parent, &comm, &PyDict_Type, &starts))
		return NULL;
	if (plan.len % (2 * sizeof(int32_t))) {
		PyBuffer_Release(&plan);
		PyErr_SetString(PyExc_ValueError, "fork_cpus: the plan is (cpu, core) int32 pairs");
		return NULL;
	}
	n = plan.len / (2 * sizeof(int32_t));
	for (i = 0; i < n; i++) {
		int32_t cpu, core;
		int told[2];
		long pid;

		memcpy(&cpu, (char *)plan.buf + i * 8, 4);
		memcpy(&core, (char *)plan.buf + i * 8 + 4, 4);
		if (pipe2(told, O_CLOEXEC) < 0) {
			if (answer(sock, cpu, -errno) < 0)
				goto gone;
			break;  /* refused: the coordinator gives up the batch (smpd.daemon.template) */
		}
		PyOS_BeforeFork();
		pid = syscall(SYS_clone, (unsigned long)(CLONE_PARENT_FLAG | SIGCHLD), 0UL, 0UL, 0UL, 0UL);
		if (pid == 0) {
			PyOS_AfterFork_Child();
			become_cpu((pid_t)parent, comm, cpu);
			close(told[1]);
			await_told(told[0]);
			close_descriptors();
			PyObject *which = start_cpu(starts, cpu, core);

			if (!which)  /* a CPU process must never go on as the template */
				_exit(70);
			PyBuffer_Release(&plan);
			return which;
		}
		{
			int err = errno;

			PyOS_AfterFork_Parent();
			close(told[0]);
			if (pid < 0) {
				close(told[1]);
				if (answer(sock, cpu, -err) < 0)
					goto gone;
				break;
			}
		}
		if (answer(sock, cpu, (int32_t)pid) < 0) {
			close_keep_errno(told[1]);  /* the child reads EOF and exits */
			goto gone;
		}
		if (write(told[1], "!", 1) != 1) {
			/* EPIPE: the child died already (killed, or its parent was not ours); it is answered */
		}
		close(told[1]);
	}
	PyBuffer_Release(&plan);
	Py_RETURN_NONE;
gone:
	PyBuffer_Release(&plan);
	return PyErr_SetFromErrno(PyExc_OSError);
}

static PyMethodDef methods[] = {
	{"fork_cpus", fork_cpus, METH_VARARGS,
	 "fork_cpus(sock, plan, parent, comm[, starts]): fork a CPU process for each (cpu, core) int32 pair of "
	 "plan, a child of parent named comm and its number, answering (cpu, pid) on socket fd sock; (cpu, core) "
	 "in each child, or (cpu, core, result) where starts (a dict) names a tuple of calls for cpu, made in the "
	 "child in order (result: the last's); None here once all are forked."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "smpd.daemon._forkloop",
	"The template's fork loop in C. See smpd.daemon.template.", -1, methods,
};

PyMODINIT_FUNC PyInit__forkloop(void)
{
	return PyModule_Create(&module);
}
