/*
 * threads OUTFILE NTHREADS
 *
 * Test target for amber. Starts NTHREADS pthreads; thread i keeps its own
 * counter N and writes "T<i> N\n" to OUTFILE every 20 ms (one write(2) per
 * line, under a mutex). The main thread waits in pthread_join. Never touches
 * stdout/stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int out_fd;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

#include "common.h"

static void *worker(void *arg) {
  long index = (long)arg;
  char line[64];
  for (unsigned long long n = 0;; n++) {
    int len = snprintf(line, sizeof line, "T%ld %llu\n", index, n);
    pthread_mutex_lock(&out_lock);
    write_all(out_fd, line, (size_t)len);
    pthread_mutex_unlock(&out_lock);
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  long count = strtol(argv[2], NULL, 10);
  if (count < 1 || count > 1024) return 2;
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;

  pthread_t *tids = calloc((size_t)count, sizeof *tids);
  if (!tids) return 5;
  for (long i = 0; i < count; i++) {
    if (pthread_create(&tids[i], NULL, worker, (void *)i) != 0) return 5;
  }
  for (long i = 0; i < count; i++) pthread_join(tids[i], NULL);
  return 0;
}
