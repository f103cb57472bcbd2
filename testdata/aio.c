/*
 * aio OUTFILE DATAFILE [FIFO [POLLS]]
 *
 * Test target for amber: an AIO context (io_setup(128)) holding one
 * completion not yet reaped: a pread of DATAFILE's first 16 bytes (no
 * O_DIRECT: it completes inside io_submit). Then counts into OUTFILE every
 * 20 ms. On SIGUSR1 (handled in the main loop) it reaps that completion
 * with io_getevents, submits a second pread (at offset 16) and reaps it,
 * and writes "check ok" to OUTFILE.check, or "check BAD ..." saying what
 * differed.
 *
 * With FIFO (opened read-only without blocking: a poll of a FIFO opened
 * read-write is refused, EINVAL, as it has two wait queues), the context
 * also polls FIFO for input POLLS times (default 1; IOCB_CMD_POLL, tagged
 * 7): requests in flight until someone writes to FIFO. Their completions
 * must then come right after the read's: check first looks at the ring as
 * user space reaps it (head, tail, events), where all must wait, then
 * reaps them with io_getevents. Before, the process submits and reaps 200
 * reads instead of 5, moving to each of its CPUs in turn, so that the
 * kernel's free slots are spread over its CPUs' caches and slots of
 * reaped completions are not yet given back to it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

/* The ring's header as the kernel maps it (struct aio_ring). */
struct ring {
  unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
  struct io_event events[];
};

static aio_context_t ctx;
static int data, fifo = -1, polls = 1;
static char first[16], second[16], expect[32];
static volatile sig_atomic_t asked;

static void on_usr1(int sig) {
  (void)sig;
  asked = 1;
}

static long submit(char *buf, long offset, unsigned long tag) {
  struct iocb cb = {0};
  struct iocb *list[1] = {&cb};
  cb.aio_data = tag;
  cb.aio_lio_opcode = IOCB_CMD_PREAD;
  cb.aio_fildes = (unsigned)data;
  cb.aio_buf = (unsigned long)buf;
  cb.aio_nbytes = 16;
  cb.aio_offset = offset;
  return syscall(SYS_io_submit, ctx, 1, list);
}

/* Reaps one event: NULL if it is the read tagged `tag` into `buf` of `want`, else what is wrong. */
static const char *reap(unsigned long tag, const char *buf, const char *want) {
  struct io_event ev;
  struct timespec ts = {2, 0};
  long n = syscall(SYS_io_getevents, ctx, 1, 1, &ev, &ts);
  if (n != 1) return "io_getevents returned no event";
  if (ev.data != tag) return "wrong event";
  if (ev.res != 16) return "wrong result";
  if (memcmp(buf, want, 16)) return "wrong data";
  return NULL;
}

static long submitPoll(void) {
  struct iocb cb = {0};
  struct iocb *list[1] = {&cb};
  cb.aio_data = 7;
  cb.aio_lio_opcode = IOCB_CMD_POLL;
  cb.aio_fildes = (unsigned)fifo;
  cb.aio_buf = POLLIN;
  return syscall(SYS_io_submit, ctx, 1, list);
}

/* NULL if the ring holds the read's completion, then the polls', else what is wrong. */
static const char *peekRing(void) {
  const struct ring *r = (const struct ring *)ctx;
  if ((r->tail + r->nr - r->head) % r->nr != 1u + (unsigned)polls) {
    return "ring: not 1 + POLLS completions waiting";
  }
  if (r->events[r->head].data != 1) return "ring: first completion is not the read";
  for (int i = 1; i <= polls; i++) {
    if (r->events[(r->head + i) % r->nr].data != 7) return "ring: a poll's completion missing";
  }
  return NULL;
}

/* Reaps the polls' completions and the FIFO's input. */
static const char *reapPolls(void) {
  struct io_event ev[64];
  struct timespec ts = {2, 0};
  char buf[64];
  if (syscall(SYS_io_getevents, ctx, polls, polls, ev, &ts) != polls) return "no poll completions";
  for (int i = 0; i < polls; i++) {
    if (ev[i].data != 7 || !(ev[i].res & POLLIN)) return "wrong poll completion";
  }
  if (read(fifo, buf, sizeof buf) <= 0) return "FIFO: no input";
  return NULL;
}

/* Submits and reaps `n` reads, moving to each of the process's CPUs in turn. */
static int churn(int n) {
  cpu_set_t all, one;
  if (sched_getaffinity(0, sizeof all, &all)) return -1;
  for (int i = 0, cpu = 0; i < n; i++, cpu++) {
    while (!CPU_ISSET(cpu % CPU_SETSIZE, &all)) cpu++;
    CPU_ZERO(&one);
    CPU_SET(cpu % CPU_SETSIZE, &one);
    if (sched_setaffinity(0, sizeof one, &one)) return -1;
    if (submit(first, 0, 1) != 1 || reap(1, first, expect)) return -1;
  }
  return sched_setaffinity(0, sizeof all, &all);
}

static void check(const char *path) {
  const char *bad = fifo >= 0 ? peekRing() : NULL;
  if (!bad) bad = reap(1, first, expect);
  if (!bad && fifo >= 0) bad = reapPolls();
  if (!bad && submit(second, 16, 2) != 1) bad = "io_submit after restore";
  if (!bad) bad = reap(2, second, expect + 16);
  int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
  char line[128];
  int len = snprintf(line, sizeof line, "check %s%s\n", bad ? "BAD " : "ok", bad ? bad : "");
  write_all(fd, line, (size_t)len);
  close(fd);
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  char checkPath[4096];
  snprintf(checkPath, sizeof checkPath, "%s.check", argv[1]);
  int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
  data = open(argv[2], O_RDONLY);
  if (out < 0 || data < 0 || pread(data, expect, 32, 0) != 32) return 3;
  if (syscall(SYS_io_setup, 128, &ctx) != 0) return 4;
  if (churn(argc > 3 ? 200 : 5)) return 5;
  memset(first, 0, sizeof first);
  if (submit(first, 0, 1) != 1) return 5;
  if (argc > 3) {
    fifo = open(argv[3], O_RDONLY | O_NONBLOCK);
    if (argc > 4) polls = atoi(argv[4]);
    if (polls < 1 || polls > 64 || fifo < 0) return 6;
    for (int i = 0; i < polls; i++) {
      if (submitPoll() != 1) return 6;
    }
  }
  signal(SIGUSR1, on_usr1);
  for (long n = 0;; n++) {
    if (asked) {
      asked = 0;
      check(checkPath);
    }
    char line[32];
    int len = snprintf(line, sizeof line, "%ld\n", n);
    write_all(out, line, (size_t)len);
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}
