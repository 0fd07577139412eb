/*
 * Guest-side task blocked in uninterruptible sleep (D state), for the hung
 * task detector.
 *
 * Usage: d-state
 *
 * A child write()s to a pipe from a page registered with userfaultfd and
 * never supplied: pipe_write faults while holding the pipe's mutex and the
 * child waits for the page. The parent then writes to the same pipe and
 * blocks in mutex_lock, TASK_UNINTERRUPTIBLE, until the child is killed.
 * Before blocking it prints
 *
 *     d-state: child CHILD, blocking PID
 *
 * After `kill -9 CHILD` the parent's write completes and it exits 0.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* In the child: a page that is never supplied, written to the pipe. */
static int fault_forever(int fd)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	long page = sysconf(_SC_PAGESIZE);
	char *area;
	int uffd;

	/* Registered here: a forked child's copy of a registration is dropped. */
	uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) {
		perror("d-state: userfaultfd");
		return 1;
	}
	area = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		return 1;
	reg.range.start = (unsigned long)area;
	reg.range.len = page;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg)) {
		perror("d-state: UFFDIO_REGISTER");
		return 1;
	}
	/* Faults on the missing page with the pipe's mutex held. */
	if (write(fd, area, 64) < 0)
		return 1;
	fprintf(stderr, "d-state: the fault was served\n");
	return 1;
}

int main(void)
{
	int fds[2], status;
	pid_t child;

	if (pipe(fds))
		return 1;
	child = fork();
	if (child < 0)
		return 1;
	if (child == 0)
		_exit(fault_forever(fds[1]));
	sleep(1);
	printf("d-state: child %d, blocking %d\n", child, getpid());
	fflush(stdout);
	if (write(fds[1], "x", 1) != 1)
		return 1;
	waitpid(child, &status, 0);
	return 0;
}
