/*
 * Guest-side probe for live-updating nfsd4_sequence: usage
 * nfs4-sequence SLOTID HIGHEST_SLOTID
 *
 * Sends the in-kernel NFS server at 127.0.0.1:2049 one NFSv4.1 COMPOUND
 * holding a single SEQUENCE op for a made-up session, with the slot id and
 * highest slot id given, and prints the COMPOUND's status as
 * "status N": 10052 (NFS4ERR_BADSESSION) when the server looks the session
 * up, 22 (NFS4ERR_INVAL) when it rejects slot ids that contradict each
 * other first. ONC RPC over TCP with record marking (RFC 5531), AUTH_SYS
 * as root; COMPOUND and SEQUENCE encoded as RFC 8881 gives them.
 * Exits 1 with a message when it cannot connect, the RPC layer rejects
 * the call or the reply is malformed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define NFS_PROGRAM 100003
#define NFS_V4 4
#define NFSPROC4_COMPOUND 1
#define OP_SEQUENCE 53
#define AUTH_NONE 0
#define AUTH_SYS 1
#define LAST_FRAGMENT 0x80000000u
#define MAX_REPLY 65536

static void __attribute__((noreturn)) die(const char *what)
{
	fprintf(stderr, "nfs4-sequence: %s\n", what);
	exit(1);
}

/* XDR encoding into a word-aligned buffer (RFC 4506). */
struct xdr {
	unsigned char *buf;
	size_t len, cap;
};

static void put_u32(struct xdr *x, uint32_t v)
{
	uint32_t be = htonl(v);

	if (x->len + 4 > x->cap)
		die("request buffer too small");
	memcpy(x->buf + x->len, &be, 4);
	x->len += 4;
}

/* Fixed-length opaque: the bytes, zero-padded to a multiple of four. */
static void put_fixed(struct xdr *x, const void *data, size_t n)
{
	size_t padded = (n + 3) & ~(size_t)3;

	if (x->len + padded > x->cap)
		die("request buffer too small");
	memset(x->buf + x->len, 0, padded);
	memcpy(x->buf + x->len, data, n);
	x->len += padded;
}

/* Variable-length opaque or string: a length word, then the bytes. */
static void put_var(struct xdr *x, const void *data, size_t n)
{
	put_u32(x, n);
	put_fixed(x, data, n);
}

/* XDR decoding of the reply; any overrun is a malformed reply. */
struct reader {
	const unsigned char *buf;
	size_t len, pos;
};

static uint32_t get_u32(struct reader *r)
{
	uint32_t be;

	if (r->pos + 4 > r->len)
		die("reply too short");
	memcpy(&be, r->buf + r->pos, 4);
	r->pos += 4;
	return ntohl(be);
}

static void skip_var(struct reader *r)
{
	uint32_t n = get_u32(r);
	size_t padded = ((size_t)n + 3) & ~(size_t)3;

	if (padded > r->len - r->pos)
		die("reply too short");
	r->pos += padded;
}

static void write_all(int fd, const unsigned char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			perror("nfs4-sequence: send");
			exit(1);
		}
		p += w;
		n -= (size_t)w;
	}
}

static void read_all(int fd, unsigned char *p, size_t n)
{
	while (n > 0) {
		ssize_t r = read(fd, p, n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				die("no reply within 60 s (request dropped?)");
			perror("nfs4-sequence: receive");
			exit(1);
		}
		if (r == 0)
			die("server closed the connection without a reply");
		p += r;
		n -= (size_t)r;
	}
}

static uint32_t parse_slot(const char *arg)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(arg, &end, 0);
	if (errno || *arg == '\0' || *end != '\0' || v > 0xffffffffUL)
		die("slot ids must be numbers below 2^32");
	return (uint32_t)v;
}

int main(int argc, char **argv)
{
	static const char session[16] = "dynamos-probe-id";	/* no such session */
	static const char machine[] = "dynamos-guest";
	const uint32_t xid = 0x64796e31;
	unsigned char request[512], *reply;
	struct xdr x = { request, 0, sizeof(request) };
	struct xdr cred;
	unsigned char credbuf[128];
	struct sockaddr_in addr;
	struct timeval tv = { 60, 0 };
	struct reader r;
	uint32_t slotid, highest, marker, frag, status, nres;
	size_t total = 0;
	int fd, last = 0;

	if (argc != 3) {
		fprintf(stderr, "usage: %s SLOTID HIGHEST_SLOTID\n", argv[0]);
		return 2;
	}
	slotid = parse_slot(argv[1]);
	highest = parse_slot(argv[2]);

	/* AUTH_SYS body: stamp, machine name, uid, gid, no extra groups. */
	cred = (struct xdr){ credbuf, 0, sizeof(credbuf) };
	put_u32(&cred, 0);
	put_var(&cred, machine, strlen(machine));
	put_u32(&cred, 0);
	put_u32(&cred, 0);
	put_u32(&cred, 0);

	put_u32(&x, 0);			/* record marker, filled in below */
	put_u32(&x, xid);
	put_u32(&x, 0);			/* CALL */
	put_u32(&x, 2);			/* RPC version */
	put_u32(&x, NFS_PROGRAM);
	put_u32(&x, NFS_V4);
	put_u32(&x, NFSPROC4_COMPOUND);
	put_u32(&x, AUTH_SYS);
	put_var(&x, cred.buf, cred.len);
	put_u32(&x, AUTH_NONE);		/* verifier */
	put_u32(&x, 0);
	/* COMPOUND4args */
	put_var(&x, "", 0);		/* tag */
	put_u32(&x, 1);			/* minorversion */
	put_u32(&x, 1);			/* one operation */
	put_u32(&x, OP_SEQUENCE);
	put_fixed(&x, session, sizeof(session));
	put_u32(&x, 1);			/* sa_sequenceid */
	put_u32(&x, slotid);		/* sa_slotid */
	put_u32(&x, highest);		/* sa_highest_slotid */
	put_u32(&x, 0);			/* sa_cachethis: false */
	marker = htonl(LAST_FRAGMENT | (uint32_t)(x.len - 4));
	memcpy(request, &marker, 4);

	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) {
		perror("nfs4-sequence: socket");
		return 1;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	memset(&addr, 0, sizeof(addr));
	addr.sin_family = AF_INET;
	addr.sin_port = htons(2049);
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("nfs4-sequence: connect to 127.0.0.1:2049");
		return 1;
	}
	write_all(fd, request, x.len);

	/* The reply may come in several record fragments: join them. */
	reply = malloc(MAX_REPLY);
	if (!reply)
		die("out of memory");
	while (!last) {
		read_all(fd, (unsigned char *)&marker, 4);
		marker = ntohl(marker);
		last = (marker & LAST_FRAGMENT) != 0;
		frag = marker & ~LAST_FRAGMENT;
		if (frag > MAX_REPLY - total)
			die("reply too long");
		read_all(fd, reply + total, frag);
		total += frag;
	}
	close(fd);

	r = (struct reader){ reply, total, 0 };
	if (get_u32(&r) != xid)
		die("reply for another call");
	if (get_u32(&r) != 1)
		die("not an RPC reply");
	if (get_u32(&r) != 0) {		/* MSG_DENIED */
		uint32_t why = get_u32(&r);

		if (why == 0)
			die("RPC rejected: RPC version mismatch");
		fprintf(stderr, "nfs4-sequence: RPC rejected: authentication error %u\n",
			get_u32(&r));
		return 1;
	}
	get_u32(&r);			/* verifier flavor */
	skip_var(&r);			/* verifier body */
	switch (get_u32(&r)) {
	case 0:
		break;
	case 1:
		die("RPC accepted but program unavailable (NFS not registered)");
	case 2:
		die("RPC accepted but program version mismatch (NFSv4 disabled?)");
	case 3:
		die("RPC accepted but procedure unavailable");
	case 4:
		die("RPC accepted but the server could not decode the arguments");
	default:
		die("RPC accepted but the server reported a system error");
	}

	/* COMPOUND4res: status, tag, then one result per op executed. */
	status = get_u32(&r);
	skip_var(&r);
	nres = get_u32(&r);
	if (nres > 1)
		die("more results than operations sent");
	if (nres == 1) {
		if (get_u32(&r) != OP_SEQUENCE)
			die("result is not for SEQUENCE");
		if (get_u32(&r) != status)
			die("SEQUENCE status differs from the COMPOUND status");
	}
	printf("status %u\n", status);
	free(reply);
	return 0;
}
