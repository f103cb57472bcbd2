/*
 * signals OUTFILE GOFILE
 * signals --queue PID SIGNAL VALUE     (sigqueue(PID, SIGNAL, VALUE) and exit)
 *
 * Test target for amber: signal state that must survive a dump and a
 * restore. Sets up, in this order:
 *
 *   SIGHUP, SIGINT      left at SIG_DFL, never touched (a restore must not
 *                       leave them ignored as amber's starter may)
 *   SIGPIPE             SIG_IGN
 *   SIGUSR1             a plain handler
 *   SIGUSR2             blocked everywhere, SA_SIGINFO handler
 *   SIGRTMIN+1          blocked everywhere, queued 3 times to the process
 *                       with values 1, 2, 3
 *   SIGRTMIN+2          blocked everywhere, queued once to thread T only
 *                       (value 77); T has a sigaltstack and the handler runs
 *                       on it (SA_ONSTACK)
 *
 * then writes "ready PID TID_OF_T". The test queues SIGUSR2 (value 4242)
 * from another process (signals --queue) and dumps. Once GOFILE exists
 * (holding the sender's pid), the main thread unblocks SIGUSR2 and
 * SIGRTMIN+1 and SIGRTMIN+2 (so a SIGRTMIN+2 wrongly queued to the whole
 * process would run on it), then T unblocks SIGRTMIN+2. Written then:
 *
 *   "dispositions ok"
 *   "usr2 value=4242 code=-1 pid=SENDER"
 *   "rt1 1 2 3"
 *   "rt2 tid=TID_OF_T onstack=1"
 *   "PASS" (exit 0)   or "FAIL <what>" (exit 1)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

static int out_fd;
static const char *go_file;
static pid_t t_tid;

static volatile int usr2_value = -1, usr2_code = 99, usr2_pid = -1, usr2_seen;
static volatile int rt1_values[8], rt1_count;
static volatile int rt2_tid, rt2_onstack = -1, rt2_seen;
static char altstack[64 * 1024];

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

static void on_usr1(int sig) { (void)sig; }

static void on_usr2(int sig, siginfo_t *si, void *uc) {
  (void)sig, (void)uc;
  usr2_value = si->si_value.sival_int;
  usr2_code = si->si_code;
  usr2_pid = si->si_pid;
  usr2_seen = 1;
}

static void on_rt1(int sig, siginfo_t *si, void *uc) {
  (void)sig, (void)uc;
  if (rt1_count < 8) rt1_values[rt1_count] = si->si_value.sival_int;
  rt1_count++;
}

static void on_rt2(int sig, siginfo_t *si, void *uc) {
  (void)sig, (void)si, (void)uc;
  char here;
  rt2_onstack = &here >= altstack && &here < altstack + sizeof altstack;
  rt2_tid = (int)syscall(SYS_gettid);
  rt2_seen = 1;
}

static void handle(int sig, void (*fn)(int, siginfo_t *, void *), int flags) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = fn;
  sa.sa_flags = SA_SIGINFO | flags;
  sigemptyset(&sa.sa_mask);
  if (sigaction(sig, &sa, NULL)) fail("sigaction");
}

static int go(void) { return access(go_file, F_OK) == 0; }

static volatile int t_ready, main_unblocked;

static void *thread_t(void *arg) {
  (void)arg;
  stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
  if (sigaltstack(&ss, NULL)) fail("sigaltstack");
  t_tid = (pid_t)syscall(SYS_gettid);
  union sigval v = {.sival_int = 77};
  if (pthread_sigqueue(pthread_self(), SIGRTMIN + 2, v)) fail("pthread_sigqueue");
  t_ready = 1;
  while (!main_unblocked) nap();
  sigset_t s;
  sigemptyset(&s);
  sigaddset(&s, SIGRTMIN + 2);
  pthread_sigmask(SIG_UNBLOCK, &s, NULL);
  return NULL;
}

static int is_handler(int sig, void *fn) {
  struct sigaction sa;
  sigaction(sig, NULL, &sa);
  return (void *)sa.sa_handler == fn;
}

int main(int argc, char **argv) {
  if (argc == 5 && strcmp(argv[1], "--queue") == 0) {
    union sigval v = {.sival_int = atoi(argv[4])};
    return sigqueue(atoi(argv[2]), atoi(argv[3]), v) ? 1 : 0;
  }
  if (argc != 3) return 2;
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;
  go_file = argv[2];

  signal(SIGPIPE, SIG_IGN);
  signal(SIGUSR1, on_usr1);
  handle(SIGUSR2, on_usr2, 0);
  handle(SIGRTMIN + 1, on_rt1, 0);
  handle(SIGRTMIN + 2, on_rt2, SA_ONSTACK);
  sigset_t blocked;
  sigemptyset(&blocked);
  sigaddset(&blocked, SIGUSR2);
  sigaddset(&blocked, SIGRTMIN + 1);
  sigaddset(&blocked, SIGRTMIN + 2);
  pthread_sigmask(SIG_BLOCK, &blocked, NULL);
  for (int i = 1; i <= 3; i++) {
    union sigval v = {.sival_int = i};
    if (sigqueue(getpid(), SIGRTMIN + 1, v)) fail("sigqueue");
  }
  pthread_t t;
  if (pthread_create(&t, NULL, thread_t, NULL)) return 5;
  while (!t_ready) nap();
  char line[160];
  snprintf(line, sizeof line, "ready %d %d", getpid(), t_tid);
  say(line);

  while (!go()) nap();
  char sender[32] = "";
  int fd = open(go_file, O_RDONLY);
  if (fd < 0 || read(fd, sender, sizeof sender - 1) < 0) fail("read gofile");
  close(fd);

  if (!is_handler(SIGHUP, SIG_DFL) || !is_handler(SIGINT, SIG_DFL)) fail("SIGHUP/SIGINT not SIG_DFL");
  if (!is_handler(SIGPIPE, SIG_IGN)) fail("SIGPIPE not ignored");
  if (!is_handler(SIGUSR1, on_usr1)) fail("SIGUSR1 handler lost");
  say("dispositions ok");

  pthread_sigmask(SIG_UNBLOCK, &blocked, NULL);
  main_unblocked = 1;
  pthread_join(t, NULL);
  for (int i = 0; i < 100 && !rt2_seen; i++) nap();

  snprintf(line, sizeof line, "usr2 value=%d code=%d pid=%d", usr2_value, usr2_code, usr2_pid);
  say(line);
  if (!usr2_seen || usr2_value != 4242 || usr2_code != SI_QUEUE || usr2_pid != atoi(sender)) {
    fail("usr2");
  }
  snprintf(line, sizeof line, "rt1");
  for (int i = 0; i < rt1_count && i < 8; i++) {
    snprintf(line + strlen(line), sizeof line - strlen(line), " %d", rt1_values[i]);
  }
  say(line);
  if (rt1_count != 3 || rt1_values[0] != 1 || rt1_values[1] != 2 || rt1_values[2] != 3) fail("rt1");
  snprintf(line, sizeof line, "rt2 tid=%d onstack=%d", rt2_tid, rt2_onstack);
  say(line);
  if (rt2_tid != t_tid || rt2_onstack != 1) fail("rt2");
  say("PASS");
  return 0;
}
