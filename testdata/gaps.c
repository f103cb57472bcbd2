/*
 * gaps OUTFILE MIB [WRITE_MIB_PER_S]
 *
 * Bench target for pauses: fills MIB MiB of private anonymous memory with
 * a pattern, then every 1 ms rewrites one of 64 hot pages and measures,
 * on CLOCK_MONOTONIC, the gap since its previous turn of the loop. Writes
 * "ready\n" once filled; on SIGUSR1 writes "gap US\n" (the longest gap
 * since the previous SIGUSR1, in microseconds) and, after checking every
 * word of the memory, "check ok" or "check BAD at OFFSET". Before the
 * check it also writes "gap-end US" (CLOCK_REALTIME, microseconds: when
 * the longest gap ended), so a timeline can place the pause.
 *
 * WRITE_MIB_PER_S: each turn of the loop also rewrites the next pages of
 * the memory, round and round, at about that rate: page p holds word(i)
 * plus its sweep (the sweeps before the cursor one more than those after),
 * so the check also catches a page that went back to an older write.
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
#include <time.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096u
#define HOT 64u

static volatile sig_atomic_t report_requested;
static void on_usr1(int sig) {
  (void)sig;
  report_requested = 1;
}

static uint64_t word(size_t i) { return ((uint64_t)i * 0x9E3779B97F4A7C15ULL) ^ 0x6A95ULL; }

/* The rolling rewrite: the next page to write and how many rounds were done. */
static size_t cursor;
static uint64_t sweep;

static uint64_t expected(size_t i) {
  size_t page = i / (PAGE / 8);
  return word(i) + (page < cursor ? sweep + 1 : sweep);
}

static void rewrite(uint64_t *mem, size_t pages, size_t n) {
  for (size_t k = 0; k < n; k++) {
    uint64_t *p = mem + cursor * (PAGE / 8);
    for (size_t w = 0; w < PAGE / 8; w++) p[w] = word(cursor * (PAGE / 8) + w) + sweep + 1;
    if (++cursor == pages) {
      cursor = 0;
      sweep++;
    }
  }
}

static int64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t real_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int main(int argc, char **argv) {
  if (argc != 3 && argc != 4) return 2;
  if (getsid(0) != getpid() && setsid() < 0) return 4;
  size_t bytes = strtoull(argv[2], NULL, 10) << 20;
  size_t words = bytes / 8;
  /* Pages per turn of ~1 ms (a turn is a bit longer than its sleep: about the rate asked). */
  size_t per_turn = argc == 4 ? (strtoull(argv[3], NULL, 10) << 20) / PAGE / 1000 : 0;
  uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint64_t *hot = mmap(NULL, HOT * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED || hot == MAP_FAILED) return 5;
  for (size_t i = 0; i < words; i++) mem[i] = word(i);
  int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 6;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGUSR1, &sa, NULL) < 0) return 7;
  write_all(fd, "ready\n", 6);
  char line[128];
  int64_t last = now_us(), longest = 0, longest_end = 0;
  for (uint64_t turn = 0;; turn++) {
    uint64_t *p = hot + (turn % HOT) * (PAGE / 8);
    for (size_t w = 0; w < PAGE / 8; w++) p[w] = turn;
    rewrite(mem, bytes / PAGE, per_turn);
    int64_t t = now_us();
    if (t - last > longest) {
      longest = t - last;
      longest_end = real_us();
    }
    last = t;
    if (report_requested) {
      report_requested = 0;
      int len = snprintf(line, sizeof line, "gap %lld\n", (long long)longest);
      write_all(fd, line, (size_t)len);
      len = snprintf(line, sizeof line, "gap-end %lld\n", (long long)longest_end);
      write_all(fd, line, (size_t)len);
      size_t bad = words;
      for (size_t i = 0; i < words && bad == words; i++)
        if (mem[i] != expected(i)) bad = i;
      len = bad == words ? snprintf(line, sizeof line, "check ok\n")
                         : snprintf(line, sizeof line, "check BAD at %zu\n", bad * 8);
      write_all(fd, line, (size_t)len);
      longest = 0;
      last = now_us();
    }
    struct timespec ts = {0, 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}
