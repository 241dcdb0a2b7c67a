/* The machine's floor for hack/bench/runtime.sh: the least a runtime's `run` + `delete` of a
 * /bin/true container can cost here, measured the same way as the runtimes.
 *
 *   floor-runtime ROOTFS   clone(2) into new mount, UTS, IPC, PID and network namespaces (those
 *                          of `runc spec`'s config), chroot into ROOTFS, exec /bin/true, wait;
 *   floor-runtime          nothing: the `delete` that follows, i.e. one more process start.
 *
 * No cgroup, no mount, no pivot_root, no capability or seccomp set-up, no state file, no
 * protection of the binary: what is left is process creation and namespace creation, which any
 * runtime pays. A runtime's ratio to runc cannot go below this program's. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static char stack[64 * 1024];

static int child(void *rootfs) {
  if (chroot(rootfs) != 0 || chdir("/") != 0) {
    perror("floor-runtime: chroot");
    return 127;
  }
  execl("/bin/true", "true", (char *)NULL);
  perror("floor-runtime: exec /bin/true");
  return 127;
}

int main(int argc, char **argv) {
  if (argc < 2)
    return 0;
  int flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET | SIGCHLD;
  pid_t pid = clone(child, stack + sizeof stack, flags, argv[1]);
  if (pid < 0) {
    perror("floor-runtime: clone");
    return 1;
  }
  int status;
  if (waitpid(pid, &status, 0) < 0) {
    perror("floor-runtime: waitpid");
    return 1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
