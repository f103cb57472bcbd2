/*
 * overrun OUTFILE MODE
 *
 * Test target for amber: a POSIX timer (SIGRTMIN+2, every 1 ms) whose
 * signal stays blocked while it expires many times.
 *   MODE "delivered": takes the signal once with sigwaitinfo: then
 *     timer_getoverrun() is > 0 (the expiries missed before it).
 *   MODE "pending": leaves the signal pending; once the file GO (argv[3])
 *     exists, waits 20 ms (the timer keeps expiring) and takes the signal:
 *     writes "PASS" if it is the timer's own (SI_TIMER, its value, some
 *     overruns counted), else "FAIL ...".
 *   MODE "slow": a 10 s timer armed 3.5 intervals in the past, its signal
 *     taken at once: timer_getoverrun() is 3 and the next expiry 5 s away
 *     (nothing pending meanwhile).
 *   With GO in "delivered" or "slow": once GO exists, checks that
 *     timer_getoverrun() is what it was, then takes the timer's next signal:
 *     "PASS", or "FAIL ..." naming what differs.
 * The timer stays armed (timer_settime would reset the overrun count).
 * Writes "ready OVERRUN" (timer_getoverrun, or -1 while still pending)
 * and then sleeps until killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#include "common.h"

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
  int sig = SIGRTMIN + 2;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  sigprocmask(SIG_BLOCK, &set, NULL);
  struct sigevent sev = {0};
  sev.sigev_notify = SIGEV_SIGNAL;
  sev.sigev_signo = sig;
  sev.sigev_value.sival_int = 4242;
  timer_t t;
  if (timer_create(CLOCK_MONOTONIC, &sev, &t)) return 3;
  struct itimerspec on = {{0, 1000000}, {0, 1000000}};
  int overrun = -1;
  if (strcmp(argv[2], "slow") == 0) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    struct itimerspec past = {{10, 0}, {now.tv_sec - 35, now.tv_nsec}};
    timer_settime(t, TIMER_ABSTIME, &past, NULL);
    siginfo_t si;
    sigwaitinfo(&set, &si);
    overrun = timer_getoverrun(t);
  } else {
    timer_settime(t, 0, &on, NULL);
  }
  for (; strcmp(argv[2], "slow") != 0;) {
    struct timespec nap = {0, 20000000};
    nanosleep(&nap, NULL);
    if (strcmp(argv[2], "pending") == 0) break;
    siginfo_t si;
    sigwaitinfo(&set, &si);
    overrun = timer_getoverrun(t);
    if (overrun > 0) break;
  }
  char line[64];
  int n = snprintf(line, sizeof line, "ready %d\n", overrun);
  write_all(out, line, (size_t)n);
  if (argc < 4) for (;;) pause();
  while (access(argv[3], F_OK) != 0) {
    struct timespec nap = {0, 10000000};
    nanosleep(&nap, NULL);
  }
  if (strcmp(argv[2], "pending") != 0) {
    int now = timer_getoverrun(t);
    siginfo_t si;
    sigwaitinfo(&set, &si);
    if (now == overrun && si.si_code == SI_TIMER && si.si_value.sival_int == 4242) {
      n = snprintf(line, sizeof line, "PASS\n");
    } else {
      n = snprintf(line, sizeof line, "FAIL overrun %d (was %d) code %d value %d\n", now, overrun,
                   si.si_code, si.si_value.sival_int);
    }
    write_all(out, line, (size_t)n);
    for (;;) pause();
  }
  struct timespec nap = {0, 20000000};
  nanosleep(&nap, NULL);
  siginfo_t si;
  sigwaitinfo(&set, &si);
  if (si.si_code == SI_TIMER && si.si_value.sival_int == 4242 && si.si_overrun > 0) {
    n = snprintf(line, sizeof line, "PASS\n");
  } else {
    n = snprintf(line, sizeof line, "FAIL code %d value %d overrun %d\n", si.si_code,
                 si.si_value.sival_int, si.si_overrun);
  }
  write_all(out, line, (size_t)n);
  for (;;) pause();
}
