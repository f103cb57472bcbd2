/*
 * ttyjob OUTFILE [--setsid]
 *
 * Test target for amber: a job attached to a terminal (fds 0-2). Every
 * 20 ms it writes "N\n" to OUTFILE and "tty N\n" to stdout, then waits for
 * input on stdin with poll(fd 0, POLLIN, 20 ms). A line read from stdin is
 * logged as "in <line>" to OUTFILE; end of file as "eof" (stdin is not
 * polled any more after that). A poll or write that fails is logged as
 * "EINTR N" or "BAD <what> N errno E" to OUTFILE, and the loop goes on.
 * With --setsid it first makes itself a session leader (without a
 * controlling terminal, its fds still on the terminal).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int out_fd;

#include "common.h"

static void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void log_line(const char *fmt, ...) {
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  int len = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (len < 0) return;
  if ((size_t)len >= sizeof line) len = sizeof line - 1;
  write_all(out_fd, line, (size_t)len);
}

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) return 2;
  if (argc == 3) {
    if (strcmp(argv[2], "--setsid") != 0) return 2;
    if (setsid() < 0) return 9;
  }
  out_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out_fd < 0) return 6;

  int stdin_open = 1;
  char in[256];
  size_t in_len = 0;
  char line[64];
  for (unsigned long long n = 0;; n++) {
    log_line("%llu\n", n);
    int len = snprintf(line, sizeof line, "tty %llu\n", n);
    if (write(1, line, (size_t)len) != len) log_line("BAD stdout %llu errno %d\n", n, errno);

    struct pollfd p = {0, POLLIN, 0};
    int r = stdin_open ? poll(&p, 1, 20) : poll(NULL, 0, 20);
    if (r < 0) {
      if (errno == EINTR) log_line("EINTR %llu\n", n);
      else log_line("BAD poll %llu errno %d\n", n, errno);
      continue;
    }
    if (r == 0) continue;
    ssize_t got = read(0, in + in_len, sizeof in - 1 - in_len);
    if (got < 0) {
      log_line("BAD read %llu errno %d\n", n, errno);
      stdin_open = 0;
      continue;
    }
    if (got == 0) {
      log_line("eof\n");
      stdin_open = 0;
      continue;
    }
    in_len += (size_t)got;
    /* Log each complete line. */
    char *nl;
    while ((nl = memchr(in, '\n', in_len)) != NULL) {
      *nl = 0;
      log_line("in %s\n", in);
      size_t used = (size_t)(nl - in) + 1;
      memmove(in, nl + 1, in_len - used);
      in_len -= used;
    }
    if (in_len == sizeof in - 1) in_len = 0;
  }
}
