// A minimal io_uring for positional reads, over the raw system calls (no liburing).
//
// One thread owns a Uring: it queues reads (queue_read), submits them and waits for completions
// (submit_and_wait), and takes the completions (reap). The submission and completion rings are shared
// with the kernel through mmap; indices the kernel reads are published with release stores and indices
// it writes are read with acquire loads, as the ring protocol requires.
//
// Built only where the kernel UAPI header <linux/io_uring.h> exists; elsewhere, and wherever the
// kernel refuses a ring (ENOSYS on old kernels, EPERM from seccomp or the io_uring_disabled sysctl),
// the constructor throws UringUnavailable saying why, and the reader uses its thread pool instead.
// Setting the environment variable NCHUNK_IO_URING=off makes the constructor fail the same way.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace nchunk {

// No ring on this build, kernel or process; what() says why.
class UringUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One finished read: the user_data given to queue_read, and the kernel's result (bytes read, or
// -errno).
struct UringCompletion {
  uint64_t user_data;
  int32_t result;
};

class Uring {
 public:
  // A ring with room for at least `entries` reads in flight (rounded up to a power of two).
  explicit Uring(unsigned entries);
  ~Uring();
  Uring(const Uring&) = delete;
  Uring& operator=(const Uring&) = delete;

  // Reads in flight (queued, submitted or completed but not reaped) must not exceed this.
  unsigned capacity() const;

  // Queues a read of `n` bytes at `offset` of `fd` into `buf`; submitted by the next submit_and_wait.
  // `iov` must stay valid until the read completes (it is the read's one-element vector).
  void queue_read(int fd, iovec* iov, uint64_t offset, uint64_t user_data);

  // Submits every queued read and waits until at least `wait_for` completions are ready. Returns 0, or
  // an errno when the kernel refused the submission; reads it did not take are then returned through
  // `refused` (their user_data) and are not in flight. EINTR, EAGAIN and EBUSY are retried here.
  int submit_and_wait(unsigned wait_for, void (*refused)(void*, uint64_t), void* context);

  // Takes up to `max` ready completions into `out`; returns how many.
  unsigned reap(UringCompletion* out, unsigned max);

 private:
  struct Rings;
  std::unique_ptr<Rings> rings_;
};

}  // namespace nchunk
