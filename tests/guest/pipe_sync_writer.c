/*
 * Guest-side writer for synchronized updates of pipe_write.
 *
 * Usage: pipe-sync-writer NAME GO_FILE
 *
 * Forks a reader that waits (outside the pipe code) until GO_FILE exists,
 * then reads the pipe to its end and checksums what it read. The parent
 * writes 1 MiB of a known pattern in one write(): with the default 64 KiB
 * ring and no reader yet, it sleeps in pipe_write. When write() returns it
 * prints
 *
 *     NAME: wrote N bytes in S.S s, pipe size P
 *
 * (P from F_GETPIPE_SZ), closes its end and waits for the reader, which
 * prints
 *
 *     NAME: reader read N bytes, checksum ok (or MISMATCH)
 *
 * Exits 0 when the whole megabyte was written and read back intact.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

static unsigned char pattern(size_t i)
{
	return (unsigned char)((i * 2654435761u) >> 13);
}

static uint64_t checksum(const unsigned char *p, size_t n, uint64_t h)
{
	size_t i;

	for (i = 0; i < n; i++)
		h = (h ^ p[i]) * 1099511628211ull;
	return h;
}

static int reader(const char *name, int fd, const char *go)
{
	static unsigned char buf[65536];
	struct stat st;
	uint64_t h = 14695981039346656037ull;
	size_t total = 0;
	ssize_t n;

	while (stat(go, &st) != 0)
		usleep(50000);
	while ((n = read(fd, buf, sizeof(buf))) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			printf("%s: reader: read failed: %s\n", name, strerror(errno));
			return 1;
		}
		h = checksum(buf, n, h);
		total += n;
	}
	{
		static unsigned char expected[WRITE_SIZE];
		uint64_t want = 14695981039346656037ull;
		size_t i;

		for (i = 0; i < WRITE_SIZE; i++)
			expected[i] = pattern(i);
		want = checksum(expected, WRITE_SIZE, want);
		printf("%s: reader read %zu bytes, checksum %s\n", name, total,
		       total == WRITE_SIZE && h == want ? "ok" : "MISMATCH");
		fflush(stdout);
		return total == WRITE_SIZE && h == want ? 0 : 1;
	}
}

int main(int argc, char **argv)
{
	static unsigned char buf[WRITE_SIZE];
	int fds[2], status;
	pid_t child;
	double start;
	ssize_t n;
	size_t i;

	if (argc != 3) {
		fprintf(stderr, "usage: pipe-sync-writer NAME GO_FILE\n");
		return 2;
	}
	if (pipe(fds) != 0) {
		perror("pipe");
		return 1;
	}
	child = fork();
	if (child < 0) {
		perror("fork");
		return 1;
	}
	if (child == 0) {
		close(fds[1]);
		return reader(argv[1], fds[0], argv[2]);
	}
	close(fds[0]);
	for (i = 0; i < WRITE_SIZE; i++)
		buf[i] = pattern(i);

	start = now();
	n = write(fds[1], buf, sizeof(buf));
	if (n < 0)
		printf("%s: write failed: %s after %.1f s\n", argv[1], strerror(errno),
		       now() - start);
	else
		printf("%s: wrote %zd bytes in %.1f s, pipe size %d\n", argv[1], n,
		       now() - start, fcntl(fds[1], F_GETPIPE_SZ));
	fflush(stdout);
	close(fds[1]);
	if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status))
		return 1;
	return n == WRITE_SIZE && WEXITSTATUS(status) == 0 ? 0 : 1;
}
