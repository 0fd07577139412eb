/* Set up an io_uring instance: the first one of a task creates its io-wq
 * (io_wq_create). Prints "ring N" with the ring's file descriptor. */
#include <linux/io_uring.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void)
{
	struct io_uring_params params;
	long fd;

	memset(&params, 0, sizeof(params));
	fd = syscall(__NR_io_uring_setup, 8, &params);
	if (fd < 0) {
		perror("io_uring_setup");
		return 1;
	}
	printf("ring %ld\n", fd);
	close(fd);
	return 0;
}
