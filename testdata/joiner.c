/*
 * joiner OUTFILE GOFILE
 *
 * Test target for amber: threads that are joined after a restore. Two
 * workers loop (10 ms sleeps) until GOFILE exists, then return their
 * count; a third thread locks a robust mutex and, once GOFILE exists,
 * exits holding it. Writes "ready" when all three run, then, once they
 * are done:
 *
 *   "join ok"        both workers and the robust thread were joined
 *   "robust ok"      locking the mutex then reported EOWNERDEAD (the
 *                    kernel walked the dead thread's robust list)
 *   "PASS"           all of the above; exit 0
 *
 * or "FAIL <what>" and exit 1. Joins and the lock wait at most 10 s, so a
 * lost clear_child_tid or robust list shows as FAIL, not as a hang.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static int out_fd;
static const char *go_file;
static pthread_mutex_t robust;

static void say(const char *s) {
  write_all(out_fd, s, strlen(s));
  write_all(out_fd, "\n", 1);
}

static void fail(const char *what, int err) {
  char line[128];
  snprintf(line, sizeof line, "FAIL %s: %s", what, strerror(err));
  say(line);
  exit(1);
}

static int go(void) { return access(go_file, F_OK) == 0; }

static void nap(void) {
  struct timespec ts = {0, 10 * 1000 * 1000};
  nanosleep(&ts, NULL);
}

static void *worker(void *arg) {
  (void)arg;
  long n = 0;
  while (!go()) {
    n++;
    nap();
  }
  return (void *)n;
}

static void *holder(void *arg) {
  (void)arg;
  int e = pthread_mutex_lock(&robust);
  if (e) fail("lock robust", e);
  while (!go()) nap();
  return NULL; /* still holding it */
}

static struct timespec in_10s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += 10;
  return ts;
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;
  go_file = argv[2];
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&robust, &a);

  pthread_t t[3];
  if (pthread_create(&t[0], NULL, holder, NULL)) return 5;
  if (pthread_create(&t[1], NULL, worker, NULL)) return 5;
  if (pthread_create(&t[2], NULL, worker, NULL)) return 5;
  /* The holder has the mutex once a trylock fails. */
  while (pthread_mutex_trylock(&robust) == 0) {
    pthread_mutex_unlock(&robust);
    nap();
  }
  say("ready");
  for (int i = 0; i < 3; i++) {
    struct timespec dl = in_10s();
    int e = pthread_timedjoin_np(t[i], NULL, &dl);
    if (e) fail(i ? "join worker" : "join holder", e);
  }
  say("join ok");
  struct timespec dl = in_10s();
  int e = pthread_mutex_timedlock(&robust, &dl);
  if (e != EOWNERDEAD) fail("robust lock", e ? e : EINVAL);
  say("robust ok");
  say("PASS");
  return 0;
}
