// How one read task (a byte range of a file and its destination) becomes reads under the file's
// direct-I/O alignment. Both reader backends execute this plan (the thread pool with pread, the
// io_uring backend with one ring read each), so they read the same spans and cannot drift apart.
#pragma once

#include <cstdint>

#include "reader.hpp"

namespace nchunk {

// A task whose aligned span is at most this long is read whole into the bounce buffer (one read);
// a longer unaligned one reads its aligned middle straight into the destination.
constexpr int64_t kWholeBounceBytes = 64 * 1024;

// One read of a task: `n` bytes at file offset `offset`, of which at least `need` must come back
// (fewer: the file ended early). A direct read lands at the task's destination + `dest_at`. A bounced
// read lands in the bounce buffer at `bounce_at`; then `copy_length` bytes, starting `copy_from`
// bytes into what it read, are copied to the task's destination + `dest_at`.
struct PlannedRead {
  int64_t offset;
  int64_t n;
  int64_t need;
  bool bounced;
  int64_t bounce_at;
  int64_t copy_from;
  int64_t copy_length;
  int64_t dest_at;
};

// The reads of one task, in file order, and the bounce buffer they need (`bounce_bytes`, aligned to
// the file's memory alignment; 0: none). Three kinds:
//   whole:  one direct read of exactly the task (a buffered file, or a task aligned at both ends whose
//           destination is aligned too);
//   bounce: one read of the aligned span around the task into the bounce buffer (no aligned middle,
//           a misaligned destination, or a span of at most kWholeBounceBytes);
//   split:  the aligned middle read straight into the destination, the partial head block and tail
//           block (where there are any) through the bounce buffer, at 0 and at the offset alignment
//           rounded up to the memory alignment.
struct TaskPlan {
  enum class Kind { whole, bounce, split };
  Kind kind = Kind::whole;
  int count = 0;
  PlannedRead reads[3]{};
  int64_t bounce_bytes = 0;
};

// Plans the task of `length` > 0 bytes at file offset `offset` whose destination starts at address
// `dest`, for a file with alignment `a` (a.direct false: buffered, one whole read).
TaskPlan plan_task(int64_t offset, int64_t length, uintptr_t dest, const DioAlignment& a);

}  // namespace nchunk
