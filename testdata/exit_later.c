/*
 * exit_later OUTFILE TICKS [--setsid]
 *
 * Test target for amber: a short-lived program. It writes "N\n" to OUTFILE
 * (N = 0 .. TICKS-1), sleeping 100 ms with one nanosleep(2) after each line,
 * then writes "done\n" and exits with code 7. A process dumped while it
 * sleeps is caught inside nanosleep, so this also checks that the sleep
 * resumes after a restore: nanosleep failing with EINTR (or any error)
 * makes it write "EINTR N" / "ERROR N" and exit with code 3 / 4 instead.
 * Never touches stdout/stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void write_all(int fd, const char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, buf, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      _exit(5);
    }
    buf += n;
    len -= (size_t)n;
  }
}

int main(int argc, char **argv) {
  if (argc < 3 || argc > 4) return 2;
  if (argc == 4) {
    if (strcmp(argv[3], "--setsid") != 0) return 2;
    if (setsid() < 0) return 9;
  }
  long ticks = strtol(argv[2], NULL, 10);
  if (ticks < 1) return 2;
  int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 6;

  char line[64];
  for (long n = 0; n < ticks; n++) {
    int len = snprintf(line, sizeof line, "%ld\n", n);
    write_all(fd, line, (size_t)len);
    struct timespec ts = {0, 100 * 1000 * 1000};
    if (nanosleep(&ts, NULL) != 0) {
      int eintr = errno == EINTR;
      len = snprintf(line, sizeof line, "%s %ld\n", eintr ? "EINTR" : "ERROR", n);
      write_all(fd, line, (size_t)len);
      return eintr ? 3 : 4;
    }
  }
  write_all(fd, "done\n", 5);
  return 7;
}
