// Does the kernel keep a long-term pinned page of a memfd when a hole is punched under it?
//
// The daemon gives an emptied arena segment back with fallocate(PUNCH_HOLE) and may reuse it
// later; a CUDA client has registered (pinned) every segment it mapped (cudaHostRegister).
// io_uring's registered buffers pin user pages the same way (pin_user_pages, FOLL_LONGTERM),
// so this program stands in for the GPU: it pins a memfd mapping, punches the file, writes
// new bytes through the mapping, and has io_uring write the pinned buffer to a file. If the
// pinned view still holds the old bytes, the device and the mapping have parted: a GPU would
// read stale frames from a reused segment, and what it wrote would never reach the daemon.
//
// Build and run: cc -O1 -o /tmp/pinned_punch bench/experiments/pinned_punch.c && /tmp/pinned_punch
// Exit status 0: the pinned page was orphaned (the hazard is real on this kernel); 1: it
// followed the file; 2: the experiment could not run (io_uring unavailable).
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static int ring_setup(unsigned entries, struct io_uring_params* p) {
  return (int)syscall(__NR_io_uring_setup, entries, p);
}
static int ring_enter(int fd, unsigned submit, unsigned complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, submit, complete, flags, NULL, 0);
}
static int ring_register(int fd, unsigned op, void* arg, unsigned n) {
  return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

int main(void) {
  const size_t len = 1 << 16;
  const int mfd = memfd_create("pinned-punch", 0);
  if (mfd < 0 || ftruncate(mfd, (off_t)len) != 0) return perror("memfd"), 2;
  char* m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
  if (m == MAP_FAILED) return perror("mmap"), 2;
  memset(m, 'A', len);

  struct io_uring_params p;
  memset(&p, 0, sizeof p);
  const int ring = ring_setup(4, &p);
  if (ring < 0) return perror("io_uring_setup"), 2;
  struct iovec iov = {m, len};
  if (ring_register(ring, IORING_REGISTER_BUFFERS, &iov, 1) < 0) {
    return perror("io_uring_register"), 2;
  }
  // The daemon's give-back, then the segment's next use writes new content.
  if (fallocate(mfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)len) != 0) {
    return perror("fallocate"), 2;
  }
  printf("after the punch the mapping reads 0x%02x\n", (unsigned char)m[0]);
  memset(m, 'B', len);

  // The "device" reads its pinned view: io_uring writes the registered buffer to a file.
  char path[] = "/tmp/pinned-punch-XXXXXX";
  const int out = mkstemp(path);
  if (out < 0) return perror("mkstemp"), 2;
  unlink(path);
  char* sq = mmap(NULL, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
  struct io_uring_sqe* sqes =
      mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
           MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
  char* cq = mmap(NULL, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
                  PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
  if (sq == MAP_FAILED || sqes == MAP_FAILED || cq == MAP_FAILED) return perror("ring mmap"), 2;
  unsigned* tail = (unsigned*)(sq + p.sq_off.tail);
  unsigned* array = (unsigned*)(sq + p.sq_off.array);
  memset(&sqes[0], 0, sizeof sqes[0]);
  sqes[0].opcode = IORING_OP_WRITE_FIXED;
  sqes[0].fd = out;
  sqes[0].addr = (unsigned long)m;
  sqes[0].len = (unsigned)len;
  sqes[0].buf_index = 0;
  array[0] = 0;
  __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
  if (ring_enter(ring, 1, 1, IORING_ENTER_GETEVENTS) < 0) return perror("io_uring_enter"), 2;
  const struct io_uring_cqe* cqe = (const struct io_uring_cqe*)(cq + p.cq_off.cqes);
  if (cqe->res != (int)len) return fprintf(stderr, "write_fixed: %d\n", cqe->res), 2;
  char seen = 0;
  if (pread(out, &seen, 1, 0) != 1) return perror("pread"), 2;
  printf("the pinned view holds '%c', the mapping '%c': %s\n", seen, m[0],
         seen == m[0] ? "the pinned page followed the file"
                      : "the pinned page was orphaned by the punch");
  return seen == m[0] ? 1 : 0;
}
