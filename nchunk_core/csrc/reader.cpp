// Implementation of the direct-I/O reader declared in reader.hpp: alignment queries, file opening with
// the buffered fallback, the per-task read plan (task_plan.hpp), the row checks, the worker pool, and
// the io_uring backend (one ring thread issuing each task's planned reads, plus row-checking threads).
#include "reader.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <utility>

#include "crc32c.hpp"
#include "task_plan.hpp"
#include "uring.hpp"

namespace nchunk {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kStatxDioAlign = 0x00002000U;  // STATX_DIOALIGN, Linux 6.1
constexpr int64_t kPage = 4096;
// Sizes tried, smallest first, when the kernel does not report the alignment.
constexpr uint32_t kProbeSizes[] = {512, 1024, 2048, 4096};

// The kernel's struct statx (include/uapi/linux/stat.h). Declared here because C library headers that
// predate Linux 6.1 lack the direct-I/O fields; the layout is part of the kernel ABI.
struct KernelStatx {
  struct Timestamp {
    int64_t sec;
    uint32_t nsec;
    int32_t reserved;
  };
  uint32_t mask, blksize;
  uint64_t attributes;
  uint32_t nlink, uid, gid;
  uint16_t mode, spare0;
  uint64_t ino, size, blocks, attributes_mask;
  Timestamp atime, btime, ctime, mtime;
  uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
  uint64_t mnt_id;
  uint32_t dio_mem_align, dio_offset_align;
  uint64_t spare[12];
};
static_assert(sizeof(KernelStatx) == 256, "struct statx is 256 bytes");
static_assert(offsetof(KernelStatx, dio_mem_align) == 152, "statx direct-I/O fields at byte 152");

int64_t round_down(int64_t x, int64_t a) { return x / a * a; }
int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

size_t next_power_of_two(size_t x) {
  size_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// A heap buffer with a power-of-two alignment that only ever grows.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }

  char* get(size_t size, size_t alignment) {
    alignment = next_power_of_two(std::max<size_t>(alignment, kPage));
    if (data_ && size <= size_ && alignment <= alignment_) return data_;
    size = std::max(size, size_);
    alignment = std::max(alignment, alignment_);
    std::free(data_);
    data_ = nullptr;
    size_ = alignment_ = 0;
    void* p = nullptr;
    if (posix_memalign(&p, alignment, size) != 0) throw std::bad_alloc();
    data_ = static_cast<char*>(p);
    size_ = size;
    alignment_ = alignment;
    return data_;
  }

 private:
  char* data_ = nullptr;
  size_t size_ = 0;
  size_t alignment_ = 0;
};

ssize_t pread_retrying(int fd, void* buf, size_t n, int64_t offset) {
  ssize_t r;
  do {
    r = ::pread(fd, buf, n, offset);
  } while (r < 0 && errno == EINTR);
  return r;
}

// Asks the kernel for the direct-I/O alignment of `path` (relative to `dirfd`, with statx `flags`).
// Returns false when it does not say (kernel before 6.1, or a file system that does not report it).
bool statx_alignment(int dirfd, const char* path, int flags, const std::string& name,
                     DioAlignment* out) {
#ifdef SYS_statx
  KernelStatx sx;
  std::memset(&sx, 0, sizeof sx);
  if (syscall(SYS_statx, dirfd, path, flags, kStatxDioAlign, &sx) != 0) {
    if (errno == ENOSYS || errno == EPERM) return false;  // no statx, or a sandbox forbids it
    throw IoError(errno, name, "statx");
  }
  if (!(sx.mask & kStatxDioAlign)) return false;
  if (sx.dio_offset_align == 0 || sx.dio_mem_align == 0) {
    *out = DioAlignment{};  // the kernel says: no direct I/O for this file
  } else {
    *out = DioAlignment{sx.dio_mem_align, sx.dio_offset_align, true};
  }
  return true;
#else
  (void)dirfd, (void)path, (void)flags, (void)name, (void)out;
  return false;
#endif
}

// Finds the alignment of an O_DIRECT descriptor by trying small reads at offset 0: the smallest
// length that works gives the offset alignment, the smallest buffer misalignment that works gives the
// memory alignment. An empty file cannot be probed; it gets a conservative 4096/4096.
DioAlignment probe_alignment(int fd, int64_t file_size) {
  if (file_size == 0) return DioAlignment{static_cast<uint32_t>(kPage), static_cast<uint32_t>(kPage), true};
  AlignedBuffer buffer;
  char* base = buffer.get(3 * kPage, 2 * kPage);
  DioAlignment a;
  a.offset = 0;
  for (uint32_t size : kProbeSizes) {
    if (pread_retrying(fd, base, size, 0) >= 0) {
      a.offset = size;
      break;
    }
  }
  if (a.offset == 0) return DioAlignment{};  // nothing works: treat as no direct I/O
  a.memory = 2 * kPage;                      // `base` itself worked
  for (uint32_t shift : kProbeSizes) {
    if (pread_retrying(fd, base + shift, a.offset, 0) >= 0) {
      a.memory = shift;
      break;
    }
  }
  a.direct = true;
  return a;
}

// Alignment of files created in directory `dir`, found on an unnamed temporary file (O_TMPFILE).
DioAlignment directory_alignment(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC | O_DIRECT, 0600);
  if (fd < 0 && errno == EINVAL) {  // O_DIRECT refused, or no O_TMPFILE: find out which
    fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0) {
      ::close(fd);
      return DioAlignment{};
    }
  }
  if (fd < 0) throw IoError(errno, dir, "create a temporary file (to probe the alignment) in");
  DioAlignment a;
  try {
    if (!statx_alignment(fd, "", AT_EMPTY_PATH, dir, &a)) {
      AlignedBuffer buffer;
      char* zeros = buffer.get(2 * kPage, kPage);
      std::memset(zeros, 0, 2 * kPage);
      bool written = ::pwrite(fd, zeros, 2 * kPage, 0) == 2 * kPage;
      a = written ? probe_alignment(fd, 2 * kPage) : DioAlignment{static_cast<uint32_t>(kPage),
                                                                  static_cast<uint32_t>(kPage), true};
    }
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  return a;
}

std::string describe(const std::string& path, size_t index, const Extent& e) {
  return "'" + path + "' extent " + std::to_string(index) + " (file offset " +
         std::to_string(e.file_offset) + ", length " + std::to_string(e.length) + ", dest offset " +
         std::to_string(e.dest_offset) + ")";
}

// One piece of an extent, read by one worker. A checked task is whole rows of `row_bytes`, the first
// of them row `first_row` of the request's checksum table.
struct Task {
  int64_t offset;
  int64_t length;
  char* dest;
  int64_t row_bytes;  // 0: not checked
  int64_t first_row;
};

// Workers beyond `threads`: while a worker checks the rows it read, a spare one keeps its read slot
// busy, so checking does not lower the number of reads in flight.
int spare_workers(int threads) { return (threads + 3) / 4; }

// Bytes per task of an extent: max_task_bytes, or for a checked extent the whole rows that fit in it
// (at least one).
int64_t task_step(int64_t max_task_bytes, int64_t row_bytes) {
  if (row_bytes <= 0) return max_task_bytes;
  return std::max<int64_t>(1, max_task_bytes / row_bytes) * row_bytes;
}

// Reads up to `n` bytes at `offset`, looping over short reads; fewer come back only at end of file.
// Errors name the task (the caller's byte range), not the aligned span actually asked of the kernel.
int64_t pread_full(const File& f, const Task& task, char* buf, int64_t n, int64_t offset) {
  int64_t got = 0;
  while (got < n) {
    ssize_t r = pread_retrying(f.fd(), buf + got, static_cast<size_t>(n - got), offset + got);
    if (r < 0) {
      throw IoError(errno, f.path(),
                    "read of " + std::to_string(task.length) + " bytes at offset " +
                        std::to_string(task.offset),
                    task.offset, task.length);
    }
    if (r == 0) break;
    got += r;
  }
  return got;
}

void require_bytes(const File& f, const Task& task, int64_t got, int64_t needed) {
  if (got >= needed) return;
  throw EndOfFileError("'" + f.path() + "': file ended early while reading " +
                           std::to_string(task.length) + " bytes at offset " + std::to_string(task.offset) +
                           " (it was " + std::to_string(f.size()) + " bytes when opened; truncated since?)",
                       f.path(), task.offset, task.length);
}

// Where a planned read of task `t` lands: the bounce buffer `bounce` or the task's destination.
char* read_target(const Task& t, const PlannedRead& r, char* bounce) {
  return r.bounced ? bounce + r.bounce_at : t.dest + r.dest_at;
}

// After a planned read returned `got` bytes at `into`: checks that the file did not end early, and
// copies a bounced read's part of the task to the destination.
void land_read(const File& f, const Task& t, const PlannedRead& r, const char* into, int64_t got) {
  require_bytes(f, t, got, r.need);
  if (r.bounced) std::memcpy(t.dest + r.dest_at, into + r.copy_from, static_cast<size_t>(r.copy_length));
}

// Reads one task into its destination as plan_task plans it; returns the bytes pread returned,
// alignment padding included.
int64_t read_task(const File& f, const Task& t, AlignedBuffer& bounce) {
  const TaskPlan plan = plan_task(t.offset, t.length, reinterpret_cast<uintptr_t>(t.dest), f.alignment());
  char* buf = plan.bounce_bytes > 0 ? bounce.get(static_cast<size_t>(plan.bounce_bytes), f.alignment().memory)
                                    : nullptr;
  int64_t got = 0;
  for (int i = 0; i < plan.count; ++i) {
    const PlannedRead& r = plan.reads[i];
    char* into = read_target(t, r, buf);
    const int64_t n = pread_full(f, t, into, r.n, r.offset);
    land_read(f, t, r, into, n);
    got += n;
  }
  return got;
}

// Checks the CRC-32C of every row of a task that has been read; throws ChecksumError for the first
// row that differs. `crcs` is the worker's scratch space. Returns the rows checked.
int64_t check_rows(const File& f, const Task& t, const uint32_t* table, std::vector<uint32_t>& crcs) {
  const int64_t rows = t.length / t.row_bytes;
  crcs.resize(static_cast<size_t>(rows));
  crc32c_rows(t.dest, static_cast<size_t>(t.row_bytes), static_cast<size_t>(rows), crcs.data());
  const uint32_t* expected = table + t.first_row;
  for (int64_t r = 0; r < rows; ++r) {
    if (crcs[r] != expected[r]) {
      throw ChecksumError(f.path(), t.offset + r * t.row_bytes, t.row_bytes, t.first_row + r, expected[r],
                          crcs[r]);
    }
  }
  return rows;
}

std::string hex32(uint32_t v) {
  char text[9];
  std::snprintf(text, sizeof text, "%08x", v);
  return text;
}

}  // namespace

// ---- errors ----

IoError::IoError(int error_code, const std::string& path, const std::string& detail, int64_t offset,
                 int64_t length)
    : std::runtime_error("'" + path + "': " + detail + " failed: " + std::strerror(error_code)),
      error_code_(error_code),
      path_(path),
      detail_(detail + " failed"),
      offset_(offset),
      length_(length) {}

IoError::IoError(const std::string& message, int error_code, const std::string& path,
                 const std::string& detail, int64_t offset, int64_t length)
    : std::runtime_error(message),
      error_code_(error_code),
      path_(path),
      detail_(detail),
      offset_(offset),
      length_(length) {}

EndOfFileError::EndOfFileError(const std::string& message, const std::string& path, int64_t offset,
                               int64_t length)
    : IoError(message, 0, path, "read past the end of the file", offset, length) {}

ChecksumError::ChecksumError(const std::string& path, int64_t offset, int64_t length, int64_t row,
                             uint32_t expected, uint32_t actual)
    : IoError("'" + path + "': CRC-32C mismatch in row " + std::to_string(row) + " (" +
                  std::to_string(length) + " bytes at offset " + std::to_string(offset) + "): expected " +
                  hex32(expected) + ", read " + hex32(actual),
              EBADMSG, path, "CRC-32C check of row " + std::to_string(row), offset, length),
      row_(row),
      expected_(expected),
      actual_(actual) {}

// ---- task plans ----

TaskPlan plan_task(int64_t offset, int64_t length, uintptr_t dest, const DioAlignment& a) {
  TaskPlan p;
  auto direct = [&p](int64_t at, int64_t n, int64_t dest_at) {
    p.reads[p.count++] = PlannedRead{at, n, n, false, 0, 0, 0, dest_at};
  };
  // The aligned block(s) [at, at + n) into the bounce buffer at `bounce_at`; the task's bytes
  // [from, to) among them are copied out.
  auto bounced = [&p, offset](int64_t bounce_at, int64_t at, int64_t n, int64_t from, int64_t to) {
    p.reads[p.count++] = PlannedRead{at, n, to - at, true, bounce_at, from - at, to - from, from - offset};
  };
  const int64_t end = offset + length;
  if (!a.direct) {
    direct(offset, length, 0);
    return p;
  }
  const int64_t oa = a.offset, ma = a.memory;
  const int64_t span_begin = round_down(offset, oa), span_end = round_up(end, oa);
  const int64_t mid_begin = round_up(offset, oa), mid_end = round_down(end, oa);
  const bool direct_mid = mid_end > mid_begin && (dest + static_cast<uintptr_t>(mid_begin - offset)) % ma == 0;
  if (direct_mid && mid_begin == offset && mid_end == end) {  // fully aligned: no copy
    direct(offset, length, 0);
  } else if (!direct_mid || span_end - span_begin <= kWholeBounceBytes) {
    p.kind = TaskPlan::Kind::bounce;
    p.bounce_bytes = span_end - span_begin;
    bounced(0, span_begin, span_end - span_begin, offset, end);
  } else {  // large and unaligned: head block and tail block through the bounce buffer, middle direct
    p.kind = TaskPlan::Kind::split;
    const int64_t tail_at = round_up(oa, ma);
    p.bounce_bytes = tail_at + oa;
    if (offset < mid_begin) bounced(0, span_begin, oa, offset, mid_begin);
    direct(mid_begin, mid_end - mid_begin, mid_begin - offset);
    if (end > mid_end) bounced(tail_at, mid_end, oa, mid_end, end);
  }
  return p;
}

// ---- alignment ----

DioAlignment dio_alignment(const std::string& path) {
  DioAlignment a;
  if (statx_alignment(AT_FDCWD, path.c_str(), 0, path, &a)) return a;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw IoError(errno, path, "stat");
  if (S_ISDIR(st.st_mode)) return directory_alignment(path);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (fd < 0 && errno == EINVAL) return DioAlignment{};  // the file system refuses O_DIRECT
  if (fd < 0) throw IoError(errno, path, "open");
  const off_t size = ::lseek(fd, 0, SEEK_END);  // st_size is 0 for block devices
  a = probe_alignment(fd, size > 0 ? size : 0);
  ::close(fd);
  return a;
}

// ---- files ----

std::shared_ptr<File> File::open(const std::string& path) {
  std::shared_ptr<File> f(new File());
  f->path_ = path;
  bool direct = true;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (fd < 0 && errno == EINVAL) {
    direct = false;
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  }
  if (fd < 0) throw IoError(errno, path, "open");
  f->fd_ = fd;  // closed by ~File from here on

  struct stat st;
  if (::fstat(fd, &st) != 0) throw IoError(errno, path, "fstat");
  if (S_ISDIR(st.st_mode)) throw IoError(EISDIR, path, "open");
  off_t end = ::lseek(fd, 0, SEEK_END);  // also right for block devices, whose st_size is 0
  if (end < 0) throw IoError(errno, path, "seek");
  f->size_ = end;

  if (direct) {
    DioAlignment a;
    if (!statx_alignment(fd, "", AT_EMPTY_PATH, path, &a)) a = probe_alignment(fd, f->size_);
    if (!a.direct) {  // O_DIRECT was accepted at open but does not work for this file
      int flags = ::fcntl(fd, F_GETFL);
      if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_DIRECT) != 0) {
        throw IoError(errno, path, "turn off O_DIRECT");
      }
    }
    f->alignment_ = a;
  }
  return f;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

// ---- requests ----

struct RequestState {
  std::shared_ptr<File> file;
  std::vector<Extent> extents;
  RowChecksums checks;  // empty `extents`: nothing checked
  char* dest = nullptr;
  int64_t max_task_bytes = 0;
  Clock::time_point start;
  uint64_t total_tasks = 0;
  std::atomic<bool> failed{false};

  // Dispatch cursor, touched only under the reader's queue lock.
  size_t next_extent = 0;
  int64_t next_pos = 0;
  uint64_t dispatched = 0;

  // Completion, guarded by `mu`.
  std::mutex mu;
  std::condition_variable finished_cv;
  uint64_t unfinished = 0;
  bool complete = false;
  ReadStats stats;
  std::exception_ptr error;

  // True when every task has been handed out; skips spent and zero-length extents.
  bool exhausted() {
    while (next_extent < extents.size() && next_pos >= extents[next_extent].length) {
      ++next_extent;
      next_pos = 0;
    }
    return next_extent == extents.size();
  }

  bool next_task(Task* t) {
    if (exhausted()) return false;
    const Extent& e = extents[next_extent];
    const RowCheck check = checks.extents.empty() ? RowCheck{0, 0} : checks.extents[next_extent];
    int64_t n = std::min(task_step(max_task_bytes, check.row_bytes), e.length - next_pos);
    const int64_t first_row = check.row_bytes > 0 ? check.first_row + next_pos / check.row_bytes : 0;
    *t = Task{e.file_offset + next_pos, n, dest + e.dest_offset + next_pos, check.row_bytes, first_row};
    next_pos += n;
    ++dispatched;
    return true;
  }

  void finish_tasks(uint64_t count, int64_t bytes_read, int64_t rows_checked, std::exception_ptr err) {
    if (err) failed.store(true, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu);
    stats.bytes_read += static_cast<uint64_t>(bytes_read);
    stats.rows_checked += static_cast<uint64_t>(rows_checked);
    if (err && !error) error = err;
    unfinished -= count;
    if (unfinished == 0) {
      stats.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
      complete = true;
      finished_cv.notify_all();
    }
  }

  void wait_complete() {
    std::unique_lock<std::mutex> lock(mu);
    finished_cv.wait(lock, [this] { return complete; });
  }
};

ReadRequest::ReadRequest(std::shared_ptr<RequestState> state) : state_(std::move(state)) {}

ReadRequest& ReadRequest::operator=(ReadRequest&& other) noexcept {
  if (this != &other) {
    if (state_) state_->wait_complete();
    state_ = std::move(other.state_);
  }
  return *this;
}

ReadRequest::~ReadRequest() {
  if (state_) state_->wait_complete();
}

ReadStats ReadRequest::wait() {
  if (!state_) throw std::logic_error("wait() on an empty (moved-from) read request");
  state_->wait_complete();
  std::lock_guard<std::mutex> lock(state_->mu);
  if (state_->error) std::rethrow_exception(state_->error);
  return state_->stats;
}

bool ReadRequest::done() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->complete;
}

// ---- io_uring backend ----

namespace {

// One planned read of a task on the ring: it reads into `buf`, and has returned `got` bytes so far.
struct RingRead {
  PlannedRead plan;
  char* buf;
  int64_t got;
  struct iovec iov;
};

// A task in flight on the ring: its planned reads (up to three: bounce head, direct middle, bounce
// tail), the same spans read_task reads with pread.
struct RingSlot {
  std::shared_ptr<RequestState> request;
  Task task{};
  AlignedBuffer bounce;
  RingRead reads[3];
  int count = 0;
  int pending = 0;
  std::exception_ptr error;

  // Plans the task's reads (plan_task, as read_task does).
  void plan(const File& f) {
    error = nullptr;
    const TaskPlan p = plan_task(task.offset, task.length, reinterpret_cast<uintptr_t>(task.dest), f.alignment());
    char* buf = p.bounce_bytes > 0 ? bounce.get(static_cast<size_t>(p.bounce_bytes), f.alignment().memory)
                                   : nullptr;
    count = p.count;
    for (int i = 0; i < count; ++i) reads[i] = RingRead{p.reads[i], read_target(task, p.reads[i], buf), 0, {}};
  }

  // After the last read: checks the lengths and copies out of the bounce buffer; returns the bytes
  // the reads returned. Throws like read_task.
  int64_t finish(const File& f) {
    if (error) std::rethrow_exception(error);
    int64_t got = 0;
    for (int i = 0; i < count; ++i) {
      land_read(f, task, reads[i].plan, reads[i].buf, reads[i].got);
      got += reads[i].got;
    }
    return got;
  }
};

}  // namespace

// The state of the io_uring backend: the ring, the thread that drives it, and the row checks waiting
// for a checker thread. Tasks come from the reader's queue, as for the workers.
struct RingBackend {
  struct CheckJob {
    std::shared_ptr<RequestState> request;
    Task task;
    int64_t got;
  };

  explicit RingBackend(unsigned entries) : ring(entries) {}

  Uring ring;
  std::mutex check_mu;
  std::condition_variable check_cv;  // a check was queued, or the ring thread has finished
  std::deque<CheckJob> checks;
  bool ring_done = false;
};

// ---- reader ----

struct Reader::Impl {
  int threads = 0;  // reads in flight at most
  int64_t max_task_bytes = 0;
  size_t max_queued = 0;

  std::mutex mu;  // guards the queue, `closing`, `reading` and every request's dispatch cursor
  int reading = 0;  // workers inside read_task
  std::condition_variable work_cv;   // a request was queued, a read slot freed, or the reader is closing
  std::condition_variable space_cv;  // a request left the queue, or the reader is closing
  std::deque<std::shared_ptr<RequestState>> queue;
  bool closing = false;

  std::mutex join_mu;
  std::vector<std::thread> workers;

  // io_uring backend (null: the thread pool). `checks_pending` (guarded by `mu`) counts tasks read
  // and waiting for or in a row check; the ring takes no new task while `threads` of them wait.
  ReaderBackend backend = ReaderBackend::threads;
  std::string backend_note;
  std::unique_ptr<RingBackend> ring;
  int checks_pending = 0;

  void worker_main();
  void ring_main();
  void checker_main();
  // Takes the next task of the queue front (false: none); `wait` blocks until one is there or the
  // reader closes, otherwise returns false at once when none is ready. `leaving`: closing and done.
  bool take_task(bool wait, std::shared_ptr<RequestState>* request, Task* task, bool* leaving);
  void enqueue(const std::shared_ptr<RequestState>& request);
  void stop();
};

void Reader::Impl::worker_main() {
  AlignedBuffer bounce;
  std::vector<uint32_t> crcs;  // row checksums of the current task
  for (;;) {
    std::shared_ptr<RequestState> request;
    Task task{};
    bool have_task = false;
    uint64_t abandoned = 0;
    {
      std::unique_lock<std::mutex> lock(mu);
      work_cv.wait(lock, [this] { return (closing && queue.empty()) || (!queue.empty() && reading < threads); });
      if (queue.empty()) {  // closing, and all queued work is handed out: wake the others to leave too
        work_cv.notify_all();
        return;
      }
      request = queue.front();
      if (!request->failed.load(std::memory_order_relaxed)) have_task = request->next_task(&task);
      if (have_task) ++reading;
      if (!have_task || request->exhausted()) {
        queue.pop_front();
        abandoned = request->total_tasks - request->dispatched;  // tasks skipped after an error
        space_cv.notify_one();
      }
    }
    if (abandoned > 0) request->finish_tasks(abandoned, 0, 0, nullptr);
    if (!have_task) continue;
    int64_t got = 0, rows = 0;
    std::exception_ptr error;
    try {
      got = read_task(*request->file, task, bounce);
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      --reading;
    }
    if (task.row_bytes > 0) {
      work_cv.notify_one();  // a spare worker takes the read slot while this one checks the rows
      try {
        if (!error) rows = check_rows(*request->file, task, request->checks.table, crcs);
      } catch (...) {
        error = std::current_exception();
      }
    }
    request->finish_tasks(1, got, rows, error);
  }
}

bool Reader::Impl::take_task(bool wait, std::shared_ptr<RequestState>* request, Task* task, bool* leaving) {
  std::shared_ptr<RequestState> front;
  bool have_task = false;
  uint64_t abandoned = 0;
  {
    std::unique_lock<std::mutex> lock(mu);
    auto ready = [this] { return !queue.empty() && checks_pending < threads; };
    if (wait) {
      work_cv.wait(lock, [&] { return (closing && queue.empty()) || ready(); });
      if (queue.empty()) {
        *leaving = true;
        return false;
      }
    } else if (!ready()) {
      return false;
    }
    front = queue.front();
    if (!front->failed.load(std::memory_order_relaxed)) have_task = front->next_task(task);
    if (!have_task || front->exhausted()) {
      queue.pop_front();
      abandoned = front->total_tasks - front->dispatched;  // tasks skipped after an error
      space_cv.notify_one();
    }
  }
  if (abandoned > 0) front->finish_tasks(abandoned, 0, 0, nullptr);
  if (have_task) *request = std::move(front);
  return have_task;
}

void Reader::Impl::ring_main() {
  Uring& uring = ring->ring;
  std::vector<RingSlot> slots(static_cast<size_t>(threads));
  std::vector<int> free_slots;
  for (int i = threads - 1; i >= 0; --i) free_slots.push_back(i);
  std::vector<UringCompletion> done(uring.capacity());
  unsigned in_flight = 0;  // reads queued or submitted and not yet reaped

  auto complete_slot = [&](int index) {
    RingSlot& s = slots[static_cast<size_t>(index)];
    std::shared_ptr<RequestState> request = std::move(s.request);
    const Task task = s.task;
    int64_t got = 0;
    std::exception_ptr error;
    try {
      got = s.finish(*request->file);
    } catch (...) {
      error = std::current_exception();
    }
    free_slots.push_back(index);
    if (!error && task.row_bytes > 0) {
      {
        std::lock_guard<std::mutex> lock(mu);
        ++checks_pending;
      }
      {
        std::lock_guard<std::mutex> lock(ring->check_mu);
        ring->checks.push_back(RingBackend::CheckJob{std::move(request), task, got});
      }
      ring->check_cv.notify_one();
    } else {
      request->finish_tasks(1, got, 0, error);
    }
  };
  auto queue_read = [&](int index, int i) {
    RingRead& r = slots[static_cast<size_t>(index)].reads[i];
    r.iov.iov_base = r.buf + r.got;
    r.iov.iov_len = static_cast<size_t>(r.plan.n - r.got);
    uring.queue_read(slots[static_cast<size_t>(index)].request->file->fd(), &r.iov,
                     static_cast<uint64_t>(r.plan.offset + r.got), static_cast<uint64_t>(index) * 4 + i);
    ++in_flight;
  };
  auto on_completion = [&](uint64_t user_data, int32_t result) {
    --in_flight;
    const int index = static_cast<int>(user_data / 4), i = static_cast<int>(user_data % 4);
    RingSlot& s = slots[static_cast<size_t>(index)];
    RingRead& r = s.reads[i];
    if (result == -EINTR || result == -EAGAIN) return queue_read(index, i);
    if (result < 0) {
      if (!s.error) {
        s.error = std::make_exception_ptr(IoError(-result, s.request->file->path(),
                                                  "read of " + std::to_string(s.task.length) + " bytes at offset " +
                                                      std::to_string(s.task.offset),
                                                  s.task.offset, s.task.length));
      }
    } else if (result > 0) {
      r.got += result;
      if (r.got < r.plan.n) return queue_read(index, i);  // short read: ask for the rest
    }                                                // 0: end of file, finish() tells
    if (--s.pending == 0) complete_slot(index);
  };
  struct Refusal {
    decltype(on_completion)* handle;
    int error;
  };

  bool leaving = false;
  while (!leaving) {
    while (!free_slots.empty()) {
      std::shared_ptr<RequestState> request;
      Task task{};
      if (!take_task(in_flight == 0, &request, &task, &leaving)) {
        if (leaving || in_flight > 0) break;
        continue;  // the front request was spent or failed: look again
      }
      const int index = free_slots.back();
      free_slots.pop_back();
      RingSlot& s = slots[static_cast<size_t>(index)];
      s.request = std::move(request);
      s.task = task;
      s.plan(*s.request->file);
      s.pending = s.count;
      for (int i = 0; i < s.count; ++i) queue_read(index, i);
    }
    if (in_flight == 0) continue;  // leaving, or nothing was ready
    Refusal refusal{&on_completion, 0};
    const int error = uring.submit_and_wait(
        1,
        [](void* context, uint64_t user_data) {
          Refusal* r = static_cast<Refusal*>(context);
          (*r->handle)(user_data, -r->error);
        },
        &refusal);
    (void)error;  // refused reads failed above with that errno, naming their task
    const unsigned n = uring.reap(done.data(), static_cast<unsigned>(done.size()));
    for (unsigned k = 0; k < n; ++k) on_completion(done[k].user_data, done[k].result);
  }
  {
    std::lock_guard<std::mutex> lock(ring->check_mu);
    ring->ring_done = true;
  }
  ring->check_cv.notify_all();
}

void Reader::Impl::checker_main() {
  std::vector<uint32_t> crcs;  // row checksums of the current task
  for (;;) {
    RingBackend::CheckJob job;
    {
      std::unique_lock<std::mutex> lock(ring->check_mu);
      ring->check_cv.wait(lock, [this] { return ring->ring_done || !ring->checks.empty(); });
      if (ring->checks.empty()) return;
      job = std::move(ring->checks.front());
      ring->checks.pop_front();
    }
    int64_t rows = 0;
    std::exception_ptr error;
    try {
      rows = check_rows(*job.request->file, job.task, job.request->checks.table, crcs);
    } catch (...) {
      error = std::current_exception();
    }
    job.request->finish_tasks(1, job.got, rows, error);
    {
      std::lock_guard<std::mutex> lock(mu);
      --checks_pending;
    }
    work_cv.notify_all();
  }
}

void Reader::Impl::enqueue(const std::shared_ptr<RequestState>& request) {
  {
    std::unique_lock<std::mutex> lock(mu);
    space_cv.wait(lock, [this] { return closing || queue.size() < max_queued; });
    if (closing) throw std::runtime_error("the reader is closed");
    queue.push_back(request);
  }
  if (request->total_tasks >= static_cast<uint64_t>(threads)) {
    work_cv.notify_all();
  } else {
    for (uint64_t i = 0; i < request->total_tasks; ++i) work_cv.notify_one();
  }
}

void Reader::Impl::stop() {
  std::lock_guard<std::mutex> join_lock(join_mu);
  {
    std::lock_guard<std::mutex> lock(mu);
    closing = true;
  }
  work_cv.notify_all();
  space_cv.notify_all();
  for (std::thread& w : workers) w.join();
  workers.clear();
}

Reader::Reader(int threads, int64_t max_task_bytes, int max_queued_requests, ReaderBackend backend)
    : impl_(new Impl()) {
  if (threads < 1 || threads > 1024) {
    throw std::invalid_argument("threads must be between 1 and 1024, got " + std::to_string(threads));
  }
  if (max_task_bytes < kPage || max_task_bytes % kPage != 0 || max_task_bytes > (int64_t{1} << 30)) {
    throw std::invalid_argument("max_task_bytes must be a multiple of 4096 between 4 KiB and 1 GiB, got " +
                                std::to_string(max_task_bytes));
  }
  if (max_queued_requests < 1) {
    throw std::invalid_argument("max_queued_requests must be at least 1, got " +
                                std::to_string(max_queued_requests));
  }
  impl_->threads = threads;
  impl_->max_task_bytes = max_task_bytes;
  impl_->max_queued = static_cast<size_t>(max_queued_requests);
  if (backend == ReaderBackend::io_uring) {
    try {
      impl_->ring.reset(new RingBackend(static_cast<unsigned>(next_power_of_two(3 * static_cast<size_t>(threads)))));
      if (impl_->ring->ring.capacity() < 3 * static_cast<unsigned>(threads)) {
        throw UringUnavailable("the kernel's io_uring holds " + std::to_string(impl_->ring->ring.capacity()) +
                               " entries, fewer than 3 x " + std::to_string(threads) + " reads in flight");
      }
    } catch (const UringUnavailable& e) {
      impl_->ring.reset();
      impl_->backend_note = e.what();
      backend = ReaderBackend::threads;
    }
  }
  impl_->backend = backend;
  try {
    if (impl_->ring) {
      impl_->workers.emplace_back([this] { impl_->ring_main(); });
      for (int i = 0; i < spare_workers(threads); ++i) impl_->workers.emplace_back([this] { impl_->checker_main(); });
    } else {
      const int workers = threads + spare_workers(threads);
      for (int i = 0; i < workers; ++i) impl_->workers.emplace_back([this] { impl_->worker_main(); });
    }
  } catch (...) {
    impl_->stop();
    throw;
  }
}

Reader::~Reader() { impl_->stop(); }

void Reader::close() { impl_->stop(); }

int Reader::threads() const { return impl_->threads; }

int64_t Reader::max_task_bytes() const { return impl_->max_task_bytes; }

ReaderBackend Reader::backend() const { return impl_->backend; }

const std::string& Reader::backend_note() const { return impl_->backend_note; }

std::shared_ptr<File> Reader::open(const std::string& path) const { return File::open(path); }

ReadRequest Reader::submit(std::shared_ptr<File> file, std::vector<Extent> extents, void* dest,
                           size_t dest_bytes, RowChecksums checks) {
  const Clock::time_point start = Clock::now();
  if (!file) throw std::invalid_argument("submit() needs an open file");
  if (dest == nullptr && dest_bytes > 0) throw std::invalid_argument("null destination buffer");
  const int64_t size = file->size();
  const int64_t capacity = static_cast<int64_t>(dest_bytes);
  const int64_t step = impl_->max_task_bytes;
  const bool checked = !checks.extents.empty();
  if (checked && checks.extents.size() != extents.size()) {
    throw ExtentError("'" + file->path() + "': " + std::to_string(checks.extents.size()) + " row checks for " +
                      std::to_string(extents.size()) + " extents; give one per extent, or none");
  }
  if (checked && (checks.table_rows < 0 || (checks.table == nullptr && checks.table_rows > 0))) {
    throw ExtentError("'" + file->path() + "': invalid checksum table");
  }
  uint64_t tasks = 0, bytes = 0;
  for (size_t i = 0; i < extents.size(); ++i) {
    const Extent& e = extents[i];
    if (e.file_offset < 0 || e.length < 0 || e.dest_offset < 0) {
      throw ExtentError(describe(file->path(), i, e) + ": negative value");
    }
    if (e.file_offset > size || e.length > size - e.file_offset) {
      throw EndOfFileError(describe(file->path(), i, e) + ": reads past the end of the file (" +
                               std::to_string(size) + " bytes)",
                           file->path(), e.file_offset, e.length);
    }
    if (e.dest_offset > capacity || e.length > capacity - e.dest_offset) {
      throw ExtentError(describe(file->path(), i, e) + ": destination range ends beyond the " +
                        std::to_string(dest_bytes) + "-byte buffer");
    }
    const RowCheck check = checked ? checks.extents[i] : RowCheck{0, 0};
    if (check.row_bytes < 0 || check.first_row < 0) {
      throw ExtentError(describe(file->path(), i, e) + ": negative row size or first row");
    }
    if (check.row_bytes > 0 && e.length % check.row_bytes != 0) {
      throw ExtentError(describe(file->path(), i, e) + ": not a whole number of " +
                        std::to_string(check.row_bytes) + "-byte rows");
    }
    if (check.row_bytes > 0 && (check.first_row > checks.table_rows ||
                                e.length / check.row_bytes > checks.table_rows - check.first_row)) {
      throw ExtentError(describe(file->path(), i, e) + ": rows from " + std::to_string(check.first_row) +
                        " run past the " + std::to_string(checks.table_rows) + "-row checksum table");
    }
    const int64_t extent_step = task_step(step, check.row_bytes);
    tasks += static_cast<uint64_t>((e.length + extent_step - 1) / extent_step);
    bytes += static_cast<uint64_t>(e.length);
  }

  auto state = std::make_shared<RequestState>();
  state->file = std::move(file);
  state->dest = static_cast<char*>(dest);
  state->max_task_bytes = step;
  state->start = start;
  state->total_tasks = tasks;
  state->unfinished = tasks;
  state->stats.bytes = bytes;
  state->stats.requests = extents.size();
  state->stats.tasks = tasks;
  state->extents = std::move(extents);
  state->checks = std::move(checks);
  if (tasks == 0) {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->closing) throw std::runtime_error("the reader is closed");
    state->complete = true;
    state->stats.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  } else {
    impl_->enqueue(state);
  }
  return ReadRequest(std::move(state));
}

ReadStats Reader::read(std::shared_ptr<File> file, std::vector<Extent> extents, void* dest,
                       size_t dest_bytes, RowChecksums checks) {
  return submit(std::move(file), std::move(extents), dest, dest_bytes, std::move(checks)).wait();
}

}  // namespace nchunk
