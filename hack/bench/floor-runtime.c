/* The machine's floors for hack/bench/runtime.sh: the least a runtime's `run` + `delete` of a
 * /bin/true container can cost here, measured the same way as the runtimes.
 *
 *   floor-runtime ROOTFS         clone(2) into new mount, UTS, IPC, PID and network namespaces
 *                                (those of `runc spec`'s config), chroot into ROOTFS, exec
 *                                /bin/true, wait;
 *   floor-runtime --spec ROOTFS  the same plus the kernel work `runc spec`'s config asks of any
 *                                runtime: a cgroup in every hierarchy with the devices rules
 *                                (deny all, allow the default devices), joined by the child and
 *                                removed after it; the spec's mounts, masked and read-only
 *                                paths, the default device nodes and /dev links, the hostname
 *                                and pivot_root, the read-only root;
 *   floor-runtime                nothing: the `delete` that follows, i.e. one more process
 *                                start.
 *
 * No OCI parsing, no state, no capability, rlimit or seccomp set-up, no protection of the
 * binary, no error reporting to speak of: what is left is process, namespace, cgroup and mount
 * creation, which any runtime pays. A runtime's ratio to runc cannot go below --spec's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

static char stack[64 * 1024];
static const char *rootfs;
static int spec;
static char cgroups[16][600]; /* this run's cgroup directory in each hierarchy */
static int ncgroups;

static void die(const char *what) {
  fprintf(stderr, "floor-runtime: %s: %s\n", what, strerror(errno));
  _exit(127);
}

static void put(const char *dir, const char *file, const char *value) {
  char p[700];
  snprintf(p, sizeof p, "%s/%s", dir, file);
  int fd = open(p, O_WRONLY | O_CLOEXEC);
  if (fd < 0 || write(fd, value, strlen(value)) < 0)
    die(p);
  close(fd);
}

/* A directory of our own in every cgroup hierarchy (from mountinfo). */
static void make_cgroups(void) {
  FILE *f = fopen("/proc/self/mountinfo", "re");
  char line[4096];
  if (!f)
    die("mountinfo");
  while (fgets(line, sizeof line, f) && ncgroups < 16) {
    char *sep = strstr(line, " - ");
    char mp[512];
    if (!sep || sscanf(line, "%*s %*s %*s %*s %511s", mp) != 1)
      continue;
    int v1 = strncmp(sep + 3, "cgroup ", 7) == 0, v2 = strncmp(sep + 3, "cgroup2 ", 8) == 0;
    if (!v1 && !v2)
      continue;
    snprintf(cgroups[ncgroups], sizeof cgroups[0], "%s/dhfloor-%d", mp, (int)getpid());
    if (mkdir(cgroups[ncgroups], 0755) != 0)
      die(cgroups[ncgroups]);
    if (v1 && strstr(sep, ",cpuset")) { /* a new v1 cpuset is empty: the parent's */
      static const char *files[] = {"cpuset.cpus", "cpuset.mems"};
      for (int i = 0; i < 2; i++) {
        char p[700], v[256] = "";
        snprintf(p, sizeof p, "%s/%s", mp, files[i]);
        FILE *c = fopen(p, "re");
        if (!c || !fgets(v, sizeof v, c))
          die(p);
        fclose(c);
        put(cgroups[ncgroups], files[i], v);
      }
    }
    if (v1 && strstr(sep, ",devices")) {
      static const char *allow[] = {"c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm",
                                    "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm",
                                    "c 136:* rwm", "c 10:200 rwm"};
      put(cgroups[ncgroups], "devices.deny", "a");
      for (size_t i = 0; i < sizeof allow / sizeof allow[0]; i++)
        put(cgroups[ncgroups], "devices.allow", allow[i]);
    }
    ncgroups++;
  }
  fclose(f);
}

static void mnt(const char *src, const char *dst, const char *type, unsigned long flags,
                const char *data) {
  if (mount(src, dst, type, flags, data) != 0)
    die(dst);
}

static void setup_rootfs(void) {
  static const char *masked[] = {"proc/acpi", "proc/asound", "proc/kcore", "proc/keys",
                                 "proc/latency_stats", "proc/timer_list", "proc/timer_stats",
                                 "proc/sched_debug", "sys/firmware", "proc/scsi"};
  static const char *readonly[] = {"proc/bus", "proc/fs", "proc/irq", "proc/sys",
                                   "proc/sysrq-trigger"};
  static const struct { const char *name; int major, minor; } devs[] = {
      {"dev/null", 1, 3}, {"dev/zero", 1, 5}, {"dev/full", 1, 7},
      {"dev/random", 1, 8}, {"dev/urandom", 1, 9}, {"dev/tty", 5, 0}};
  static const char *links[][2] = {{"/proc/self/fd", "dev/fd"}, {"/proc/self/fd/0", "dev/stdin"},
                                   {"/proc/self/fd/1", "dev/stdout"},
                                   {"/proc/self/fd/2", "dev/stderr"}, {"pts/ptmx", "dev/ptmx"}};
  mnt(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL);
  mnt(rootfs, rootfs, NULL, MS_BIND | MS_REC, NULL);
  if (chdir(rootfs) != 0)
    die("chdir");
  mnt("proc", "proc", "proc", 0, NULL);
  mnt("tmpfs", "dev", "tmpfs", MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k");
  mkdir("dev/pts", 0755);
  mnt("devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
      "newinstance,ptmxmode=0666,mode=0620,gid=5");
  mkdir("dev/shm", 01777);
  mnt("shm", "dev/shm", "tmpfs", MS_NOSUID | MS_NOEXEC | MS_NODEV, "mode=1777,size=65536k");
  mkdir("dev/mqueue", 0755);
  mnt("mqueue", "dev/mqueue", "mqueue", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL);
  mnt("sysfs", "sys", "sysfs", MS_NOSUID | MS_NOEXEC | MS_NODEV | MS_RDONLY, NULL);
  /* The host's cgroup tree, read-only, in one recursive bind: cheaper than what a runtime
   * does (a cgroup mount per hierarchy), so still a lower bound. */
  mnt("/sys/fs/cgroup", "sys/fs/cgroup", NULL, MS_BIND | MS_REC, NULL);
  mnt(NULL, "sys/fs/cgroup", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
  for (size_t i = 0; i < sizeof devs / sizeof devs[0]; i++)
    if (mknod(devs[i].name, S_IFCHR | 0666, makedev(devs[i].major, devs[i].minor)) != 0)
      die(devs[i].name);
  for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
    if (symlink(links[i][0], links[i][1]) != 0)
      die(links[i][1]);
  for (size_t i = 0; i < sizeof masked / sizeof masked[0]; i++) {
    struct stat st;
    if (stat(masked[i], &st) != 0)
      continue;
    if (S_ISDIR(st.st_mode))
      mnt("tmpfs", masked[i], "tmpfs", MS_RDONLY, NULL);
    else
      mnt("dev/null", masked[i], NULL, MS_BIND, NULL);
  }
  for (size_t i = 0; i < sizeof readonly / sizeof readonly[0]; i++) {
    if (access(readonly[i], F_OK) != 0)
      continue;
    mnt(readonly[i], readonly[i], NULL, MS_BIND | MS_REC, NULL);
    mnt(NULL, readonly[i], NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
  }
  if (sethostname("runc", 4) != 0)
    die("sethostname");
  if (syscall(SYS_pivot_root, ".", ".") != 0)
    die("pivot_root");
  if (umount2(".", MNT_DETACH) != 0)
    die("umount old root");
  if (chdir("/") != 0)
    die("chdir /");
  mnt(NULL, "/", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL); /* root.readonly */
}

static int child(void *arg) {
  (void)arg;
  if (spec) {
    for (int i = 0; i < ncgroups; i++)
      put(cgroups[i], "cgroup.procs", "0");
    setup_rootfs();
  } else if (chroot(rootfs) != 0 || chdir("/") != 0) {
    die("chroot");
  }
  execl("/bin/true", "true", (char *)NULL);
  die("exec /bin/true");
  return 127;
}

int main(int argc, char **argv) {
  if (argc < 2)
    return 0;
  spec = strcmp(argv[1], "--spec") == 0;
  if (spec && argc < 3)
    return 2;
  rootfs = argv[spec ? 2 : 1];
  if (spec)
    make_cgroups();
  int flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET | SIGCHLD;
  pid_t pid = clone(child, stack + sizeof stack, flags, NULL);
  if (pid < 0)
    die("clone");
  int status;
  if (waitpid(pid, &status, 0) < 0)
    die("waitpid");
  for (int i = 0; i < ncgroups; i++)
    if (rmdir(cgroups[i]) != 0)
      die(cgroups[i]);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
