/*
 * Guest-side micro-benchmark: the per-call cost, in nanoseconds, of the
 * kernel paths a live update of their functions redirects.
 *
 * Usage: /path/to/overhead LABEL [ROUNDS [ROUND_MS]]
 *
 * For each row (fork, brk, execve, open, read, write, pagefault, kill) the
 * iteration count is doubled until one round takes ROUND_MS (default 100),
 * then ROUNDS rounds (default 7) are timed and one line is printed:
 *
 *     overhead LABEL ROW median_ns MEDIAN min_ns MIN max_ns MAX iterations N rounds R
 *
 * Rows:
 *   fork       fork(), the child _exits, the parent waits (kernel_clone)
 *   brk        brk(0), which only reports the current break
 *   execve     one execve of this static binary, which execs itself again
 *              (a chain of N; each link does nothing but the next execve)
 *   open       open() and close() of a file in /tmp
 *   read       read() of 1 byte from /dev/zero
 *   write      write() of 1 byte to /dev/null
 *   pagefault  the first write to a page of fresh anonymous memory
 *   kill       kill(getpid(), 0): permission check, no signal sent
 *
 * Exits 1 if a call fails.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ROUNDS 64
#define SCRATCH_FILE "/tmp/overhead-open"
/* Most pages one page-fault round touches (64 MiB of the guest's memory). */
#define MAX_FAULT_PAGES (1L << 14)

static const char *self_path;

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void run_fork(long n)
{
	for (long i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0)
			_exit(0);
		if (waitpid(pid, NULL, 0) != pid)
			die("waitpid");
	}
}

static void run_brk(long n)
{
	for (long i = 0; i < n; i++)
		if (syscall(SYS_brk, 0) == -1)
			die("brk");
}

/*
 * A child runs the chain of n execs; the last link exits 0. The fork and
 * wait around it are one per round, not per call.
 */
static void run_execve(long n)
{
	char count[32];
	pid_t pid;
	int status;

	snprintf(count, sizeof(count), "%ld", n);
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		execl(self_path, self_path, "--exec-chain", count, (char *)NULL);
		_exit(127);
	}
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "overhead: exec chain failed (status %#x)\n", status);
		exit(1);
	}
}

static void exec_chain(long remaining)
{
	char count[32];

	if (remaining <= 1)
		_exit(0);
	snprintf(count, sizeof(count), "%ld", remaining - 1);
	execl(self_path, self_path, "--exec-chain", count, (char *)NULL);
	_exit(127);
}

static void run_open(long n)
{
	for (long i = 0; i < n; i++) {
		int fd = open(SCRATCH_FILE, O_RDONLY);

		if (fd < 0)
			die("open");
		close(fd);
	}
}

static int zero_fd, null_fd;

static void run_read(long n)
{
	char byte;

	for (long i = 0; i < n; i++)
		if (read(zero_fd, &byte, 1) != 1)
			die("read");
}

static void run_write(long n)
{
	char byte = 'x';

	for (long i = 0; i < n; i++)
		if (write(null_fd, &byte, 1) != 1)
			die("write");
}

static char *fault_area;
static long page_size;

/* Untimed: give the pages back so the next round faults on every one. */
static void reset_faults(void)
{
	if (madvise(fault_area, MAX_FAULT_PAGES * page_size, MADV_DONTNEED))
		die("madvise");
}

static void run_pagefault(long n)
{
	for (long i = 0; i < n; i++)
		fault_area[i * page_size] = 1;
}

static void run_kill(long n)
{
	pid_t self = getpid();

	for (long i = 0; i < n; i++)
		if (kill(self, 0))
			die("kill");
}

struct row {
	const char *name;
	void (*run)(long n);
	void (*reset)(void); /* untimed, before every round; may be NULL */
	long max_iterations;
};

static const struct row rows[] = {
	{ "fork", run_fork, NULL, 1L << 20 },
	{ "brk", run_brk, NULL, 1L << 30 },
	{ "execve", run_execve, NULL, 1L << 20 },
	{ "open", run_open, NULL, 1L << 30 },
	{ "read", run_read, NULL, 1L << 30 },
	{ "write", run_write, NULL, 1L << 30 },
	{ "pagefault", run_pagefault, reset_faults, MAX_FAULT_PAGES },
	{ "kill", run_kill, NULL, 1L << 30 },
};

static uint64_t timed_round(const struct row *row, long n)
{
	uint64_t start;

	if (row->reset)
		row->reset();
	start = now_ns();
	row->run(n);
	return now_ns() - start;
}

static int compare_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static void measure(const char *label, const struct row *row, int rounds, uint64_t round_ns)
{
	double per_call[MAX_ROUNDS];
	long n = 1;

	/* One untimed round first: page cache, dentries and the binary are warm. */
	timed_round(row, 1);
	while (n < row->max_iterations && timed_round(row, n) < round_ns)
		n *= 2;
	for (int r = 0; r < rounds; r++)
		per_call[r] = (double)timed_round(row, n) / (double)n;
	qsort(per_call, rounds, sizeof(per_call[0]), compare_double);
	printf("overhead %s %s median_ns %.1f min_ns %.1f max_ns %.1f iterations %ld rounds %d\n",
	       label, row->name, per_call[rounds / 2], per_call[0], per_call[rounds - 1], n, rounds);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	int rounds = 7;
	long round_ms = 100;
	int fd;

	self_path = argv[0];
	if (argc == 3 && strcmp(argv[1], "--exec-chain") == 0)
		exec_chain(atol(argv[2]));
	if (argc < 2 || argc > 4) {
		fprintf(stderr, "usage: overhead LABEL [ROUNDS [ROUND_MS]]\n");
		return 1;
	}
	if (argc > 2)
		rounds = atoi(argv[2]);
	if (argc > 3)
		round_ms = atol(argv[3]);
	if (rounds < 1 || rounds > MAX_ROUNDS || round_ms < 1) {
		fprintf(stderr, "overhead: ROUNDS must be 1..%d and ROUND_MS positive\n", MAX_ROUNDS);
		return 1;
	}

	if (!strchr(self_path, '/')) {
		fprintf(stderr, "overhead: run it by its path, which the execve row executes\n");
		return 1;
	}
	fd = open(SCRATCH_FILE, O_CREAT | O_WRONLY | O_TRUNC, 0644);
	if (fd < 0 || write(fd, "x", 1) != 1 || close(fd))
		die(SCRATCH_FILE);
	zero_fd = open("/dev/zero", O_RDONLY);
	null_fd = open("/dev/null", O_WRONLY);
	if (zero_fd < 0 || null_fd < 0)
		die("/dev/zero or /dev/null");
	page_size = sysconf(_SC_PAGESIZE);
	fault_area = mmap(NULL, MAX_FAULT_PAGES * page_size, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (fault_area == MAP_FAILED)
		die("mmap");
	/* No transparent huge pages: every iteration is one 4 KiB fault. */
	madvise(fault_area, MAX_FAULT_PAGES * page_size, MADV_NOHUGEPAGE);

	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
		measure(argv[1], &rows[i], rounds, (uint64_t)round_ms * 1000000u);
	return 0;
}
