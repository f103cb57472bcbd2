/* Helpers shared by the C test targets. Include after <errno.h> and <unistd.h>. */
#ifndef AMBER_TESTDATA_COMMON_H
#define AMBER_TESTDATA_COMMON_H

/* write(2) all of buf, retrying after EINTR; exit 3 on any other error. */
static void write_all(int fd, const char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, buf, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      _exit(3);
    }
    buf += n;
    len -= (size_t)n;
  }
}

#endif
