/*
 * Guest-side writer held mid-way through one large pipe write.
 *
 * Usage: pipe-short-write
 *
 * Forks a reader that keeps the read end of a pipe open but never reads,
 * then writes 1 MiB to the pipe in a single write(). The pipe holds 64 KiB,
 * so the writer sleeps (interruptibly) in pipe_write until something wakes
 * it: a reader, or a signal. When write() returns it prints
 *
 *     pipe-short-write: wrote N bytes in S.S s
 *
 * (or the errno of a failed write) and exits 0 if it wrote anything.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WRITE_SIZE (1 << 20)

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(void)
{
	static char buf[WRITE_SIZE];
	int fds[2];
	pid_t reader;
	double start;
	ssize_t n;
	int saved;

	if (pipe(fds) != 0) {
		perror("pipe-short-write: pipe");
		return 1;
	}
	reader = fork();
	if (reader < 0) {
		perror("pipe-short-write: fork");
		return 1;
	}
	if (reader == 0) {
		close(fds[1]);
		for (;;)
			pause();
	}
	close(fds[0]);
	memset(buf, 'x', sizeof(buf));

	start = now();
	n = write(fds[1], buf, sizeof(buf));
	saved = errno;
	if (n < 0)
		printf("pipe-short-write: write failed: %s after %.1f s\n",
		       strerror(saved), now() - start);
	else
		printf("pipe-short-write: wrote %zd bytes in %.1f s\n", n,
		       now() - start);
	fflush(stdout);

	kill(reader, SIGKILL);
	waitpid(reader, NULL, 0);
	return n > 0 ? 0 : 1;
}
