// Implementation of the raw-syscall io_uring declared in uring.hpp: ring setup and mapping, queueing
// READV entries, submission with waiting, and reaping completions.
#include "uring.hpp"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sched.h>

// NCHUNK_NO_IO_URING (a -D flag) builds without io_uring even where the header exists.
#if defined(__has_include) && !defined(NCHUNK_NO_IO_URING)
#if __has_include(<linux/io_uring.h>) && defined(__NR_io_uring_setup) && defined(__NR_io_uring_enter)
#include <linux/io_uring.h>
#define NCHUNK_HAVE_URING 1
#endif
#endif

// Setup flags newer than some distributions' kernel headers (5.4 on Ubuntu 20.04); the values are
// kernel ABI, and a kernel that does not know one answers EINVAL, after which the next set is tried.
#if defined(NCHUNK_HAVE_URING) && !defined(IORING_SETUP_CLAMP)
#define IORING_SETUP_CLAMP (1U << 4)
#endif
#if defined(NCHUNK_HAVE_URING) && !defined(IORING_SETUP_COOP_TASKRUN)
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif

namespace nchunk {

namespace {

// Why a ring cannot be had here before asking the kernel, or "" to go ahead.
std::string refused_by_environment() {
  const char* setting = std::getenv("NCHUNK_IO_URING");
  if (setting && (std::strcmp(setting, "off") == 0 || std::strcmp(setting, "0") == 0)) {
    return std::string("io_uring turned off by NCHUNK_IO_URING=") + setting;
  }
  return "";
}

}  // namespace

#ifdef NCHUNK_HAVE_URING

namespace {

std::string setup_failure(int error) {
  std::string text = std::string("io_uring_setup failed: ") + std::strerror(error);
  if (error == ENOSYS) text += " (a kernel before 5.1, or one built without io_uring)";
  if (error == EPERM) text += " (forbidden by a seccomp filter or the kernel.io_uring_disabled sysctl)";
  if (error == ENOMEM) text += " (locked-memory limit too low for the rings)";
  return text;
}

void* map_ring(int fd, size_t bytes, off_t offset) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, offset);
  if (p == MAP_FAILED) throw UringUnavailable(std::string("mmap of the io_uring rings failed: ") + std::strerror(errno));
  return p;
}

}  // namespace

struct Uring::Rings {
  int fd = -1;
  void* sq_map = nullptr;
  size_t sq_map_bytes = 0;
  void* cq_map = nullptr;  // == sq_map with IORING_FEAT_SINGLE_MMAP
  size_t cq_map_bytes = 0;
  io_uring_sqe* sqes = nullptr;
  size_t sqes_bytes = 0;

  // Submission ring: the kernel moves `head`, we move `tail`.
  unsigned* sq_head = nullptr;
  unsigned* sq_tail = nullptr;
  unsigned* sq_array = nullptr;
  unsigned sq_mask = 0;
  unsigned sq_entries = 0;
  unsigned local_tail = 0;  // our tail, published to *sq_tail by queue_read
  unsigned queued = 0;      // entries queued since the last submission the kernel accepted
  // Completion ring: the kernel moves `tail`, we move `head`.
  unsigned* cq_head = nullptr;
  unsigned* cq_tail = nullptr;
  io_uring_cqe* cqes = nullptr;
  unsigned cq_mask = 0;

  ~Rings() {
    if (sqes) ::munmap(sqes, sqes_bytes);
    if (cq_map && cq_map != sq_map) ::munmap(cq_map, cq_map_bytes);
    if (sq_map) ::munmap(sq_map, sq_map_bytes);
    if (fd >= 0) ::close(fd);
  }

  int enter(unsigned to_submit, unsigned min_complete, unsigned flags) {
    return static_cast<int>(::syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
  }

  unsigned ready() const {
    return __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE) - *cq_head;
  }
};

Uring::Uring(unsigned entries) : rings_(new Rings()) {
  const std::string refused = refused_by_environment();
  if (!refused.empty()) throw UringUnavailable(refused);
  Rings& r = *rings_;
  io_uring_params p;
  // COOP_TASKRUN (Linux 5.19) spares the ring thread an interrupt per completion: the one thread that
  // submits also reaps, at its next system call. CLAMP (5.6) caps the size instead of refusing it.
  // An older kernel says EINVAL and gets the next, plainer ring.
  for (unsigned flags : {IORING_SETUP_CLAMP | IORING_SETUP_COOP_TASKRUN, IORING_SETUP_CLAMP, 0U}) {
    std::memset(&p, 0, sizeof p);
    p.flags = flags;
    r.fd = static_cast<int>(::syscall(__NR_io_uring_setup, entries, &p));
    if (r.fd >= 0 || errno != EINVAL) break;
  }
  if (r.fd < 0) throw UringUnavailable(setup_failure(errno));

  r.sq_map_bytes = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r.cq_map_bytes = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
  const bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single) r.sq_map_bytes = r.cq_map_bytes = std::max(r.sq_map_bytes, r.cq_map_bytes);
  r.sq_map = map_ring(r.fd, r.sq_map_bytes, IORING_OFF_SQ_RING);
  r.cq_map = single ? r.sq_map : map_ring(r.fd, r.cq_map_bytes, IORING_OFF_CQ_RING);
  r.sqes_bytes = p.sq_entries * sizeof(io_uring_sqe);
  r.sqes = static_cast<io_uring_sqe*>(map_ring(r.fd, r.sqes_bytes, IORING_OFF_SQES));

  char* sq = static_cast<char*>(r.sq_map);
  r.sq_head = reinterpret_cast<unsigned*>(sq + p.sq_off.head);
  r.sq_tail = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
  r.sq_array = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
  r.sq_mask = *reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
  r.sq_entries = p.sq_entries;
  r.local_tail = *r.sq_tail;
  char* cq = static_cast<char*>(r.cq_map);
  r.cq_head = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
  r.cq_tail = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
  r.cqes = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
  r.cq_mask = *reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
}

Uring::~Uring() = default;

unsigned Uring::capacity() const { return rings_->sq_entries; }

void Uring::queue_read(int fd, iovec* iov, uint64_t offset, uint64_t user_data) {
  Rings& r = *rings_;
  const unsigned index = r.local_tail & r.sq_mask;
  io_uring_sqe* sqe = &r.sqes[index];
  std::memset(sqe, 0, sizeof *sqe);
  sqe->opcode = IORING_OP_READV;
  sqe->fd = fd;
  sqe->addr = reinterpret_cast<uint64_t>(iov);
  sqe->len = 1;
  sqe->off = offset;
  sqe->user_data = user_data;
  r.sq_array[index] = index;
  ++r.local_tail;
  ++r.queued;
  __atomic_store_n(r.sq_tail, r.local_tail, __ATOMIC_RELEASE);  // the entry is complete before the kernel sees it
}

int Uring::submit_and_wait(unsigned wait_for, void (*refused)(void*, uint64_t), void* context) {
  Rings& r = *rings_;
  for (;;) {
    const int n = r.enter(r.queued, wait_for, wait_for > 0 ? IORING_ENTER_GETEVENTS : 0);
    if (n >= 0) {
      r.queued -= std::min<unsigned>(r.queued, static_cast<unsigned>(n));
      if (r.queued == 0) return 0;  // all submitted (and, if asked, waited for)
      continue;
    }
    const int error = errno;
    if (error == EINTR) continue;
    if (error == EAGAIN || error == EBUSY) {  // out of kernel resources: let completions drain first
      if (r.ready() > 0) return 0;
      sched_yield();
      continue;
    }
    // Any other error: the kernel took none of the queued entries. Take them back out of the ring.
    const unsigned head = __atomic_load_n(r.sq_head, __ATOMIC_ACQUIRE);
    for (unsigned i = head; i != r.local_tail; ++i) refused(context, r.sqes[i & r.sq_mask].user_data);
    r.local_tail = head;
    r.queued = 0;
    __atomic_store_n(r.sq_tail, r.local_tail, __ATOMIC_RELEASE);
    return error;
  }
}

unsigned Uring::reap(UringCompletion* out, unsigned max) {
  Rings& r = *rings_;
  unsigned head = *r.cq_head;
  const unsigned tail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);  // entries up to tail are written
  unsigned n = 0;
  while (head != tail && n < max) {
    const io_uring_cqe& cqe = r.cqes[head & r.cq_mask];
    out[n++] = UringCompletion{cqe.user_data, cqe.res};
    ++head;
  }
  __atomic_store_n(r.cq_head, head, __ATOMIC_RELEASE);  // the kernel may reuse the entries we read
  return n;
}

#else  // no <linux/io_uring.h> at build time

struct Uring::Rings {};

Uring::Uring(unsigned) {
  const std::string refused = refused_by_environment();
  throw UringUnavailable(refused.empty() ? "built without io_uring (no <linux/io_uring.h>, or NCHUNK_NO_IO_URING)"
                                         : refused);
}

Uring::~Uring() = default;
unsigned Uring::capacity() const { return 0; }
void Uring::queue_read(int, iovec*, uint64_t, uint64_t) {}
int Uring::submit_and_wait(unsigned, void (*)(void*, uint64_t), void*) { return ENOSYS; }
unsigned Uring::reap(UringCompletion*, unsigned) { return 0; }

#endif

}  // namespace nchunk
