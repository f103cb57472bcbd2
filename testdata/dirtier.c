/*
 * dirtier OUTFILE COLD_MIB HOT_PAGES
 *
 * Test target for incremental dumps. Maps COLD_MIB MiB of private
 * anonymous memory filled once with a pattern, and HOT_PAGES pages that
 * it keeps rewriting: every 2 ms generation g+1 overwrites hot page
 * (g+1) % HOT_PAGES with words that depend on g+1 and their offset, then
 * the generation counter becomes g+1. Writes "N\n" (the generation) to
 * OUTFILE every 20 ms. On SIGUSR1 it checks every cold word and every hot
 * word against the generation it must hold, and writes "check ok" or
 * "check BAD at ...". Never touches stdout/stderr.
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
#define WORDS_PER_PAGE (PAGE / 8)

static volatile sig_atomic_t check_requested;
static void on_usr1(int sig) {
  (void)sig;
  check_requested = 1;
}

static uint64_t cold_word(size_t off) { return ((uint64_t)off * 0x9E3779B97F4A7C15ULL) ^ 0xC01DULL; }
static uint64_t hot_word(uint64_t gen, size_t off) {
  return (gen << 32) ^ ((uint64_t)off * 0xBF58476D1CE4E5B9ULL);
}

static uint64_t *cold, *hot;
static size_t cold_words, hot_pages;
static volatile uint64_t generation;

static void write_hot(uint64_t gen) {
  size_t page = gen % hot_pages;
  uint64_t *p = hot + page * WORDS_PER_PAGE;
  for (size_t w = 0; w < WORDS_PER_PAGE; w++) p[w] = hot_word(gen, (page * WORDS_PER_PAGE + w) * 8);
}

/* The generation hot page `page` must hold once generation `g` is complete. */
static uint64_t gen_of(size_t page, uint64_t g) {
  return g - ((g + hot_pages - page) % hot_pages);
}

static int check(char *line, size_t size) {
  for (size_t i = 0; i < cold_words; i++)
    if (cold[i] != cold_word(i * 8)) return snprintf(line, size, "check BAD at cold+%zu\n", i * 8);
  uint64_t g = generation;
  for (size_t page = 0; page < hot_pages; page++) {
    uint64_t want = gen_of(page, g);
    for (size_t w = 0; w < WORDS_PER_PAGE; w++) {
      size_t off = (page * WORDS_PER_PAGE + w) * 8;
      if (hot[off / 8] != hot_word(want, off))
        return snprintf(line, size, "check BAD at hot+%zu (gen %llu)\n", off,
                        (unsigned long long)g);
    }
  }
  return snprintf(line, size, "check ok\n");
}

int main(int argc, char **argv) {
  if (argc != 4) return 2;
  if (getsid(0) != getpid() && setsid() < 0) return 4;
  size_t cold_bytes = strtoull(argv[2], NULL, 10) << 20;
  hot_pages = strtoull(argv[3], NULL, 10);
  if (hot_pages == 0) return 2;
  cold_words = cold_bytes / 8;
  cold = mmap(NULL, cold_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  hot = mmap(NULL, hot_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (cold == MAP_FAILED || hot == MAP_FAILED) return 5;
  for (size_t i = 0; i < cold_words; i++) cold[i] = cold_word(i * 8);
  /* Generations 0 .. hot_pages-1 fill every hot page once. */
  for (uint64_t g = 0; g < hot_pages; g++) write_hot(g);
  generation = hot_pages - 1;

  int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 6;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGUSR1, &sa, NULL) < 0) return 7;
  /* The check runs outside the handler, between two generations. */
  char line[128];
  for (unsigned tick = 0;; tick++) {
    uint64_t next = generation + 1;
    write_hot(next);
    generation = next;
    if (tick % 10 == 0) {
      int len = snprintf(line, sizeof line, "%llu\n", (unsigned long long)generation);
      write_all(fd, line, (size_t)len);
    }
    if (check_requested) {
      check_requested = 0;
      int len = check(line, sizeof line);
      write_all(fd, line, (size_t)len);
    }
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}
