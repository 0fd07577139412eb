/*
 * Guest-side pipe stress for live updates of pipe_read/pipe_write.
 *
 * Usage: pipe-stress PAIRS STOPFILE
 *
 * Forks PAIRS writer/reader pairs, each joined by a pipe. A writer sends a
 * deterministic pseudo-random byte stream in chunks of 1 byte to 64 KiB
 * (PIPE_BUF-sized ones and larger included) until STOPFILE exists; its
 * reader reads with varying buffer sizes and checks every byte against the
 * same stream. Both keep an FNV-1a 64 checksum and report it to the parent,
 * which prints one line per pair and
 *
 *     pipe-stress: pairs N bytes B short-writes S interrupted I mismatches M
 *
 * (S: write()s that returned less than asked, I: calls that failed with
 * EINTR; both are what a signal does to a sleeper) and exits 0 only if no
 * pair went wrong. Tasks in the guest get livepatch
 * fake signals, so every syscall here copes with EINTR and short transfers.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_PAIRS 64
#define MAX_CHUNK 65536

enum role { WRITER = 1, READER = 2 };

/* One record a child sends to the parent; small enough to write atomically. */
struct report {
	int32_t role;
	int32_t error;          /* errno of a failed syscall, 0 if none */
	uint64_t bytes;         /* bytes written or read */
	uint64_t checksum;      /* FNV-1a 64 of those bytes */
	uint64_t mismatches;    /* bytes that differed from the expected stream */
	uint64_t short_writes;  /* write()s that returned less than asked */
	uint64_t interrupted;   /* calls that failed with EINTR */
};

struct pair {
	pid_t writer, reader;
	int report_fd;          /* parent's read end of the pair's report pipe */
	struct report w, r;
	int have_w, have_r;
	int status_w, status_r;
};

/* Byte stream: xorshift64, eight bytes per step, regenerable by the reader. */
struct stream {
	uint64_t state;
	uint64_t word;
	unsigned int left;      /* unused bytes still in word */
};

static void stream_init(struct stream *s, uint64_t seed)
{
	/* xorshift must not start at zero. */
	s->state = seed ? seed : 0x9e3779b97f4a7c15ULL;
	s->left = 0;
}

static uint64_t xorshift64(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static void stream_fill(struct stream *s, unsigned char *buf, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (s->left == 0) {
			s->word = xorshift64(&s->state);
			s->left = 8;
		}
		buf[i] = (unsigned char)s->word;
		s->word >>= 8;
		s->left--;
	}
}

static uint64_t fnv1a(uint64_t hash, const unsigned char *buf, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		hash ^= buf[i];
		hash *= 0x100000001b3ULL;
	}
	return hash;
}

#define FNV_OFFSET 0xcbf29ce484222325ULL

/* Chunk sizes: the edge cases around PIPE_BUF and page size, often. */
static size_t pick_size(uint64_t *rng)
{
	uint64_t r = xorshift64(rng);

	switch (r % 10) {
	case 0:
		return 1 + (r >> 8) % 16;
	case 1:
		return PIPE_BUF;
	case 2:
		return PIPE_BUF - 1 + (r >> 8) % 3;     /* 4095, 4096, 4097 */
	case 3:
		return MAX_CHUNK;
	default:
		return 1 + (r >> 8) % MAX_CHUNK;
	}
}

static uint64_t pair_seed(int pair, uint64_t salt)
{
	/* Distinct, non-zero seeds per pair and per use. */
	return (0x9e3779b97f4a7c15ULL * (uint64_t)(pair + 1)) ^ salt;
}

/* Signal effects seen by this process, for its report. */
static uint64_t short_writes, interrupted;

static int write_all(int fd, const void *buf, size_t n)
{
	const unsigned char *p = buf;

	while (n > 0) {
		ssize_t w = write(fd, p, n);

		if (w < 0) {
			if (errno == EINTR) {
				interrupted++;
				continue;       /* interrupted before any byte: retry */
			}
			return -1;
		}
		if ((size_t)w < n)
			short_writes++;
		p += w;                 /* a short write leaves the rest to send */
		n -= (size_t)w;
	}
	return 0;
}

/* Reads exactly n bytes unless EOF comes first; returns bytes read or -1. */
static ssize_t read_full(int fd, void *buf, size_t n)
{
	unsigned char *p = buf;
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, p + got, n - got);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return (ssize_t)got;
}

static void send_report(int fd, struct report *rep)
{
	/* Nothing else to tell the parent if this fails; it sees a missing report. */
	if (write_all(fd, rep, sizeof(*rep)) != 0)
		_exit(3);
}

static void run_writer(int pair, int fd, int report_fd, const char *stopfile)
{
	static unsigned char buf[MAX_CHUNK];
	struct stream s;
	uint64_t sizes = pair_seed(pair, 0x5752495445ULL);
	struct report rep = { .role = WRITER, .checksum = FNV_OFFSET };

	stream_init(&s, pair_seed(pair, 0));
	/* A reader that quits early must show up as an error, not kill us. */
	signal(SIGPIPE, SIG_IGN);
	while (access(stopfile, F_OK) != 0) {
		size_t n = pick_size(&sizes);

		stream_fill(&s, buf, n);
		if (write_all(fd, buf, n) != 0) {
			rep.error = errno;
			break;
		}
		rep.checksum = fnv1a(rep.checksum, buf, n);
		rep.bytes += n;
	}
	close(fd);              /* EOF tells the reader the stream is complete */
	rep.short_writes = short_writes;
	rep.interrupted = interrupted;
	send_report(report_fd, &rep);
	_exit(rep.error ? 1 : 0);
}

static void run_reader(int pair, int fd, int report_fd)
{
	static unsigned char buf[MAX_CHUNK], want[MAX_CHUNK];
	struct stream s;
	uint64_t sizes = pair_seed(pair, 0x52454144ULL);
	struct report rep = { .role = READER, .checksum = FNV_OFFSET };

	stream_init(&s, pair_seed(pair, 0));
	for (;;) {
		size_t n = pick_size(&sizes);
		ssize_t r = read(fd, buf, n);

		if (r < 0) {
			if (errno == EINTR) {
				rep.interrupted++;
				continue;
			}
			rep.error = errno;
			break;
		}
		if (r == 0)
			break;
		/* A short read is normal: compare only what arrived. */
		stream_fill(&s, want, (size_t)r);
		for (ssize_t i = 0; i < r; i++) {
			if (buf[i] == want[i])
				continue;
			if (rep.mismatches++ == 0) {
				printf("pipe-stress: pair %d MISMATCH at offset %llu: expected 0x%02x got 0x%02x\n",
				       pair, (unsigned long long)(rep.bytes + (uint64_t)i),
				       want[i], buf[i]);
				fflush(stdout);
			}
		}
		rep.checksum = fnv1a(rep.checksum, buf, (size_t)r);
		rep.bytes += (uint64_t)r;
	}
	close(fd);
	send_report(report_fd, &rep);
	_exit(rep.error || rep.mismatches ? 1 : 0);
}

/* Children must not hold the parent's other pipe ends, or EOFs never come. */
static void close_inherited(const struct pair *pairs, int n)
{
	for (int i = 0; i < n; i++)
		close(pairs[i].report_fd);
}

static int wait_child(pid_t pid)
{
	int status;

	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	return status;
}

static const char *describe(int status, char *buf, size_t len)
{
	if (status == -1)
		snprintf(buf, len, "lost");
	else if (WIFEXITED(status))
		snprintf(buf, len, "exit %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(buf, len, "signal %d", WTERMSIG(status));
	else
		snprintf(buf, len, "status 0x%x", status);
	return buf;
}

int main(int argc, char **argv)
{
	static struct pair pairs[MAX_PAIRS];
	const char *stopfile;
	char *end;
	long npairs;
	uint64_t total = 0, short_total = 0, interrupted_total = 0;
	int bad_pairs = 0;

	if (argc != 3) {
		fprintf(stderr, "usage: %s PAIRS STOPFILE\n", argv[0]);
		return 2;
	}
	npairs = strtol(argv[1], &end, 10);
	if (*end || npairs < 1 || npairs > MAX_PAIRS) {
		fprintf(stderr, "%s: PAIRS must be 1..%d\n", argv[0], MAX_PAIRS);
		return 2;
	}
	stopfile = argv[2];
	/*
	 * Lowest priority, inherited by every pair: the load must not starve
	 * the tool applying updates on the guest's two emulated CPUs.
	 */
	if (setpriority(PRIO_PROCESS, 0, 19) != 0)
		perror("setpriority");

	for (int i = 0; i < npairs; i++) {
		int data[2], report[2];

		if (pipe(data) != 0 || pipe(report) != 0) {
			perror("pipe");
			return 2;
		}
		/* Children inherit stdio buffers: empty them before each fork. */
		fflush(stdout);
		pairs[i].writer = fork();
		if (pairs[i].writer == 0) {
			close_inherited(pairs, i);
			close(data[0]);
			close(report[0]);
			run_writer(i, data[1], report[1], stopfile);
		}
		pairs[i].reader = pairs[i].writer < 0 ? -1 : fork();
		if (pairs[i].reader == 0) {
			close_inherited(pairs, i);
			close(data[1]);
			close(report[0]);
			run_reader(i, data[0], report[1]);
		}
		if (pairs[i].writer < 0 || pairs[i].reader < 0) {
			perror("fork");
			return 2;
		}
		/* Only the children may hold the data pipe and report write end. */
		close(data[0]);
		close(data[1]);
		close(report[1]);
		pairs[i].report_fd = report[0];
	}
	printf("pipe-stress: running %ld pairs\n", npairs);
	fflush(stdout);

	/*
	 * Wait in waitpid, not in a pipe read: a task asleep in pipe_read would
	 * hold up every live update of it until livepatch's fake signal.
	 */
	for (int i = 0; i < npairs; i++) {
		pairs[i].status_w = wait_child(pairs[i].writer);
		pairs[i].status_r = wait_child(pairs[i].reader);
	}
	for (int i = 0; i < npairs; i++) {
		struct pair *p = &pairs[i];
		struct report rep;

		/* Both records are buffered in the pipe (far below its size); then EOF. */
		while (read_full(p->report_fd, &rep, sizeof(rep)) == (ssize_t)sizeof(rep)) {
			if (rep.role == WRITER) {
				p->w = rep;
				p->have_w = 1;
			} else if (rep.role == READER) {
				p->r = rep;
				p->have_r = 1;
			}
		}
		close(p->report_fd);
	}

	for (int i = 0; i < npairs; i++) {
		struct pair *p = &pairs[i];
		char ws[32], rs[32];
		int bad = !p->have_w || !p->have_r || p->w.error || p->r.error ||
			  p->r.mismatches || p->r.bytes != p->w.bytes ||
			  p->r.checksum != p->w.checksum ||
			  p->status_w != 0 || p->status_r != 0;

		printf("pipe-stress: pair %d wrote %llu read %llu fnv %016llx/%016llx "
		       "mismatched-bytes %llu writer %s%s%s reader %s%s%s: %s\n",
		       i, (unsigned long long)p->w.bytes,
		       (unsigned long long)p->r.bytes,
		       (unsigned long long)p->w.checksum,
		       (unsigned long long)p->r.checksum,
		       (unsigned long long)p->r.mismatches,
		       describe(p->status_w, ws, sizeof(ws)),
		       p->w.error ? " " : "", p->w.error ? strerror(p->w.error) : "",
		       describe(p->status_r, rs, sizeof(rs)),
		       p->r.error ? " " : "", p->r.error ? strerror(p->r.error) : "",
		       bad ? "BAD" : "ok");
		total += p->r.bytes;
		short_total += p->w.short_writes;
		interrupted_total += p->w.interrupted + p->r.interrupted;
		bad_pairs += bad;
	}
	printf("pipe-stress: pairs %ld bytes %llu short-writes %llu interrupted %llu mismatches %d\n",
	       npairs, (unsigned long long)total, (unsigned long long)short_total,
	       (unsigned long long)interrupted_total, bad_pairs);
	return bad_pairs ? 1 : 0;
}
