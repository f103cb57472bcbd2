/*
 * dynlib OUTFILE
 *
 * Test target for amber: a dynamically linked program that maps several
 * shared libraries (libm, libz, libcrypt besides libc) and uses each of them
 * on every tick. Every 20 ms it writes one line
 *
 *   N sin=%.9f crc=%08lx crypt=%s
 *
 * where every value is a pure function of N (sin/cos from libm, crc32 from
 * libz, crypt() from libcrypt), so a test can recompute or compare lines.
 * The program also checks itself: it recomputes the previous tick's values
 * and if they ever differ it writes "BAD N" instead. Never touches stdout.
 */
#define _GNU_SOURCE
#include <crypt.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "common.h"

/* Formats the values for tick n into buf (without N and newline). */
static int values(unsigned long long n, char *buf, size_t size) {
  double x = (double)n * 0.001;
  double m = sin(x) * cos(x / 3.0) + sqrt(x + 1.0);

  char text[64];
  int tlen = snprintf(text, sizeof text, "amber tick %llu", n);
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = crc32(crc, (const Bytef *)text, (uInt)tlen);

  /* A cheap DES-based crypt: the salt and key depend on n. */
  static const char salts[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789./";
  char salt[3] = {salts[n % 64], salts[(n / 64) % 64], 0};
  struct crypt_data cd;
  memset(&cd, 0, sizeof cd);
  const char *hash = crypt_r(text, salt, &cd);
  if (!hash || hash[0] == '*') hash = "none";

  return snprintf(buf, size, "sin=%.9f crc=%08lx crypt=%s", m, (unsigned long)crc, hash);
}

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return 6;

  char prev[256] = "";
  char cur[256];
  char line[512];
  for (unsigned long long n = 0;; n++) {
    if (n > 0) {
      values(n - 1, cur, sizeof cur);
      if (strcmp(cur, prev) != 0) {
        int len = snprintf(line, sizeof line, "BAD %llu\n", n - 1);
        write_all(fd, line, (size_t)len);
      }
    }
    values(n, prev, sizeof prev);
    int len = snprintf(line, sizeof line, "%llu %s\n", n, prev);
    write_all(fd, line, (size_t)len);
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}
