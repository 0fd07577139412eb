/*
 * Guest-side probe for the module's own value check: usage
 * sysctl-racer FILE VALUE COMMAND [ARG...].
 *
 * Runs COMMAND (`dynamos apply ...`) under ptrace and, when it enters the
 * init_module system call, writes VALUE to FILE before letting the call
 * go on. `dynamos apply` has checked FILE's variable by then and the
 * module has not yet written it, so the module must find it changed under
 * it and fail the load: the race an administrator could win by chance,
 * made certain. Exits with COMMAND's exit status (255 if it did not exit,
 * 254 if init_module was never called).
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int status, entering = 1, written = 0, fd;
	pid_t child;

	if (argc < 4) {
		fprintf(stderr, "usage: sysctl-racer FILE VALUE COMMAND [ARG...]\n");
		return 2;
	}
	fd = open(argv[1], O_WRONLY);
	if (fd < 0) {
		perror(argv[1]);
		return 2;
	}
	child = fork();
	if (child == 0) {
		ptrace(PTRACE_TRACEME, 0, NULL, NULL);
		raise(SIGSTOP);
		execvp(argv[3], argv + 3);
		perror(argv[3]);
		_exit(127);
	}
	waitpid(child, &status, 0);
	ptrace(PTRACE_SETOPTIONS, child, NULL,
	       (void *)(PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL));
	for (int pass_signal = 0;;) {
		ptrace(PTRACE_SYSCALL, child, NULL, (void *)(long)pass_signal);
		pass_signal = 0;
		if (waitpid(child, &status, 0) < 0 || WIFEXITED(status) || WIFSIGNALED(status))
			break;
		if (WSTOPSIG(status) != (SIGTRAP | 0x80)) {
			/* A real signal, not a system call stop: hand it on (the
			 * SIGTRAP after execve is ptrace's own). */
			if (WSTOPSIG(status) != SIGTRAP)
				pass_signal = WSTOPSIG(status);
			continue;
		}
		if (entering && !written) {
			struct user_regs_struct regs;

			ptrace(PTRACE_GETREGS, child, NULL, &regs);
			if (regs.orig_rax == SYS_init_module) {
				if (write(fd, argv[2], strlen(argv[2])) < 0)
					perror("write");
				written = 1;
			}
		}
		entering = !entering;
	}
	if (!written)
		return 254;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 255;
}
