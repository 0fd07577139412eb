/*
 * Guest-side probe for live-updating the vfork wait: usage vfork-sleeper FIFO.
 *
 * The parent vfork()s; the child opens FIFO and blocks reading one byte.
 * Until someone writes to FIFO the parent sleeps inside kernel_clone (the
 * inlined wait_for_vfork_done) in TASK_KILLABLE, which livepatch's fake
 * signal does not wake, so a live update replacing that function cannot
 * finish its transition until the FIFO is written.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/*
 * The vfork child borrows the parent's stack and memory: it only makes raw
 * syscalls, touches no stdio and leaves with _exit.
 */
static void child(const char *fifo)
{
	char byte;
	long fd, r;

	do {
		fd = syscall(SYS_openat, AT_FDCWD, fifo, O_RDONLY);
	} while (fd < 0 && errno == EINTR);     /* a signal may cut the open short */
	if (fd < 0)
		_exit(2);
	do {
		r = syscall(SYS_read, fd, &byte, 1);
	} while (r < 0 && errno == EINTR);
	/* 1: a byte arrived; 0: a writer came and went without writing. */
	_exit(r == 1 ? 0 : r == 0 ? 1 : 2);
}

int main(int argc, char **argv)
{
	int status;
	pid_t pid;

	if (argc != 2) {
		fprintf(stderr, "usage: %s FIFO\n", argv[0]);
		return 2;
	}
	printf("vfork-sleeper: parent %d waiting\n", (int)getpid());
	/* The child shares our stdio buffer: it must be empty before vfork. */
	fflush(stdout);

	pid = vfork();
	if (pid == 0)
		child(argv[1]);
	if (pid < 0) {
		perror("vfork");
		return 2;
	}
	/* Here the child has exited: vfork returned only once it let go of us. */
	printf("vfork-sleeper: woke\n");
	fflush(stdout);

	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR) {
			perror("waitpid");
			return 2;
		}
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		fprintf(stderr, "vfork-sleeper: child status 0x%x\n", status);
		return 1;
	}
	return 0;
}
