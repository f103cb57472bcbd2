/*
 * rawkeys OUTFILE
 *
 * Test target for amber: a raw-mode terminal program. It puts its terminal
 * (fd 0) in raw mode (no ICANON, ECHO, ISIG), prints "rawkeys ready", then
 * reads one byte at a time: each is logged as "key XX" (hex) to OUTFILE and
 * shown as "[XX]" on the terminal. Before each read it checks that the
 * terminal is still raw and that its process group is the terminal's
 * foreground group, logging "BAD cooked" or "BAD background" if not.
 * 'q' restores the original settings and exits 7.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include "common.h"

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) return 6;
  struct termios orig, raw;
  if (tcgetattr(0, &orig) < 0) return 4;
  raw = orig;
  raw.c_lflag &= ~(ICANON | ECHO | ISIG | IEXTEN);
  raw.c_iflag &= ~(ICRNL | IXON);
  raw.c_cc[VMIN] = 1;
  raw.c_cc[VTIME] = 0;
  if (tcsetattr(0, TCSANOW, &raw) < 0) return 5;
  write_all(1, "rawkeys ready\r\n", 15);
  write_all(out, "ready\n", 6);
  for (;;) {
    struct termios now;
    if (tcgetattr(0, &now) == 0 && (now.c_lflag & (ICANON | ECHO | ISIG)))
      write_all(out, "BAD cooked\n", 11);
    if (tcgetpgrp(0) != getpgrp()) write_all(out, "BAD background\n", 15);
    unsigned char c;
    ssize_t n = read(0, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      write_all(out, "eof\n", 4);
      return 3;
    }
    char line[32];
    int len = snprintf(line, sizeof line, "key %02x\n", c);
    write_all(out, line, (size_t)len);
    len = snprintf(line, sizeof line, "[%02x]", c);
    write_all(1, line, (size_t)len);
    if (c == 'q') {
      tcsetattr(0, TCSANOW, &orig);
      write_all(1, "\r\n", 2);
      return 7;
    }
  }
}
