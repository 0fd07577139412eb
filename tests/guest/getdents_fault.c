/*
 * Guest-side probe for tests/special_sections.rs: getdents64 into an
 * unmapped user buffer must fail with EFAULT. A live-updated filldir64
 * whose exception-table entries were lost would oops instead.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : "/";
	int fd = open(dir, O_RDONLY | O_DIRECTORY);
	void *buffer;
	long ret;

	if (fd < 0) {
		perror(dir);
		return 2;
	}
	/* A canonical user address with nothing mapped behind it. */
	buffer = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buffer == MAP_FAILED || munmap(buffer, 4096) != 0) {
		perror("mmap");
		return 2;
	}
	ret = syscall(SYS_getdents64, fd, buffer, 4096);
	printf("getdents64 into an unmapped buffer: %ld (%s)\n", ret,
	       ret < 0 ? (errno == EFAULT ? "EFAULT" : "other error") : "no error");
	return ret == -1 && errno == EFAULT ? 0 : 1;
}
