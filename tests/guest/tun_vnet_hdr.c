/*
 * Guest-side probe for live-updating the tun driver's ioctl handler:
 * usage tun-vnet-hdr SIZE
 *
 * Creates a throw-away TAP device with a virtio-net header
 * (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) through /dev/net/tun, asks for a
 * header of SIZE bytes with TUNSETVNETHDRSZ and reads the size back with
 * TUNGETVNETHDRSZ. Prints one line: "result 0 size N" when the driver
 * accepted SIZE, "errno E size N" when it refused it (N is the size the
 * device keeps: 10, the default, after a refusal). The device goes away
 * when the program exits. Exits 1 with a message when /dev/net/tun cannot
 * be opened, the device cannot be created or the size cannot be read.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static void __attribute__((noreturn)) fail(const char *what)
{
	fprintf(stderr, "tun-vnet-hdr: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	struct ifreq ifr;
	char *end;
	long wanted;
	int size, got, fd, set_errno = 0;

	if (argc != 2) {
		fprintf(stderr, "usage: %s SIZE\n", argv[0]);
		return 2;
	}
	errno = 0;
	wanted = strtol(argv[1], &end, 0);
	if (errno || *end || wanted < -2147483647L - 1 || wanted > 2147483647L) {
		fprintf(stderr, "tun-vnet-hdr: bad size %s\n", argv[1]);
		return 2;
	}
	size = (int)wanted;

	fd = open("/dev/net/tun", O_RDWR);
	if (fd < 0)
		fail("open /dev/net/tun");

	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
	strncpy(ifr.ifr_name, "dyntap%d", IFNAMSIZ - 1);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		fail("TUNSETIFF");

	if (ioctl(fd, TUNSETVNETHDRSZ, &size) < 0)
		set_errno = errno;

	if (ioctl(fd, TUNGETVNETHDRSZ, &got) < 0)
		fail("TUNGETVNETHDRSZ");

	if (set_errno)
		printf("errno %d size %d\n", set_errno, got);
	else
		printf("result 0 size %d\n", got);
	close(fd);
	return 0;
}
