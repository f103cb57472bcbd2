/*
 * counter OUTFILE MIB [--setsid]
 *
 * Test target for amber. Allocates MIB MiB with malloc, fills it with a
 * pattern that depends on each word's byte offset, then writes "N\n"
 * (N = 0, 1, 2, ...) to OUTFILE every 20 ms. On SIGUSR1 it verifies the whole
 * pattern and writes "check ok" or "check BAD at OFFSET". Never touches
 * stdout/stderr.
 *
 * It also maps a sparse anonymous region of SPARSE_MIB MiB (read-write,
 * private) of which only one word per 16 MiB is ever written (16 pages in
 * all), so VmSize is far larger than the memory worth dumping. Those
 * pages are verified too ("check BAD at sparse+OFFSET").
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

#define SEED 0x5DEECE66DA3B1F27ULL
#define MULT 0x9E3779B97F4A7C15ULL
#define SPARSE_MIB 256
#define SPARSE_STEP (16u << 20)

static uint64_t expected(size_t offset) {
  return ((uint64_t)offset * MULT) ^ SEED;
}

static volatile sig_atomic_t check_requested;

static void on_usr1(int sig) {
  (void)sig;
  check_requested = 1;
}

#include "common.h"

static void sleep_20ms(void) {
  struct timespec ts = {0, 20 * 1000 * 1000};
  /* An interrupted sleep (signal, or a restore) just ends the tick early. */
  nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
  if (argc < 3 || argc > 4) return 2;
  if (argc == 4) {
    if (strcmp(argv[3], "--setsid") != 0) return 2;
    if (setsid() < 0) return 4;
  }
  const char *out = argv[1];
  size_t mib = strtoull(argv[2], NULL, 10);
  size_t bytes = mib << 20;
  size_t words = bytes / 8;

  uint64_t *mem = NULL;
  if (words > 0) {
    mem = malloc(bytes);
    if (!mem) return 5;
    for (size_t i = 0; i < words; i++) mem[i] = expected(i * 8);
  }

  size_t sparse_bytes = (size_t)SPARSE_MIB << 20;
  unsigned char *sparse =
      mmap(NULL, sparse_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (sparse == MAP_FAILED) return 5;
  /* Keep it sparse even where transparent huge pages are "always". */
  madvise(sparse, sparse_bytes, MADV_NOHUGEPAGE);
  for (size_t off = 0; off < sparse_bytes; off += SPARSE_STEP)
    *(uint64_t *)(sparse + off) = expected(off) ^ 0xFFu;

  int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 6;

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGUSR1, &sa, NULL) < 0) return 7;

  char line[128];
  for (unsigned long long n = 0;; n++) {
    int len = snprintf(line, sizeof line, "%llu\n", n);
    write_all(fd, line, (size_t)len);
    if (check_requested) {
      check_requested = 0;
      size_t bad = (size_t)-1;
      for (size_t i = 0; i < words; i++) {
        if (mem[i] != expected(i * 8)) {
          bad = i * 8;
          break;
        }
      }
      size_t sparse_bad = (size_t)-1;
      /* Only the touched pages are read: reading the others would map the
       * zero page into them and change what a dump sees. */
      for (size_t off = 0; off < sparse_bytes && sparse_bad == (size_t)-1; off += SPARSE_STEP) {
        for (size_t w = 0; w < 4096; w += 8) {
          uint64_t want = w == 0 ? expected(off) ^ 0xFFu : 0;
          if (*(uint64_t *)(sparse + off + w) != want) {
            sparse_bad = off + w;
            break;
          }
        }
      }
      if (bad != (size_t)-1)
        len = snprintf(line, sizeof line, "check BAD at %zu\n", bad);
      else if (sparse_bad != (size_t)-1)
        len = snprintf(line, sizeof line, "check BAD at sparse+%zu\n", sparse_bad);
      else
        len = snprintf(line, sizeof line, "check ok\n");
      write_all(fd, line, (size_t)len);
    }
    sleep_20ms();
  }
}
