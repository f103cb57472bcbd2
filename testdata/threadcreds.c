/*
 * threadcreds OUTFILE GOFILE
 *
 * Test target for amber: one thread changes only its own uids and gids
 * (raw setresgid/setresuid, which glibc would apply to every thread) to
 * 1234/2345. Writes "ready" then, once GOFILE exists, what each thread
 * sees for itself: "main uid=0 gid=0" and "other uid=1234 gid=2345",
 * then "PASS" when those are right, else "FAIL".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static int out_fd;
static const char *go_file;
static volatile int changed, go;
static long other_uid = -1, other_gid = -1;

static void nap(void) {
  struct timespec ts = {0, 10 * 1000 * 1000};
  nanosleep(&ts, NULL);
}

static void *other(void *arg) {
  (void)arg;
  if (syscall(SYS_setresgid, 2345, 2345, 2345) || syscall(SYS_setresuid, 1234, 1234, 1234)) {
    return NULL;
  }
  changed = 1;
  /* uid 1234 may not see into the test's directory: main watches GOFILE. */
  while (!go) nap();
  other_uid = syscall(SYS_getuid);
  other_gid = syscall(SYS_getgid);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;
  go_file = argv[2];
  pthread_t t;
  if (pthread_create(&t, NULL, other, NULL)) return 5;
  while (!changed) nap();
  write_all(out_fd, "ready\n", 6);
  while (access(go_file, F_OK) != 0) nap();
  go = 1;
  pthread_join(t, NULL);
  char line[160];
  long uid = syscall(SYS_getuid), gid = syscall(SYS_getgid);
  int n = snprintf(line, sizeof line, "main uid=%ld gid=%ld\nother uid=%ld gid=%ld\n%s\n", uid, gid,
                   other_uid, other_gid,
                   uid == 0 && gid == 0 && other_uid == 1234 && other_gid == 2345 ? "PASS" : "FAIL");
  write_all(out_fd, line, (size_t)n);
  return 0;
}
