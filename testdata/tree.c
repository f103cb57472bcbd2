/*
 * tree OUTDIR DEPTH WIDTH [--setsid]
 *
 * Test target for amber. Forks a tree of processes: the root has WIDTH
 * children, each of those WIDTH children, and so on DEPTH levels below the
 * root (DEPTH 0 = just the root). Every process, once its own children are
 * forked, writes "N\n" to OUTDIR/PID.txt every 20 ms. Parents reap children
 * that die. Never touches stdout/stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char **argv) {
  if (argc < 4 || argc > 5) return 2;
  if (argc == 5) {
    if (strcmp(argv[4], "--setsid") != 0) return 2;
    if (setsid() < 0) return 4;
  }
  const char *dir = argv[1];
  int depth = atoi(argv[2]);
  int width = atoi(argv[3]);

  for (int level = 0; level < depth; level++) {
    int forked_child = 0;
    for (int i = 0; i < width; i++) {
      pid_t pid = fork();
      if (pid < 0) return 5;
      if (pid == 0) {
        forked_child = 1;
        break;
      }
    }
    /* A parent stops here; a new child goes on to build its own level. */
    if (!forked_child) break;
  }

  char path[4096];
  snprintf(path, sizeof path, "%s/%d.txt", dir, (int)getpid());
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 6;

  char line[64];
  for (unsigned long long n = 0;; n++) {
    int len = snprintf(line, sizeof line, "%llu\n", n);
    write_all(fd, line, (size_t)len);
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}
