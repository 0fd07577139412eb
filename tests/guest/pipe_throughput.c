/*
 * Guest-side pipe throughput, for benches/pipe_throughput.rs.
 *
 * Usage: pipe-throughput LABEL bulk MIB
 *        pipe-throughput LABEL small COUNT
 *
 * bulk:  a reader and a writer process move MIB MiB through one pipe, the
 *        writer in 1 MiB write()s, the reader in 1 MiB read()s.
 * small: COUNT round trips of 64 bytes: the writer writes 64 bytes, the
 *        reader reads them and answers with one byte on a second pipe.
 *        The ring never fills, so an adaptive pipe never grows.
 *
 * Prints one line, e.g.
 *
 *     @@ throughput LABEL bulk 256 MiB in 1.234 s, pipe size 1048576, switches 8190 @@
 *     @@ throughput LABEL small 20000 in 0.456 s @@
 *
 * (switches: the voluntary context switches of writer and reader, each
 * a sleep on a full or empty pipe) and exits 0 when every byte arrived.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int bulk(const char *label, long mib)
{
	static char buf[CHUNK];
	long long total = 0, expected = (long long)mib * CHUNK;
	int fds[2], status, size;
	double start;
	pid_t child;

	if (pipe(fds))
		return 1;
	child = fork();
	if (child < 0)
		return 1;
	if (child == 0) {
		ssize_t n;

		close(fds[1]);
		while ((n = read(fds[0], buf, sizeof(buf))) > 0)
			total += n;
		_exit(total == expected ? 0 : 1);
	}
	close(fds[0]);
	memset(buf, 'b', sizeof(buf));
	start = now();
	for (long i = 0; i < mib; i++) {
		size_t done = 0;

		while (done < sizeof(buf)) {
			ssize_t n = write(fds[1], buf + done, sizeof(buf) - done);

			if (n <= 0)
				return 1;
			done += n;
		}
	}
	size = fcntl(fds[1], F_GETPIPE_SZ);
	close(fds[1]);
	if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		return 1;
	{
		double seconds = now() - start;
		struct rusage self, children;

		getrusage(RUSAGE_SELF, &self);
		getrusage(RUSAGE_CHILDREN, &children);
		printf("@@ throughput %s bulk %ld MiB in %.3f s, pipe size %d, switches %ld @@\n",
		       label, mib, seconds, size, self.ru_nvcsw + children.ru_nvcsw);
	}
	return 0;
}

static int small(const char *label, long count)
{
	int data[2], ack[2], status;
	char buf[64];
	double start;
	pid_t child;

	if (pipe(data) || pipe(ack))
		return 1;
	child = fork();
	if (child < 0)
		return 1;
	if (child == 0) {
		for (long i = 0; i < count; i++) {
			size_t got = 0;

			while (got < sizeof(buf)) {
				ssize_t n = read(data[0], buf + got, sizeof(buf) - got);

				if (n <= 0)
					_exit(1);
				got += n;
			}
			if (write(ack[1], "k", 1) != 1)
				_exit(1);
		}
		_exit(0);
	}
	memset(buf, 's', sizeof(buf));
	start = now();
	for (long i = 0; i < count; i++) {
		char k;

		if (write(data[1], buf, sizeof(buf)) != sizeof(buf) || read(ack[0], &k, 1) != 1)
			return 1;
	}
	if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		return 1;
	printf("@@ throughput %s small %ld in %.3f s @@\n", label, count, now() - start);
	return 0;
}

int main(int argc, char **argv)
{
	int rc;

	if (argc != 4)
		return 2;
	if (!strcmp(argv[2], "bulk"))
		rc = bulk(argv[1], atol(argv[3]));
	else if (!strcmp(argv[2], "small"))
		rc = small(argv[1], atol(argv[3]));
	else
		return 2;
	fflush(stdout);
	if (rc)
		fprintf(stderr, "pipe-throughput: %s %s failed\n", argv[1], argv[2]);
	return rc;
}
