/*
 * lazytree OUTDIR MIB
 *
 * Test target for lazy restore. A parent (in a new session) and a child
 * (forked at start) each hold MIB MiB of private anonymous memory with a
 * pattern of their own, and write "N\n" (a generation) to OUTDIR/parent.txt
 * or OUTDIR/child.txt every 20 ms. On a signal each acts on its memory and
 * writes what it found:
 * - SIGUSR1: checks every word: "check ok" or "check BAD at OFF";
 * - SIGUSR2: forks a process that checks every word and exits 0 or 1:
 *   "fork ok" or "fork BAD";
 * - SIGWINCH: drops 1 MiB in the middle with MADV_DONTNEED (must read as
 *   zeros), moves the last quarter elsewhere with mremap and then back and
 *   forth between two places MOVES times (must keep its words), unmaps the
 *   first MiB, and checks: "ops ok" or "ops BAD at OFF".
 *   Later checks know about these changes.
 * Never touches stdout/stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define MIB (1024u * 1024u)

static volatile sig_atomic_t want_check, want_fork, want_ops;
static void on_signal(int sig) {
  if (sig == SIGUSR1) want_check = 1;
  if (sig == SIGUSR2) want_fork = 1;
  if (sig == SIGWINCH) want_ops = 1;
}

static uint64_t seed;
static uint64_t *mem, *moved;
static size_t words, moved_from, moved_words;
static int ops_done;
static int out_fd;

static uint64_t word_at(size_t off) { return ((uint64_t)off * 0x9E3779B97F4A7C15ULL) ^ seed; }

static void say(const char *s) { write_all(out_fd, s, strlen(s)); }

/* First bad word offset (in bytes), or -1. */
static long long check_all(void) {
  size_t drop_lo = words / 2, drop_hi = words / 2 + MIB / 8;
  size_t end = ops_done ? moved_from : words;
  for (size_t i = ops_done ? MIB / 8 : 0; i < end; i++) {
    uint64_t want = ops_done && i >= drop_lo && i < drop_hi ? 0 : word_at(i * 8);
    if (mem[i] != want) return (long long)i * 8;
  }
  for (size_t i = 0; ops_done && i < moved_words; i++) {
    if (moved[i] != word_at((moved_from + i) * 8)) return (long long)(moved_from + i) * 8;
  }
  return -1;
}

static void report(const char *what, long long bad) {
  char line[96];
  if (bad < 0) snprintf(line, sizeof line, "%s ok\n", what);
  else snprintf(line, sizeof line, "%s BAD at %lld\n", what, bad);
  say(line);
}

/*
 * Moves after the first: each mremap is one amber hears of only after the
 * kernel moved the pages, while it may be copying pages of that quarter to
 * where they were (a lazy restore's race, so the test meets it often). A
 * pause of 0 to 500 us before each, different every time, lets the moves
 * fall at every point of amber's copies.
 */
#define MOVES 200

static void spin_us(long us) {
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  do clock_gettime(CLOCK_MONOTONIC, &t);
  while ((t.tv_sec - t0.tv_sec) * 1000000L + (t.tv_nsec - t0.tv_nsec) / 1000 < us);
}

static void do_ops(void) {
  if (madvise(mem + words / 2, MIB, MADV_DONTNEED)) _exit(4);
  moved_from = words - words / 4;
  moved_words = words / 4;
  size_t len = moved_words * 8;
  void *a = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void *b = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (a == MAP_FAILED || b == MAP_FAILED) _exit(5);
  moved = mremap(mem + moved_from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, a);
  for (int i = 0; i < MOVES && moved != MAP_FAILED; i++) {
    spin_us(i * 37 % 500);
    moved = mremap(moved, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, moved == a ? b : a);
  }
  if (moved == MAP_FAILED) _exit(6);
  if (munmap(mem, MIB)) _exit(7);
  ops_done = 1;
  report("ops", check_all());
}

static void do_fork(void) {
  pid_t p = fork();
  if (p < 0) _exit(8);
  if (p == 0) _exit(check_all() < 0 ? 0 : 1);
  int st;
  while (waitpid(p, &st, 0) < 0 && errno == EINTR) {
  }
  say(WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "fork ok\n" : "fork BAD\n");
}

static void run(const char *path) {
  out_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
  if (out_fd < 0) _exit(2);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGUSR1, &sa, NULL);
  sigaction(SIGUSR2, &sa, NULL);
  sigaction(SIGWINCH, &sa, NULL);
  for (uint64_t gen = 0;; gen++) {
    if (want_check) want_check = 0, report("check", check_all());
    if (want_fork) want_fork = 0, do_fork();
    if (want_ops && !ops_done) want_ops = 0, do_ops();
    char line[32];
    snprintf(line, sizeof line, "%llu\n", (unsigned long long)gen);
    say(line);
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  size_t bytes = (size_t)atoi(argv[2]) * MIB;
  words = bytes / 8;
  mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 3;
  char path[4096];
  setsid();
  pid_t child = fork();
  if (child < 0) return 4;
  seed = child == 0 ? 0xC41DULL : 0xBA5EULL;
  for (size_t i = 0; i < words; i++) mem[i] = word_at(i * 8);
  snprintf(path, sizeof path, "%s/%s.txt", argv[1], child == 0 ? "child" : "parent");
  run(path);
}
