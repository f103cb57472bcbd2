/*
 * timers OUTFILE GOFILE
 *
 * Test target for amber: timers that must keep firing after a restore.
 *
 *   ITIMER_REAL      every 30 ms (SIGALRM)
 *   ITIMER_VIRTUAL   every 20 ms of user CPU (SIGVTALRM)
 *   ITIMER_PROF      every 25 ms of CPU (SIGPROF)
 *   POSIX timer 0    CLOCK_MONOTONIC, SIGRTMIN+3, value 100, every 25 ms
 *   POSIX timer 2    CLOCK_REALTIME, SIGEV_THREAD_ID to thread W,
 *                    SIGRTMIN+4, value 200, every 35 ms
 *   POSIX timer 4    CLOCK_MONOTONIC, SIGEV_NONE, one shot in 1000 s
 *   (timers 1 and 3 were created and deleted: the ids have gaps)
 *
 * Writes "ready" once each has fired (timer 4 aside). Once GOFILE exists,
 * it forgets the counts, burns CPU until every timer has fired 3 more
 * times (at most 20 s), checks the intervals the kernel reports, that ids
 * 1 and 3 do not exist, that timer 4 is still armed, and that timer 2's
 * signals ran on W, then writes "PASS" (exit 0) or "FAIL <what>" (exit 1).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static int out_fd;
static const char *go_file;
static volatile int n_real, n_virt, n_prof, n_t0, n_t2, t2_wrong;
static volatile pid_t w_tid;
static timer_t tm[5];

static void say(const char *s) {
  write_all(out_fd, s, strlen(s));
  write_all(out_fd, "\n", 1);
}

static void fail(const char *what) {
  char line[160];
  snprintf(line, sizeof line, "FAIL %s", what);
  say(line);
  exit(1);
}

static void nap(void) {
  struct timespec ts = {0, 10 * 1000 * 1000};
  nanosleep(&ts, NULL);
}

static void on_sig(int sig, siginfo_t *si, void *uc) {
  (void)uc;
  if (sig == SIGALRM) n_real++;
  else if (sig == SIGVTALRM) n_virt++;
  else if (sig == SIGPROF) n_prof++;
  else if (sig == SIGRTMIN + 3 && si->si_value.sival_int == 100) n_t0++;
  else if (sig == SIGRTMIN + 4 && si->si_value.sival_int == 200) {
    n_t2++;
    if ((pid_t)syscall(SYS_gettid) != w_tid) t2_wrong = 1;
  }
}

static void *thread_w(void *arg) {
  (void)arg;
  w_tid = (pid_t)syscall(SYS_gettid);
  for (;;) nap();
  return NULL;
}

static void make_timer(int i, clockid_t clock, int notify, int sig, int value, pid_t tid) {
  struct sigevent se;
  memset(&se, 0, sizeof se);
  se.sigev_notify = notify;
  se.sigev_signo = sig;
  se.sigev_value.sival_int = value;
  se._sigev_un._tid = tid;
  if (timer_create(clock, &se, &tm[i])) fail("timer_create");
  if ((long)tm[i] != i) fail("timer ids are not 0, 1, 2...");
}

static void arm(int i, long value_ms, long interval_ms) {
  struct itimerspec its = {{interval_ms / 1000, interval_ms % 1000 * 1000000},
                           {value_ms / 1000, value_ms % 1000 * 1000000}};
  if (timer_settime(tm[i], 0, &its, NULL)) fail("timer_settime");
}

static void itimer(int which, long ms) {
  struct itimerval it = {{0, ms * 1000}, {0, ms * 1000}};
  if (setitimer(which, &it, NULL)) fail("setitimer");
}

static int all_fired(int n) {
  return n_real >= n && n_virt >= n && n_prof >= n && n_t0 >= n && n_t2 >= n;
}

static long long interval_ms(int i) {
  struct itimerspec its;
  if (timer_gettime(tm[i], &its)) return -1;
  return its.it_interval.tv_sec * 1000LL + its.it_interval.tv_nsec / 1000000;
}

static long itimer_interval_ms(int which) {
  struct itimerval it;
  getitimer(which, &it);
  return it.it_interval.tv_sec * 1000 + it.it_interval.tv_usec / 1000;
}

static volatile unsigned long sink;

static void burn_until(int n, int seconds) {
  time_t end = time(NULL) + seconds;
  while (!all_fired(n) && time(NULL) < end) {
    for (int i = 0; i < 100000; i++) sink += (unsigned long)i * i;
  }
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;
  go_file = argv[2];
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sig;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  int sigs[] = {SIGALRM, SIGVTALRM, SIGPROF, SIGRTMIN + 3, SIGRTMIN + 4};
  for (int i = 0; i < 5; i++) sigaction(sigs[i], &sa, NULL);
  /* Only W takes timer 2's signal; the others may run anywhere. */
  pthread_t w;
  if (pthread_create(&w, NULL, thread_w, NULL)) return 5;
  while (!w_tid) nap();

  make_timer(0, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 3, 100, 0);
  make_timer(1, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
  make_timer(2, CLOCK_REALTIME, SIGEV_THREAD_ID, SIGRTMIN + 4, 200, w_tid);
  make_timer(3, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
  make_timer(4, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
  timer_delete(tm[1]);
  timer_delete(tm[3]);
  arm(0, 25, 25);
  arm(2, 35, 35);
  arm(4, 1000 * 1000, 0);
  itimer(ITIMER_REAL, 30);
  itimer(ITIMER_VIRTUAL, 20);
  itimer(ITIMER_PROF, 25);
  burn_until(1, 20);
  if (!all_fired(1)) fail("timers did not fire before the dump");
  say("ready");

  while (access(go_file, F_OK) != 0) nap();
  n_real = n_virt = n_prof = n_t0 = n_t2 = 0;
  burn_until(3, 20);
  char line[200];
  snprintf(line, sizeof line, "fired real=%d virt=%d prof=%d t0=%d t2=%d", n_real, n_virt, n_prof,
           n_t0, n_t2);
  if (!all_fired(3)) fail(line);
  if (t2_wrong) fail("timer 2 signalled another thread than W");
  if (interval_ms(0) != 25 || interval_ms(2) != 35 || interval_ms(4) != 0) fail("POSIX intervals");
  struct itimerspec its;
  if (timer_gettime((timer_t)1, &its) == 0 || timer_gettime((timer_t)3, &its) == 0) {
    fail("deleted timer ids 1 or 3 exist");
  }
  if (timer_gettime(tm[4], &its) || its.it_value.tv_sec <= 0) fail("timer 4 not armed");
  if (itimer_interval_ms(ITIMER_REAL) != 30 || itimer_interval_ms(ITIMER_VIRTUAL) != 20 ||
      itimer_interval_ms(ITIMER_PROF) != 25) {
    fail("itimer intervals");
  }
  say("PASS");
  return 0;
}
