/*
 * sleeper OUTFILE
 *
 * Test target for amber: two threads sleep 6 s each, one in glibc's
 * nanosleep (the clock_nanosleep syscall), one in the raw nanosleep
 * syscall, both with a remaining-time buffer. Writes "sleeping MS" (the
 * wall time, ms since the epoch, before the sleeps begin), then one line
 * per sleep as it ends: "NAME ELAPSED_MS rc=RC", then "done".
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
static long long start_ms;

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void report(const char *name, long rc) {
  char line[100];
  int n = snprintf(line, sizeof line, "%s %lld rc=%ld\n", name, now_ms() - start_ms, rc);
  write_all(out_fd, line, (size_t)n);
}

static void *raw_sleeper(void *arg) {
  (void)arg;
  struct timespec req = {6, 0}, rem;
  report("raw", syscall(SYS_nanosleep, &req, &rem));
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;
  start_ms = now_ms();
  char line[64];
  int n = snprintf(line, sizeof line, "sleeping %lld\n", start_ms);
  write_all(out_fd, line, (size_t)n);
  pthread_t t;
  if (pthread_create(&t, NULL, raw_sleeper, NULL)) return 5;
  struct timespec req = {6, 0}, rem;
  report("glibc", nanosleep(&req, &rem));
  pthread_join(t, NULL);
  write_all(out_fd, "done\n", 5);
  return 0;
}
