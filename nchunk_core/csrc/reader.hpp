// Direct-I/O reader: fills a caller's buffer with byte ranges ("extents") of a file.
//
// A fixed pool of worker threads serves submitted requests in order (or, with the io_uring backend,
// one thread driving a ring with the same tasks in flight: see ReaderBackend below). Each request is a list of extents
// (file offset, length, destination offset); extents longer than `max_task_bytes` are cut into tasks of
// at most that size, and the tasks are handed out lazily, so at most `threads` tasks are in flight and
// no task list is ever materialised. Files are opened with O_DIRECT where the file system allows it;
// aligned spans are read straight into the destination, and unaligned heads, tails or destinations go
// through a per-worker aligned bounce buffer. Where O_DIRECT is refused the file is read with ordinary
// buffered pread (File::direct() says which).
//
// A request may carry the expected CRC-32C of the rows its extents read (RowChecksums). Tasks of such
// an extent are then cut at row boundaries, and the worker that read a task checks every row in it
// before the task counts as done, while the bytes are still in its cache. At most `threads` workers
// read at a time; a few spare workers ((threads + 3) / 4) take the read slot of a worker that is
// checking rows, so the checks do not lower the number of reads in flight.
//
// Errors are C++ exceptions. IoError names the path, offset and length, with an errno from open/read;
// its subclasses are EndOfFileError (an extent past the end of the file, or a file that ended early)
// and ChecksumError (a row whose CRC-32C differs from the expected one). ExtentError is a malformed
// extent or a destination range outside the buffer. Errors raised on a worker thread are captured and
// rethrown by ReadRequest::wait() on the caller's thread. This core knows nothing of Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace nchunk {

// Direct-I/O alignment of a file: buffer address (`memory`) and file offset/length (`offset`) must be
// multiples of these for an O_DIRECT read. When `direct` is false both are 1 (no constraint).
struct DioAlignment {
  uint32_t memory = 1;
  uint32_t offset = 1;
  bool direct = false;
};

// Queries the alignment with statx(STATX_DIOALIGN); if the kernel or file system does not report it,
// probes with small O_DIRECT reads (an empty file cannot be probed and gets 4096/4096). For a directory,
// answers for new files created in it. Throws IoError if the path cannot be inspected (ENOENT...).
DioAlignment dio_alignment(const std::string& path);

// A failed open or read of `path`; offset/length are the byte range being read (-1 for open). The
// base class itself is an errno from a system call.
class IoError : public std::runtime_error {
 public:
  IoError(int error_code, const std::string& path, const std::string& detail, int64_t offset = -1,
          int64_t length = -1);
  // The errno; 0 for an EndOfFileError.
  int error_code() const { return error_code_; }
  const std::string& path() const { return path_; }
  // What failed, without the path or the errno text, e.g. "read of 4096 bytes at offset 8192".
  const std::string& detail() const { return detail_; }
  int64_t offset() const { return offset_; }
  int64_t length() const { return length_; }

 protected:
  IoError(const std::string& message, int error_code, const std::string& path, const std::string& detail,
          int64_t offset, int64_t length);

 private:
  int error_code_;
  std::string path_;
  std::string detail_;
  int64_t offset_;
  int64_t length_;
};

// A malformed extent (negative field, destination range outside the buffer) or bad reader option.
class ExtentError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A read past the end of the file: rejected at submit, or the file shrank while being read.
class EndOfFileError : public IoError {
 public:
  EndOfFileError(const std::string& message, const std::string& path, int64_t offset, int64_t length);
};

// A row whose bytes, as read, do not have the CRC-32C the request expected. offset/length are the
// row's bytes in the file; row() is its index in the request's checksum table. errno is EBADMSG.
class ChecksumError : public IoError {
 public:
  ChecksumError(const std::string& path, int64_t offset, int64_t length, int64_t row, uint32_t expected,
                uint32_t actual);
  int64_t row() const { return row_; }
  uint32_t expected() const { return expected_; }
  uint32_t actual() const { return actual_; }

 private:
  int64_t row_;
  uint32_t expected_;
  uint32_t actual_;
};

// Reads `length` bytes at `file_offset` into the destination buffer at byte `dest_offset`.
// Zero-length extents are valid and read nothing.
struct Extent {
  int64_t file_offset;
  int64_t length;
  int64_t dest_offset;
};

// How to check the rows one extent reads: the extent is length / row_bytes whole rows, whose expected
// CRC-32C values are table[first_row], table[first_row + 1], ... of the request's RowChecksums.
// row_bytes == 0 leaves the extent unchecked.
struct RowCheck {
  int64_t row_bytes;
  int64_t first_row;
};

// The expected CRC-32C of the rows a request reads: one RowCheck per extent (or none at all: nothing
// is checked) and the table they index, which the caller keeps alive until the request is done.
struct RowChecksums {
  const uint32_t* table = nullptr;
  int64_t table_rows = 0;
  std::vector<RowCheck> extents;
};

// What one request did.
struct ReadStats {
  uint64_t bytes = 0;         // bytes requested (sum of extent lengths)
  uint64_t bytes_read = 0;    // bytes returned by pread, including alignment padding
  uint64_t requests = 0;      // number of extents
  uint64_t tasks = 0;         // number of worker tasks the extents were cut into
  double wall_s = 0.0;        // from submit to completion of the last task
  uint64_t rows_checked = 0;  // rows whose CRC-32C was checked (and matched)
};

// An open file; shared (std::shared_ptr) by the caller and by requests still reading it.
class File {
 public:
  // Opens `path` read-only, with O_DIRECT unless the file system refuses it. Throws IoError.
  static std::shared_ptr<File> open(const std::string& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  int64_t size() const { return size_; }
  bool direct() const { return alignment_.direct; }
  const DioAlignment& alignment() const { return alignment_; }
  int fd() const { return fd_; }

 private:
  File() = default;
  std::string path_;
  int fd_ = -1;
  int64_t size_ = 0;
  DioAlignment alignment_;
};

struct RequestState;

// The caller's handle on a submitted read. Move-only; the destructor waits for the read to finish, so
// the destination buffer may be freed once the handle is gone.
class ReadRequest {
 public:
  explicit ReadRequest(std::shared_ptr<RequestState> state);
  ReadRequest(ReadRequest&&) noexcept = default;
  ReadRequest& operator=(ReadRequest&&) noexcept;
  ~ReadRequest();

  // Blocks until every task has finished; returns the statistics or rethrows the first error.
  // May be called any number of times (each call rethrows the same error).
  ReadStats wait();
  // True once every task has finished (successfully or not).
  bool done() const;

 private:
  std::shared_ptr<RequestState> state_;
};

// How a Reader issues its reads: a pool of threads calling pread, or one thread driving an io_uring
// (uring.hpp) with the same number of tasks in flight, whose completions are copied out of bounce
// buffers on that thread and whose rows are checked on a few checker threads as they arrive.
enum class ReaderBackend { threads, io_uring };

class Reader {
 public:
  // At most `threads` reads in flight (with a few spare workers, see above); extents are cut into
  // tasks of at most `max_task_bytes` (a multiple of 4096); `submit` blocks while
  // `max_queued_requests` requests are already waiting for a worker. With `backend` io_uring, where
  // no ring can be set up the reader uses the thread pool: backend() says which, backend_note() why.
  explicit Reader(int threads = 6, int64_t max_task_bytes = 1 << 20, int max_queued_requests = 64,
                  ReaderBackend backend = ReaderBackend::threads);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  std::shared_ptr<File> open(const std::string& path) const;

  // Validates the extents against the file size and the `dest_bytes` bytes at `dest`, and the row
  // checks against the extents and the table (throws ExtentError or EndOfFileError), then queues the
  // read and returns at once. The caller keeps `dest` and `checks.table` alive until the request is
  // done. A checked extent is cut into tasks of whole rows (at least one row, so a task may exceed
  // max_task_bytes when a row does). Thread-safe.
  ReadRequest submit(std::shared_ptr<File> file, std::vector<Extent> extents, void* dest,
                     size_t dest_bytes, RowChecksums checks = {});
  // submit() followed by wait().
  ReadStats read(std::shared_ptr<File> file, std::vector<Extent> extents, void* dest,
                 size_t dest_bytes, RowChecksums checks = {});

  // Finishes all queued work and stops the workers; later submits throw std::runtime_error.
  void close();

  int threads() const;
  int64_t max_task_bytes() const;
  // The backend in use, and why it is not the one asked for ("" when it is).
  ReaderBackend backend() const;
  const std::string& backend_note() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nchunk
