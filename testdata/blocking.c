/*
 * blocking OUTFILE
 *
 * Test target for amber: one thread per interruptible system call, each
 * spending nearly all its time blocked in that call, so that a dump catches
 * every one of them in the middle of it. A restore must restart each call
 * the way the kernel would after a stop: the program must never see EINTR,
 * a different result, or a call that returns before its time is up.
 *
 * Thread NAME loops: reads CLOCK_MONOTONIC, makes its call, checks the
 * result and that at least the requested time has passed, and writes one
 * line (one write(2), under a mutex) to OUTFILE:
 *
 *   "T<NAME> N ok"               the call behaved as without interruption
 *   "T<NAME> N EINTR"            it failed with EINTR
 *   "T<NAME> N BAD <details>"    any other result, or an early return
 *
 * N counts from 0 per thread. The threads and their calls:
 *
 *   nanosleep   nanosleep(2) (raw syscall), relative 40 ms          -> 0
 *   clockabs    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) +45 ms -> 0
 *   poll        poll(NULL, 0, 50)                                   -> 0
 *   ppoll       ppoll(NULL, 0, 55 ms, NULL)                         -> 0
 *   select      select(0, NULL, NULL, NULL, 60 ms)                  -> 0
 *   futex       futex(FUTEX_WAIT_PRIVATE), relative 35 ms           -> ETIMEDOUT
 *   futexabs    futex(FUTEX_WAIT_BITSET_PRIVATE), monotonic +65 ms  -> ETIMEDOUT
 *   condtimed   pthread_cond_timedwait (monotonic clock), +70 ms    -> ETIMEDOUT
 *   signal      nanosleep 30 ms (glibc), then signals `condwait`    -> 0
 *   condwait    pthread_cond_wait until `signal` has moved on; checks the
 *               sequence it sees only grows
 *
 * The main thread waits in pthread_join. Never touches stdout/stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MS 1000000LL

static int out_fd;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

#include "common.h"

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec to_ts(long long ns) {
  struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
  return ts;
}

/* Writes the line for call N of thread NAME: ret is the call's result, err
   its errno (0 if none), want_ret/want_err what it must be, t0 the time
   before the call and min_ns how long it must at least have taken. */
static void report(const char *name, unsigned long long n, long ret, int err, long want_ret,
                   int want_err, long long t0, long long min_ns) {
  char line[160];
  long long took = now_ns() - t0;
  int len;
  if (ret == want_ret && err == want_err && took >= min_ns) {
    len = snprintf(line, sizeof line, "T%s %llu ok\n", name, n);
  } else if (err == EINTR) {
    len = snprintf(line, sizeof line, "T%s %llu EINTR\n", name, n);
  } else {
    len = snprintf(line, sizeof line, "T%s %llu BAD ret %ld errno %d (%s) after %lld us\n", name,
                   n, ret, err, strerror(err), took / 1000);
  }
  pthread_mutex_lock(&out_lock);
  write_all(out_fd, line, (size_t)len);
  pthread_mutex_unlock(&out_lock);
}

static void *t_nanosleep(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    struct timespec req = to_ts(40 * MS), rem;
    long long t0 = now_ns();
    long r = syscall(SYS_nanosleep, &req, &rem);
    report("nanosleep", n, r, r ? errno : 0, 0, 0, t0, 40 * MS);
  }
  return NULL;
}

static void *t_clockabs(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    long long t0 = now_ns();
    struct timespec deadline = to_ts(t0 + 45 * MS);
    /* Returns the error number itself. */
    int err = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL);
    report("clockabs", n, err ? -1 : 0, err, 0, 0, t0, 45 * MS);
  }
  return NULL;
}

static void *t_poll(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    long long t0 = now_ns();
    int r = poll(NULL, 0, 50);
    report("poll", n, r, r < 0 ? errno : 0, 0, 0, t0, 50 * MS);
  }
  return NULL;
}

static void *t_ppoll(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    struct timespec ts = to_ts(55 * MS);
    long long t0 = now_ns();
    int r = ppoll(NULL, 0, &ts, NULL);
    report("ppoll", n, r, r < 0 ? errno : 0, 0, 0, t0, 55 * MS);
  }
  return NULL;
}

static void *t_select(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    struct timeval tv = {0, 60 * 1000};
    long long t0 = now_ns();
    int r = select(0, NULL, NULL, NULL, &tv);
    report("select", n, r, r < 0 ? errno : 0, 0, 0, t0, 60 * MS);
  }
  return NULL;
}

static uint32_t futex_word; /* never changes: every wait times out */

static void *t_futex(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    struct timespec rel = to_ts(35 * MS);
    long long t0 = now_ns();
    long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, &rel, NULL, 0);
    report("futex", n, r, r < 0 ? errno : 0, -1, ETIMEDOUT, t0, 35 * MS);
  }
  return NULL;
}

static void *t_futexabs(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    long long t0 = now_ns();
    struct timespec deadline = to_ts(t0 + 65 * MS);
    long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_BITSET_PRIVATE, 0, &deadline, NULL,
                     FUTEX_BITSET_MATCH_ANY);
    report("futexabs", n, r, r < 0 ? errno : 0, -1, ETIMEDOUT, t0, 65 * MS);
  }
  return NULL;
}

static pthread_mutex_t cond_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t timed_cond; /* never signalled; monotonic clock */
static pthread_cond_t seq_cond = PTHREAD_COND_INITIALIZER;
static unsigned long long seq;

static void *t_condtimed(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    long long t0 = now_ns();
    struct timespec deadline = to_ts(t0 + 70 * MS);
    pthread_mutex_lock(&cond_lock);
    int err = pthread_cond_timedwait(&timed_cond, &cond_lock, &deadline);
    pthread_mutex_unlock(&cond_lock);
    report("condtimed", n, err ? -1 : 0, err, -1, ETIMEDOUT, t0, 70 * MS);
  }
  return NULL;
}

static void *t_signal(void *arg) {
  (void)arg;
  for (unsigned long long n = 0;; n++) {
    struct timespec req = to_ts(30 * MS);
    long long t0 = now_ns();
    int r = nanosleep(&req, NULL);
    report("signal", n, r, r ? errno : 0, 0, 0, t0, 30 * MS);
    pthread_mutex_lock(&cond_lock);
    seq++;
    pthread_cond_signal(&seq_cond);
    pthread_mutex_unlock(&cond_lock);
  }
  return NULL;
}

static void *t_condwait(void *arg) {
  (void)arg;
  unsigned long long seen = 0;
  for (unsigned long long n = 0;; n++) {
    long long t0 = now_ns();
    pthread_mutex_lock(&cond_lock);
    unsigned long long before = seen;
    int err = 0;
    while (seq == seen && err == 0) err = pthread_cond_wait(&seq_cond, &cond_lock);
    if (err == 0) seen = seq;
    pthread_mutex_unlock(&cond_lock);
    /* A new sequence number, greater than the last one seen. */
    report("condwait", n, seen > before ? 0 : -1, err, 0, 0, t0, 0);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;

  pthread_condattr_t attr;
  if (pthread_condattr_init(&attr) != 0 ||
      pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 ||
      pthread_cond_init(&timed_cond, &attr) != 0) {
    return 5;
  }

  void *(*fns[])(void *) = {t_nanosleep, t_clockabs, t_poll,   t_ppoll,  t_select,
                            t_futex,     t_futexabs, t_condtimed, t_signal, t_condwait};
  size_t count = sizeof fns / sizeof fns[0];
  pthread_t tids[sizeof fns / sizeof fns[0]];
  for (size_t i = 0; i < count; i++) {
    if (pthread_create(&tids[i], NULL, fns[i], NULL) != 0) return 5;
  }
  for (size_t i = 0; i < count; i++) pthread_join(tids[i], NULL);
  return 0;
}
