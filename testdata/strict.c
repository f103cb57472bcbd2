/*
 * usage: strict OUT
 * A thread enters seccomp strict mode, then only reads bytes from a pipe
 * and writes a counter line ("N") to OUT for each; the main thread feeds
 * the pipe every 20 ms.
 */
#include <fcntl.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

static int pipefd[2], out;

static void *strict_thread(void *arg) {
  (void)arg;
  prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
  char c, line[32];
  for (unsigned n = 0;; n++) {
    if (read(pipefd[0], &c, 1) != 1) continue;
    int len = snprintf(line, sizeof line, "%u\n", n);
    if (write(out, line, len) != len) continue;
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
  if (out < 0 || pipe(pipefd) != 0) return 1;
  pthread_t t;
  if (pthread_create(&t, NULL, strict_thread, NULL) != 0) return 1;
  for (;;) {
    if (write(pipefd[1], "x", 1) != 1) return 1;
    usleep(20000);
  }
}
