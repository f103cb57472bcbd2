/*
 * sweeper OUTFILE MIB [--churn] [--threads N] [--setsid]
 *
 * Test target for the copy-on-write snapshot of dump -R: it keeps writing
 * its memory while the dump copies it, and checks itself.
 *
 * Memory: MIB MiB of private anonymous memory, plus 1 MiB each of shared
 * anonymous memory, of private memory under MADV_DONTFORK and of private
 * memory under MADV_WIPEONFORK, seen as one row of pages. Every page
 * holds three words (first, middle, last) that say which sweep wrote it.
 * In a loop of ~1 ms it writes the next PER_TICK pages with sweep g (after
 * checking that each still holds sweep g-1), then sleeps 1 ms; at the
 * end of the row g grows. So at any instant the pages before the cursor
 * hold g and the others g-1: an image that is not one instant of this
 * memory (a page copied after the freeze was written over) breaks the
 * rule, and the sweeper sees it when it reaches that page after restore.
 *
 * It measures the longest gap between two ticks (the time it was frozen
 * or stopped in a fault). Every 20 ms it writes "G CURSOR MAXGAP_US BAD"
 * to OUTFILE. SIGUSR2 resets the longest gap. On SIGUSR1 it checks every
 * page and writes "check ok" or "check BAD ...".
 *
 * --churn: each tick also maps a 256 KiB private region, writes it,
 * moves it with mremap and unmaps it, and unmaps the TAIL_BYTES just past
 * the private memory (mapped with it) and maps them again, written: memory
 * that comes and goes while a dump copies, some of it there at the freeze
 * and gone a tick later. It also resizes one more private region (never
 * touched) to 1..4096 pages by the tick's number, so that two freezes
 * ticks apart never find the same mappings.
 *
 * --threads N: N more threads each sweep a 1 MiB private region of their
 * own the same way, checking each page before they write it (a bad page
 * counts in BAD).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
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
#define PER_TICK 32
#define EXTRA_BYTES (1u << 20)
#define CHURN_BYTES (256u << 10)
#define TAIL_BYTES (8u << 20)

static volatile sig_atomic_t check_requested, reset_requested;
static void on_usr1(int sig) {
  (void)sig;
  check_requested = 1;
}
static void on_usr2(int sig) {
  (void)sig;
  reset_requested = 1;
}

struct region {
  unsigned char *base;
  size_t pages;
  const char *name;
};
static struct region regions[4];
static size_t total_pages;
static uint64_t bad;

static uint64_t word(uint64_t gen, size_t page) { return (gen << 40) ^ (page * 0x9E3779B97F4A7C15ULL); }

static uint64_t *page_at(size_t page) {
  for (int r = 0; r < 4; r++) {
    if (page < regions[r].pages) return (uint64_t *)(regions[r].base + page * PAGE);
    page -= regions[r].pages;
  }
  abort();
}

static const size_t OFFS[3] = {0, PAGE / 16, PAGE / 8 - 1};

static int holds(size_t page, uint64_t gen) {
  uint64_t *p = page_at(page);
  for (int i = 0; i < 3; i++)
    if (p[OFFS[i]] != word(gen, page)) return 0;
  return 1;
}

static void put(size_t page, uint64_t gen) {
  uint64_t *p = page_at(page);
  for (int i = 0; i < 3; i++) p[OFFS[i]] = word(gen, page);
}

static uint64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static void *map_anon(size_t bytes, int flags) {
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) _exit(5);
  return p;
}

/* One more writer: its own region, sweep and cursor (on its stack, so in the image). */
static void *sweep_alone(void *arg) {
  size_t base = (size_t)arg * (1u << 20);
  size_t pages = EXTRA_BYTES / PAGE;
  uint64_t *mem = map_anon(EXTRA_BYTES, MAP_PRIVATE);
  for (size_t p = 0; p < pages; p++) mem[p * (PAGE / 8)] = word(0, base + p);
  uint64_t gen = 1;
  size_t cursor = 0;
  for (;;) {
    for (int i = 0; i < PER_TICK; i++) {
      uint64_t *w = mem + cursor * (PAGE / 8);
      if (*w != word(gen - 1, base + cursor)) __atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
      *w = word(gen, base + cursor);
      if (++cursor == pages) {
        cursor = 0;
        gen++;
      }
    }
    struct timespec ts = {0, 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return NULL;
}

static unsigned char *tail;
static void *grown;
static size_t grown_bytes, ticks;

static void churn(void) {
  size_t want = (ticks++ % 4096 + 1) * PAGE;
  void *g = grown ? mremap(grown, grown_bytes, want, MREMAP_MAYMOVE) : map_anon(want, MAP_PRIVATE);
  if (g == MAP_FAILED) _exit(5);
  grown = g;
  grown_bytes = want;
  if (munmap(tail, TAIL_BYTES) != 0) _exit(5);
  if (mmap(tail, TAIL_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
           0) != tail)
    _exit(5);
  for (size_t i = 0; i < TAIL_BYTES; i += PAGE) tail[i] = 1;
  unsigned char *a = map_anon(CHURN_BYTES, MAP_PRIVATE);
  memset(a, 0x5a, CHURN_BYTES);
  unsigned char *b = mremap(a, CHURN_BYTES, 2 * CHURN_BYTES, MREMAP_MAYMOVE);
  if (b == MAP_FAILED) _exit(5);
  for (size_t i = 0; i < CHURN_BYTES; i += PAGE)
    if (b[i] != 0x5a) bad++;
  munmap(b, 2 * CHURN_BYTES);
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  int do_churn = 0;
  long threads = 0;
  for (int i = 3; i < argc; i++) {
    if (strcmp(argv[i], "--churn") == 0) do_churn = 1;
    else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = strtol(argv[++i], NULL, 10);
    else if (strcmp(argv[i], "--setsid") == 0) {
      if (setsid() < 0) return 4;
    } else return 2;
  }
  size_t bytes = strtoull(argv[2], NULL, 10) << 20;
  regions[0] = (struct region){map_anon(bytes + TAIL_BYTES, MAP_PRIVATE), bytes / PAGE, "private"};
  tail = regions[0].base + bytes;
  regions[1] = (struct region){map_anon(EXTRA_BYTES, MAP_SHARED), EXTRA_BYTES / PAGE, "shared"};
  regions[2] = (struct region){map_anon(EXTRA_BYTES, MAP_PRIVATE), EXTRA_BYTES / PAGE, "dontfork"};
  regions[3] = (struct region){map_anon(EXTRA_BYTES, MAP_PRIVATE), EXTRA_BYTES / PAGE, "wipeonfork"};
  if (madvise(regions[2].base, EXTRA_BYTES, MADV_DONTFORK) != 0) return 5;
  if (madvise(regions[3].base, EXTRA_BYTES, MADV_WIPEONFORK) != 0) return 5;
  for (int r = 0; r < 4; r++) total_pages += regions[r].pages;
  /* Sweep 0 fills every page (all present), sweep 1 starts. */
  for (size_t p = 0; p < total_pages; p++) put(p, 0);

  int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 6;
  signal(SIGUSR1, on_usr1);
  signal(SIGUSR2, on_usr2);
  for (long t = 1; t <= threads; t++) {
    pthread_t th;
    if (pthread_create(&th, NULL, sweep_alone, (void *)t) != 0) return 7;
  }

  uint64_t gen = 1, max_gap = 0, last = now_us(), last_line = 0;
  size_t cursor = 0;
  char line[160];
  for (;;) {
    for (int i = 0; i < PER_TICK; i++) {
      if (!holds(cursor, gen - 1)) bad++;
      put(cursor, gen);
      if (++cursor == total_pages) {
        cursor = 0;
        gen++;
      }
    }
    if (do_churn) churn();
    struct timespec ts = {0, 1000 * 1000};
    nanosleep(&ts, NULL);
    uint64_t t = now_us();
    if (reset_requested) {
      reset_requested = 0;
      max_gap = 0;
    } else if (t - last > max_gap) {
      max_gap = t - last;
    }
    last = t;
    if (t - last_line >= 20000) {
      last_line = t;
      int n = snprintf(line, sizeof line, "%llu %zu %llu %llu\n", (unsigned long long)gen, cursor,
                       (unsigned long long)max_gap, (unsigned long long)bad);
      write_all(fd, line, (size_t)n);
    }
    if (check_requested) {
      check_requested = 0;
      int n = 0;
      for (size_t p = 0; p < total_pages && !n; p++) {
        if (!holds(p, p < cursor ? gen : gen - 1))
          n = snprintf(line, sizeof line, "check BAD at page %zu of %zu (gen %llu cursor %zu)\n",
                       p, total_pages, (unsigned long long)gen, cursor);
      }
      if (!n && bad) n = snprintf(line, sizeof line, "check BAD %llu pages on the way\n",
                                  (unsigned long long)bad);
      if (!n) n = snprintf(line, sizeof line, "check ok\n");
      write_all(fd, line, (size_t)n);
    }
  }
}
