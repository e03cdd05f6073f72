// Threaded direct-I/O reader: fills a caller's buffer with byte ranges ("extents") of a file.
//
// A fixed pool of worker threads serves submitted requests in order. Each request is a list of extents
// (file offset, length, destination offset); extents longer than `max_task_bytes` are cut into tasks of
// at most that size, and the tasks are handed out lazily, so at most `threads` tasks are in flight and
// no task list is ever materialised. Files are opened with O_DIRECT where the file system allows it;
// aligned spans are read straight into the destination, and unaligned heads, tails or destinations go
// through a per-worker aligned bounce buffer. Where O_DIRECT is refused the file is read with ordinary
// buffered pread (File::direct() says which).
//
// Errors are C++ exceptions: IoError (an errno from open/read, with path, offset and length),
// ExtentError (a malformed extent or a destination range outside the buffer) and EndOfFileError (an
// extent past the end of the file, or a file that ended early). Errors raised on a worker thread are
// captured and rethrown by ReadRequest::wait() on the caller's thread. This core knows nothing of Python.
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

// An errno from a system call on `path`; offset/length are the byte range being read (-1 for open).
class IoError : public std::runtime_error {
 public:
  IoError(int error_code, const std::string& path, const std::string& detail, int64_t offset = -1,
          int64_t length = -1);
  int error_code() const { return error_code_; }
  const std::string& path() const { return path_; }
  // What failed, without the path or the errno text, e.g. "read of 4096 bytes at offset 8192".
  const std::string& detail() const { return detail_; }
  int64_t offset() const { return offset_; }
  int64_t length() const { return length_; }

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
class EndOfFileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Reads `length` bytes at `file_offset` into the destination buffer at byte `dest_offset`.
// Zero-length extents are valid and read nothing.
struct Extent {
  int64_t file_offset;
  int64_t length;
  int64_t dest_offset;
};

// What one request did.
struct ReadStats {
  uint64_t bytes = 0;       // bytes requested (sum of extent lengths)
  uint64_t bytes_read = 0;  // bytes returned by pread, including alignment padding
  uint64_t requests = 0;    // number of extents
  uint64_t tasks = 0;       // number of worker tasks the extents were cut into
  double wall_s = 0.0;      // from submit to completion of the last task
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

class Reader {
 public:
  // `threads` workers; extents are cut into tasks of at most `max_task_bytes` (a multiple of 4096);
  // `submit` blocks while `max_queued_requests` requests are already waiting for a worker.
  explicit Reader(int threads = 6, int64_t max_task_bytes = 1 << 20, int max_queued_requests = 64);
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  std::shared_ptr<File> open(const std::string& path) const;

  // Validates the extents against the file size and the `dest_bytes` bytes at `dest` (throws
  // ExtentError or EndOfFileError), then queues the read and returns at once. The caller keeps `dest`
  // alive until the request is done. Thread-safe.
  ReadRequest submit(std::shared_ptr<File> file, std::vector<Extent> extents, void* dest,
                     size_t dest_bytes);
  // submit() followed by wait().
  ReadStats read(std::shared_ptr<File> file, std::vector<Extent> extents, void* dest,
                 size_t dest_bytes);

  // Finishes all queued work and stops the workers; later submits throw std::runtime_error.
  void close();

  int threads() const;
  int64_t max_task_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace nchunk
