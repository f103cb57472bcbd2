/*
 * deadlines OUTFILE [SECONDS]
 *
 * Test target for amber: six threads each make one relative sleep of
 * SECONDS (default 3) that has no remaining-time buffer, so its deadline lives only in the kernel:
 *   usleep   usleep(3000000) (glibc: clock_nanosleep(REALTIME, 0, req, NULL))
 *   nano     the raw nanosleep syscall, rem NULL
 *   mono     clock_nanosleep(CLOCK_MONOTONIC, 0, req, NULL)
 *   boot     clock_nanosleep(CLOCK_BOOTTIME, 0, req, NULL)
 *   futex    futex(FUTEX_WAIT_PRIVATE) on a word nobody changes
 *   poll     poll(NULL, 0, SECONDS * 1000)
 * Writes "sleeping MS" (wall time, ms since the epoch, once every thread is
 * about to call), then per call as it ends "NAME START_MS ELAPSED_MS rc=RC"
 * (START_MS: wall time just before the call; ELAPSED_MS: by CLOCK_MONOTONIC,
 * CLOCK_BOOTTIME for boot; RC: the result, or -errno), then "done usr1=N":
 * how many SIGUSR1 the usleep thread took (only it has SIGUSR1 unblocked).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static int sleep_s = 3;
static int out_fd;
static pthread_barrier_t ready;
static int futex_word;
static volatile sig_atomic_t usr1;

static void on_usr1(int sig) {
  (void)sig;
  usr1++;
}

static long long ms_of(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static long call(const char *name) {
  struct timespec req = {sleep_s, 0};
  if (!strcmp(name, "usleep")) return usleep(sleep_s * 1000000) ? -errno : 0;
  if (!strcmp(name, "nano")) return syscall(SYS_nanosleep, &req, NULL) ? -errno : 0;
  if (!strcmp(name, "mono")) return -clock_nanosleep(CLOCK_MONOTONIC, 0, &req, NULL);
  if (!strcmp(name, "boot")) return -clock_nanosleep(CLOCK_BOOTTIME, 0, &req, NULL);
  if (!strcmp(name, "futex")) {
    return syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, &req, NULL, 0) ? -errno : 0;
  }
  if (!strcmp(name, "poll")) return poll(NULL, 0, sleep_s * 1000) < 0 ? -errno : 0;
  return -EINVAL;
}

static void *sleeper(void *arg) {
  const char *name = arg;
  clockid_t clock = strcmp(name, "boot") ? CLOCK_MONOTONIC : CLOCK_BOOTTIME;
  if (!strcmp(name, "usleep")) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
  }
  pthread_barrier_wait(&ready);
  long long start_ms = ms_of(CLOCK_REALTIME), t0 = ms_of(clock);
  long rc = call(name);
  char line[100];
  int n = snprintf(line, sizeof line, "%s %lld %lld rc=%ld\n", name, start_ms, ms_of(clock) - t0, rc);
  write_all(out_fd, line, (size_t)n);
  return NULL;
}

int main(int argc, char **argv) {
  static const char *names[] = {"usleep", "nano", "mono", "boot", "futex", "poll"};
  enum { N = sizeof names / sizeof *names };
  if (argc < 2 || argc > 3) return 2;
  if (argc == 3) sleep_s = atoi(argv[2]);
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  struct sigaction sa = {.sa_handler = on_usr1};
  sigaction(SIGUSR1, &sa, NULL);
  pthread_barrier_init(&ready, NULL, N + 1);
  pthread_t t[N];
  for (int i = 0; i < N; i++) {
    if (pthread_create(&t[i], NULL, sleeper, (void *)names[i])) return 5;
  }
  pthread_barrier_wait(&ready);
  char line[64];
  int n = snprintf(line, sizeof line, "sleeping %lld\n", ms_of(CLOCK_REALTIME));
  write_all(out_fd, line, (size_t)n);
  for (int i = 0; i < N; i++) pthread_join(t[i], NULL);
  n = snprintf(line, sizeof line, "done usr1=%d\n", (int)usr1);
  write_all(out_fd, line, (size_t)n);
  return 0;
}
