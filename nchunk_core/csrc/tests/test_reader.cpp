// Standalone test of the C++ reader core (no Python): the plan of one task's reads (task_plan.hpp),
// correctness of reads for aligned and unaligned extents, task splitting and statistics, async requests, concurrent callers, CRC-32C on the hardware
// and table paths, row checks and their mismatches, and every error path; all of it once with the
// thread pool and once with the io_uring backend (where the kernel gives a ring), which must also read
// the same bytes as the thread pool for random extents, and fall back when NCHUNK_IO_URING=off.
// Build: g++ -std=c++17 -O1 -pthread -I nchunk_core/csrc nchunk_core/csrc/tests/test_reader.cpp
//        nchunk_core/csrc/reader.cpp nchunk_core/csrc/uring.cpp nchunk_core/csrc/crc32c.cpp -o test_reader
//        && ./test_reader [scratch_dir]
// Exits 0 when every check passes; each failure prints a line. The scratch directory (default /tmp)
// must be on a file system with O_DIRECT.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "crc32c.hpp"
#include "reader.hpp"
#include "task_plan.hpp"
#include "uring.hpp"

using nchunk::Crc32cPath;
using nchunk::Extent;

namespace {

int g_failures = 0;
// The backend every test reader asks for; main runs the tests once per backend.
nchunk::ReaderBackend g_backend = nchunk::ReaderBackend::threads;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Runs `body`, which must throw E; returns the exception's message ("" if it did not throw E).
template <typename E>
std::string expect_throw(const std::function<void()>& body, const std::string& what,
                         const std::function<bool(const E&)>& accept = nullptr) {
  try {
    body();
  } catch (const E& e) {
    check(!accept || accept(e), what + ": wrong details in \"" + e.what() + "\"");
    return e.what();
  } catch (const std::exception& e) {
    check(false, what + ": threw a different exception: " + e.what());
    return "";
  }
  check(false, what + ": did not throw");
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// An aligned scratch buffer of `n` bytes plus slack so callers can misalign the start on purpose.
struct Buffer {
  explicit Buffer(size_t n) : size(n) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, n + 4096) != 0) std::abort();
    data = static_cast<char*>(p);
    std::memset(data, 0, n + 4096);
  }
  ~Buffer() { std::free(data); }
  char* data;
  size_t size;
};

std::string write_file(const std::string& dir, const std::string& name, const std::vector<char>& bytes) {
  std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  return path;
}

// Checks that `dest` holds the file bytes each extent names.
bool matches(const std::vector<char>& file, const std::vector<Extent>& extents, const char* dest) {
  for (const Extent& e : extents) {
    if (std::memcmp(dest + e.dest_offset, file.data() + e.file_offset, e.length) != 0) return false;
  }
  return true;
}

void test_alignment(const std::string& dir, const std::string& path) {
  nchunk::DioAlignment a = nchunk::dio_alignment(path);
  check(a.direct, "dio_alignment reports direct I/O on " + path);
  check(a.memory >= 1 && a.memory <= 4096 && (a.memory & (a.memory - 1)) == 0, "memory alignment power of 2");
  check(a.offset >= 512 && a.offset <= 4096 && (a.offset & (a.offset - 1)) == 0, "offset alignment power of 2");
  nchunk::DioAlignment d = nchunk::dio_alignment(dir);
  check(d.direct && d.offset == a.offset, "directory alignment matches a file's");
  expect_throw<nchunk::IoError>([&] { nchunk::dio_alignment(dir + "/missing"); }, "alignment of missing file",
                                [](const nchunk::IoError& e) { return e.error_code() == ENOENT; });
}

bool same_read(const nchunk::PlannedRead& r, const nchunk::PlannedRead& want) {
  return r.offset == want.offset && r.n == want.n && r.need == want.need && r.bounced == want.bounced &&
         r.bounce_at == want.bounce_at && r.copy_from == want.copy_from && r.copy_length == want.copy_length &&
         r.dest_at == want.dest_at;
}

// The three kinds of plan, read by read, and for random tasks the properties both backends rely on.
void test_task_plan() {
  using nchunk::PlannedRead;
  using nchunk::TaskPlan;
  const nchunk::DioAlignment a{512, 512, true};
  const uintptr_t base = 0x100000;  // an address aligned to any alignment used here

  TaskPlan p = nchunk::plan_task(100, 1000, base, nchunk::DioAlignment{});
  check(p.kind == TaskPlan::Kind::whole && p.count == 1 && p.bounce_bytes == 0 &&
            same_read(p.reads[0], PlannedRead{100, 1000, 1000, false, 0, 0, 0, 0}),
        "plan: a buffered file is one whole read");
  p = nchunk::plan_task(4096, 8192, base, a);
  check(p.kind == TaskPlan::Kind::whole && p.count == 1 && p.bounce_bytes == 0 &&
            same_read(p.reads[0], PlannedRead{4096, 8192, 8192, false, 0, 0, 0, 0}),
        "plan: an aligned task into an aligned destination is one direct read");
  p = nchunk::plan_task(100, 1000, base, a);
  check(p.kind == TaskPlan::Kind::bounce && p.count == 1 && p.bounce_bytes == 1536 &&
            same_read(p.reads[0], PlannedRead{0, 1536, 1100, true, 0, 100, 1000, 0}),
        "plan: a small unaligned task reads its aligned span into the bounce buffer");
  p = nchunk::plan_task(4096, 200000, base + 1, a);
  check(p.kind == TaskPlan::Kind::bounce && p.count == 1 && p.bounce_bytes == 200192 &&
            same_read(p.reads[0], PlannedRead{4096, 200192, 200000, true, 0, 0, 200000, 0}),
        "plan: a misaligned destination bounces the whole span, however long");
  p = nchunk::plan_task(100, 200000, base + 100, a);  // the middle's destination, base + 512, is aligned
  check(p.kind == TaskPlan::Kind::split && p.count == 3 && p.bounce_bytes == 1024 &&
            same_read(p.reads[0], PlannedRead{0, 512, 512, true, 0, 100, 412, 0}) &&
            same_read(p.reads[1], PlannedRead{512, 199168, 199168, false, 0, 0, 0, 412}) &&
            same_read(p.reads[2], PlannedRead{199680, 512, 420, true, 512, 0, 420, 199580}),
        "plan: a large unaligned task bounces its head and tail blocks and reads the middle direct");
  p = nchunk::plan_task(0, 100000, base, nchunk::DioAlignment{4096, 512, true});
  check(p.kind == TaskPlan::Kind::split && p.count == 2 && p.bounce_bytes == 4096 + 512 &&
            same_read(p.reads[0], PlannedRead{0, 99840, 99840, false, 0, 0, 0, 0}) &&
            same_read(p.reads[1], PlannedRead{99840, 512, 160, true, 4096, 0, 160, 99840}),
        "plan: an aligned head has no head block; the tail block sits at the memory alignment");

  // Random tasks: the copies and direct reads cover the task exactly once, direct reads are aligned in
  // the file and in memory, bounced reads are aligned and fit the bounce buffer, `need` reaches the
  // task's end, and the plan's kind matches its reads.
  std::mt19937_64 rng(11);
  const nchunk::DioAlignment aligns[] = {{512, 512, true}, {4096, 512, true}, {512, 4096, true}, {1, 1, false}};
  for (int round = 0; round < 20000; ++round) {
    const nchunk::DioAlignment& al = aligns[round % 4];
    const int64_t offset = static_cast<int64_t>(rng() % 50000);
    const int64_t length = 1 + static_cast<int64_t>(rng() % (round % 3 ? 300000 : 5000));
    const uintptr_t dest = base + static_cast<uintptr_t>(rng() % 3 == 0 ? rng() % 4096 : 0);
    p = nchunk::plan_task(offset, length, dest, al);
    std::vector<int> covered(static_cast<size_t>(length), 0);
    const PlannedRead& last = p.reads[p.count - 1];
    bool ok = p.count >= 1 && p.count <= 3 && last.offset + last.need == offset + length;
    if (p.kind == TaskPlan::Kind::whole) ok = ok && p.count == 1 && !p.reads[0].bounced && p.reads[0].n == length;
    if (p.kind == TaskPlan::Kind::bounce) ok = ok && p.count == 1 && p.reads[0].bounced;
    if (p.kind == TaskPlan::Kind::split) ok = ok && p.count >= 2 && p.reads[0].bounced != p.reads[1].bounced;
    for (int i = 0; i < p.count && ok; ++i) {
      const PlannedRead& r = p.reads[i];
      const int64_t from = r.dest_at, to = r.dest_at + (r.bounced ? r.copy_length : r.n);
      ok = from >= 0 && to <= length && r.offset % al.offset == 0 && r.n % al.offset == 0 && r.need <= r.n;
      if (r.bounced) {
        ok = ok && r.bounce_at % al.memory == 0 && r.bounce_at + r.n <= p.bounce_bytes &&
             r.copy_from + r.copy_length <= r.need && r.offset + r.copy_from == offset + r.dest_at;
      } else {
        ok = ok && r.need == r.n && r.offset == offset + r.dest_at &&
             (dest + static_cast<uintptr_t>(r.dest_at)) % al.memory == 0;
      }
      for (int64_t k = from; ok && k < to; ++k) ++covered[static_cast<size_t>(k)];
    }
    for (int c : covered) ok = ok && c == 1;
    if (!ok) {
      check(false, "plan: random task " + std::to_string(offset) + "+" + std::to_string(length) + " at dest +" +
                       std::to_string(dest - base) + ", alignment " + std::to_string(al.memory) + "/" +
                       std::to_string(al.offset));
      break;
    }
  }
}

void test_reads(const std::string& path, const std::vector<char>& file) {
  const int64_t size = static_cast<int64_t>(file.size());
  nchunk::Reader reader(3, 16 * 1024, 64, g_backend);  // small tasks, so big extents split into many
  auto f = reader.open(path);
  check(f->size() == size && f->direct(), "open: size and direct");
  std::mt19937_64 rng(7);

  // Boundaries: first byte, last byte, whole file, unaligned tail.
  Buffer whole(file.size());
  std::vector<Extent> edges = {{0, 1, 0}, {size - 1, 1, 1}, {size - 700, 700, 2}};
  nchunk::ReadStats s = reader.read(f, edges, whole.data, whole.size);
  check(matches(file, edges, whole.data), "first byte, last byte, unaligned tail");
  // Unaligned in the file but congruent with the destination: head and tail bounce, middle direct.
  nchunk::Reader big_tasks(2, 1 << 20, 64, g_backend);
  Buffer mixed(2 * file.size());
  std::vector<Extent> congruent = {{100, 200000, 100}, {size - 150000, 150000, 204800 + (size - 150000) % 512}};
  big_tasks.read(f, congruent, mixed.data, mixed.size);
  check(matches(file, congruent, mixed.data), "unaligned extents with a direct middle");
  std::vector<Extent> all = {{0, size, 0}};
  s = reader.read(f, all, whole.data, whole.size);
  check(matches(file, all, whole.data), "whole file into an aligned buffer");
  check(s.bytes == file.size() && s.requests == 1 && s.tasks == (file.size() + 16383) / 16384,
        "stats of the whole-file read");
  check(s.bytes_read >= s.bytes && s.wall_s > 0, "bytes_read and wall time");

  // Random extents: unaligned offsets, lengths and destinations, some longer than a task.
  for (int trial = 0; trial < 60; ++trial) {
    std::vector<Extent> extents;
    int64_t dest = static_cast<int64_t>(rng() % 1000);
    const int n = 1 + static_cast<int>(rng() % 12);
    uint64_t tasks = 0;
    for (int i = 0; i < n; ++i) {
      int64_t off = static_cast<int64_t>(rng() % size);
      int64_t len = std::min<int64_t>(static_cast<int64_t>(rng() % 100000), size - off);
      if (trial % 3 == 0) off = off / 4096 * 4096, len = std::min<int64_t>(len / 4096 * 4096, size - off);
      extents.push_back({off, len, dest});
      dest += len + static_cast<int64_t>(rng() % 3);
      tasks += (len + 16383) / 16384;
    }
    Buffer out(dest);
    char* base = out.data + (trial % 2 ? 0 : 1 + rng() % 511);  // aligned and misaligned destinations
    s = reader.read(f, extents, base, out.size);
    check(matches(file, extents, base), "random extents, trial " + std::to_string(trial));
    check(s.requests == extents.size() && s.tasks == tasks, "random extents stats, trial " + std::to_string(trial));
  }

  // Zero-length extents read nothing and are counted.
  s = reader.read(f, {{5, 0, 0}, {size, 0, 0}}, nullptr, 0);
  check(s.bytes == 0 && s.requests == 2 && s.tasks == 0, "zero-length extents");
}

void test_async_and_threads(const std::string& path, const std::vector<char>& file) {
  const int64_t size = static_cast<int64_t>(file.size());
  nchunk::Reader reader(4, 64 * 1024, 64, g_backend);
  auto f = reader.open(path);
  std::vector<Extent> all = {{0, size, 0}};

  // Several requests in flight, waited out of order; waiting twice returns the same stats.
  Buffer a(file.size()), b(file.size()), c(file.size() + 1);
  nchunk::ReadRequest ra = reader.submit(f, all, a.data, a.size);
  nchunk::ReadRequest rb = reader.submit(f, all, b.data, b.size);
  nchunk::ReadRequest rc = reader.submit(f, all, c.data + 1, c.size);
  nchunk::ReadStats sc = rc.wait();
  check(rc.wait().bytes == sc.bytes && rc.done(), "wait twice");
  rb.wait();
  ra.wait();
  check(matches(file, all, a.data) && matches(file, all, b.data) && matches(file, all, c.data + 1),
        "async requests");

  // A request dropped unwaited is finished when its handle is destroyed.
  Buffer d(file.size());
  { nchunk::ReadRequest dropped = reader.submit(f, all, d.data, d.size); }
  check(matches(file, all, d.data), "destroying an unwaited request waits for it");

  // Concurrent callers.
  std::vector<std::thread> callers;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&, t] {
      Buffer out(file.size());
      bool good = true;
      for (int i = 0; i < 5; ++i) {
        std::vector<Extent> parts = {{t * 1000 + i, size / 3, 7}, {size / 2 + t, size / 3, size / 3 + 7}};
        reader.read(f, parts, out.data, out.size);
        good = good && matches(file, parts, out.data);
      }
      ok[t] = good;
    });
  }
  for (std::thread& t : callers) t.join();
  check(ok == std::vector<int>(4, 1), "concurrent callers");

  // close() finishes queued work; later submits fail.
  Buffer e(file.size());
  nchunk::ReadRequest re = reader.submit(f, all, e.data, e.size);
  reader.close();
  check(re.done() && matches(file, all, e.data), "close finishes queued reads");
  expect_throw<std::runtime_error>([&] { reader.submit(f, all, e.data, e.size); }, "submit after close");
}

void test_errors(const std::string& dir, const std::string& path, const std::vector<char>& file) {
  const int64_t size = static_cast<int64_t>(file.size());
  nchunk::Reader reader(2, 16 * 1024, 64, g_backend);
  Buffer out(file.size());

  std::string missing = dir + "/does-not-exist";
  std::string m = expect_throw<nchunk::IoError>([&] { reader.open(missing); }, "open missing file",
                                                [](const nchunk::IoError& e) { return e.error_code() == ENOENT; });
  check(contains(m, missing), "ENOENT message names the path");
  expect_throw<nchunk::IoError>([&] { reader.open(dir); }, "open a directory",
                                [](const nchunk::IoError& e) { return e.error_code() == EISDIR; });

  auto f = reader.open(path);
  auto submit = [&](std::vector<Extent> extents) { reader.read(f, extents, out.data, out.size); };
  m = expect_throw<nchunk::EndOfFileError>([&] { submit({{size - 10, 11, 0}}); }, "read past end",
                                           [&](const nchunk::EndOfFileError& e) {
                                             return e.path() == path && e.offset() == size - 10 && e.length() == 11;
                                           });
  check(contains(m, path) && contains(m, std::to_string(size)) && contains(m, "offset " + std::to_string(size - 10)),
        "past-end message names path, offset and file size: " + m);
  expect_throw<nchunk::EndOfFileError>([&] { submit({{size + 1, 0, 0}}); }, "zero-length extent past end");
  expect_throw<nchunk::ExtentError>([&] { submit({{-1, 10, 0}}); }, "negative offset");
  expect_throw<nchunk::ExtentError>([&] { submit({{0, -10, 0}}); }, "negative length");
  expect_throw<nchunk::ExtentError>([&] { submit({{0, 10, -1}}); }, "negative dest offset");
  m = expect_throw<nchunk::ExtentError>([&] { submit({{0, 100, size - 50}}); }, "dest out of range");
  check(contains(m, "length 100"), "dest message names the length: " + m);
  expect_throw<nchunk::EndOfFileError>([&] { submit({{1, INT64_MAX, 10}}); }, "overflowing file range");
  expect_throw<nchunk::ExtentError>([&] { submit({{0, 10, INT64_MAX}}); }, "overflowing dest range");
  expect_throw<std::invalid_argument>([] { nchunk::Reader bad(0); }, "zero threads");
  expect_throw<std::invalid_argument>([] { nchunk::Reader bad(2, 1000); }, "unaligned max_task_bytes");

  // Errors raised on a worker thread reach the caller: point the descriptor at other objects.
  auto broken = reader.open(path);
  int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  check(dir_fd >= 0 && ::dup2(dir_fd, broken->fd()) >= 0, "dup2 a directory onto the file");
  std::vector<Extent> extents = {{0, 4096, 0}, {40000, 50000, 4096}};
  nchunk::ReadRequest r = reader.submit(broken, extents, out.data, out.size);
  auto is_eisdir = [&](const nchunk::IoError& e) {
    return e.error_code() == EISDIR && e.path() == path && e.length() > 0;
  };
  m = expect_throw<nchunk::IoError>([&] { r.wait(); }, "read error from a worker", is_eisdir);
  check(contains(m, path) && contains(m, "at offset"), "read error names path and offset: " + m);
  expect_throw<nchunk::IoError>([&] { r.wait(); }, "second wait rethrows", is_eisdir);
  ::close(dir_fd);

  int mem_fd = ::open("/proc/self/mem", O_RDONLY);  // address 0 is unmapped: pread gives EIO
  if (mem_fd >= 0 && ::dup2(mem_fd, broken->fd()) >= 0) {
    expect_throw<nchunk::IoError>([&] { reader.read(broken, {{0, 4096, 0}}, out.data, out.size); }, "EIO",
                                  [](const nchunk::IoError& e) { return e.error_code() == EIO; });
  }
  if (mem_fd >= 0) ::close(mem_fd);

  // A file truncated after open: the 0-byte read before the end is an error.
  std::string victim = write_file(dir, "reader_truncated.bin", file);
  auto shrinking = reader.open(victim);
  check(::truncate(victim.c_str(), 1000) == 0, "truncate");
  m = expect_throw<nchunk::EndOfFileError>([&] { reader.read(shrinking, {{0, size, 0}}, out.data, out.size); },
                                           "file truncated while open");
  check(contains(m, victim), "truncation message names the path: " + m);
  ::unlink(victim.c_str());
}

// Known CRC-32C values (RFC 3720 B.4 and the usual check value) on every path this CPU has, and the
// hardware path against the table on many lengths, offsets and row layouts.
void test_crc32c() {
  std::vector<Crc32cPath> paths = {Crc32cPath::automatic, Crc32cPath::table};
  const std::string hardware = nchunk::crc32c_hardware();
  if (!hardware.empty()) paths.push_back(Crc32cPath::hardware);
  std::printf("crc32c hardware path: %s\n", hardware.empty() ? "(none)" : hardware.c_str());
  unsigned char zeros[32] = {0}, ones[32], up[32], down[32];
  for (int i = 0; i < 32; ++i) ones[i] = 0xFF, up[i] = static_cast<unsigned char>(i), down[i] = 31 - i;
  for (Crc32cPath p : paths) {
    const std::string name = "crc32c path " + std::to_string(static_cast<int>(p));
    check(nchunk::crc32c(0, "123456789", 9, p) == 0xE3069283U, name + ": \"123456789\"");
    check(nchunk::crc32c(0, zeros, 32, p) == 0x8A9136AAU, name + ": 32 zeros");
    check(nchunk::crc32c(0, ones, 32, p) == 0x62A8AB43U, name + ": 32 x 0xff");
    check(nchunk::crc32c(0, up, 32, p) == 0x46DD794EU, name + ": 0..31");
    check(nchunk::crc32c(0, down, 32, p) == 0x113FDB5CU, name + ": 31..0");
    check(nchunk::crc32c(0, "", 0, p) == 0, name + ": empty");
    check(nchunk::crc32c(nchunk::crc32c(0, "1234", 4, p), "56789", 5, p) == 0xE3069283U, name + ": chained");
  }
  if (hardware.empty()) {
    expect_throw<std::invalid_argument>([] { nchunk::crc32c(0, "1", 1, Crc32cPath::hardware); },
                                        "hardware path demanded without the instruction");
  }
  std::mt19937 rng(3);
  std::vector<unsigned char> data(70000);
  for (unsigned char& c : data) c = static_cast<unsigned char>(rng());
  for (int trial = 0; trial < 200; ++trial) {
    const size_t offset = rng() % 64, n = rng() % (trial < 100 ? 40 : 60000);
    const uint32_t table = nchunk::crc32c(0, data.data() + offset, n, Crc32cPath::table);
    check(nchunk::crc32c(0, data.data() + offset, n) == table, "automatic = table, " + std::to_string(n) + " bytes");
  }
  for (size_t row_bytes : {1, 7, 8, 9, 64, 1000, 9216}) {
    const size_t rows = std::min<size_t>(13, data.size() / row_bytes);
    std::vector<uint32_t> fast(rows), slow(rows);
    nchunk::crc32c_rows(data.data() + 3, row_bytes, rows, fast.data());
    nchunk::crc32c_rows(data.data() + 3, row_bytes, rows, slow.data(), Crc32cPath::table);
    bool each = true;
    for (size_t r = 0; r < rows; ++r) {
      each = each && slow[r] == nchunk::crc32c(0, data.data() + 3 + r * row_bytes, row_bytes, Crc32cPath::table);
    }
    check(fast == slow && each, "crc32c_rows of " + std::to_string(row_bytes) + "-byte rows");
  }
}

// Row checks: CRCs of every `row_bytes` row of the file; checked reads count their rows, a flipped
// byte fails the first read that touches its row (naming path, row, offset), other rows still read.
void test_row_checks(const std::string& dir, const std::vector<char>& file) {
  const int64_t row_bytes = 1000, rows = static_cast<int64_t>(file.size()) / row_bytes;
  std::vector<uint32_t> table(static_cast<size_t>(rows));
  nchunk::crc32c_rows(file.data(), row_bytes, rows, table.data());
  std::vector<char> damaged = file;
  const int64_t bad_row = 137, bad_at = bad_row * row_bytes + 421;
  damaged[bad_at] ^= 0x10;
  const std::string path = write_file(dir, "reader_rows_" + std::to_string(::getpid()) + ".bin", damaged);
  nchunk::Reader reader(3, 16 * 1024, 64, g_backend);  // tasks of 16 rows
  auto f = reader.open(path);
  Buffer out(file.size());
  auto checks = [&](std::vector<nchunk::RowCheck> per_extent) {
    return nchunk::RowChecksums{table.data(), rows, std::move(per_extent)};
  };

  // Clean rows on both sides of the damage, one extent checked and one not; tasks are whole rows.
  std::vector<Extent> clean = {{0, 100 * row_bytes, 0}, {200 * row_bytes, 50 * row_bytes, 100 * row_bytes},
                               {bad_row * row_bytes, 2 * row_bytes, 150 * row_bytes}};
  nchunk::ReadStats s = reader.read(f, clean, out.data, out.size, checks({{row_bytes, 0}, {row_bytes, 200}, {0, 0}}));
  check(s.rows_checked == 150, "rows checked: " + std::to_string(s.rows_checked));
  check(s.tasks == 7 + 4 + 1, "checked extents cut into tasks of whole rows: " + std::to_string(s.tasks));
  check(std::memcmp(out.data, file.data(), 100 * row_bytes) == 0, "checked rows read");

  // The damaged row, inside a longer extent: the error names the file, row, offset and length.
  std::vector<Extent> spanning = {{100 * row_bytes, 100 * row_bytes, 0}};
  auto names_row = [&](const nchunk::ChecksumError& e) {
    return e.path() == path && e.row() == bad_row && e.offset() == bad_row * row_bytes &&
           e.length() == row_bytes && e.expected() == table[bad_row] && e.actual() != e.expected() &&
           e.error_code() == EBADMSG;
  };
  std::string m = expect_throw<nchunk::ChecksumError>(
      [&] { reader.read(f, spanning, out.data, out.size, checks({{row_bytes, 100}})); }, "flipped byte",
      names_row);
  check(contains(m, path) && contains(m, "row 137") && contains(m, "offset 137000"), "mismatch message: " + m);
  nchunk::ReadRequest r = reader.submit(f, spanning, out.data, out.size, checks({{row_bytes, 100}}));
  expect_throw<nchunk::IoError>([&] { r.wait(); }, "a checksum error is an IoError");
  // Unchecked, the same bytes read without complaint; so do checked rows that miss the damage.
  reader.read(f, spanning, out.data, out.size);
  s = reader.read(f, {{138 * row_bytes, 5 * row_bytes, 0}}, out.data, out.size, checks({{row_bytes, 138}}));
  check(s.rows_checked == 5, "rows after the damaged one still read");
  // A row longer than a task is one task of its own; a table off by one row is a mismatch.
  nchunk::Reader small_tasks(2, 4096, 64, g_backend);
  std::vector<uint32_t> big(3);
  nchunk::crc32c_rows(file.data(), 3 * 10000, 1, big.data());
  s = small_tasks.read(f, {{0, 30000, 0}}, out.data, out.size, {big.data(), 1, {{30000, 0}}});
  check(s.tasks == 1 && s.rows_checked == 1, "a 30000-byte row in one task");
  expect_throw<nchunk::ChecksumError>(
      [&] { reader.read(f, {{row_bytes, row_bytes, 0}}, out.data, out.size, checks({{row_bytes, 0}})); },
      "a row compared with another row's CRC");

  // Malformed checks are refused before anything is read.
  expect_throw<nchunk::ExtentError>([&] { reader.read(f, clean, out.data, out.size, checks({{row_bytes, 0}})); },
                                    "one check for three extents");
  expect_throw<nchunk::ExtentError>(
      [&] { reader.read(f, {{0, 1500, 0}}, out.data, out.size, checks({{row_bytes, 0}})); }, "part of a row");
  m = expect_throw<nchunk::ExtentError>(
      [&] { reader.read(f, {{0, 2 * row_bytes, 0}}, out.data, out.size, checks({{row_bytes, rows - 1}})); },
      "rows beyond the table");
  check(contains(m, "checksum table"), "table overflow message: " + m);
  expect_throw<nchunk::ExtentError>(
      [&] { reader.read(f, {{0, row_bytes, 0}}, out.data, out.size, checks({{-1, 0}})); }, "negative row size");
  ::unlink(path.c_str());
}

// /dev/shm is tmpfs: it refuses O_DIRECT before Linux 6.6 (buffered fallback) and accepts it since,
// without reporting an alignment through statx (so the alignment is probed). Either way reads work.
void test_tmpfs(const std::vector<char>& file) {
  struct stat st;
  if (::stat("/dev/shm", &st) != 0 || !S_ISDIR(st.st_mode)) return;
  const std::string path = write_file("/dev/shm", "nchunk_reader_test_" + std::to_string(::getpid()), file);
  const int64_t size = static_cast<int64_t>(file.size());
  nchunk::Reader reader(2, 16 * 1024, 64, g_backend);
  auto f = reader.open(path);
  nchunk::DioAlignment a = nchunk::dio_alignment(path);
  check(a.direct == f->direct() && a.offset == f->alignment().offset, "tmpfs: dio_alignment matches open");
  check(!a.direct || (a.offset >= 512 && a.memory >= 512), "tmpfs: probed alignment");
  Buffer out(file.size() + 1);
  std::vector<Extent> extents = {{0, size, 1}, {3, 5000, 0}};
  nchunk::ReadStats s = reader.read(f, {extents[0]}, out.data, out.size);
  check(matches(file, {extents[0]}, out.data), "tmpfs: whole file");
  check(f->direct() || s.bytes_read == s.bytes, "tmpfs: buffered reads have no padding");
  reader.read(f, {extents[1]}, out.data, out.size);
  check(matches(file, {extents[1]}, out.data), "tmpfs: unaligned extent");
  ::unlink(path.c_str());
}

// Random extents (any offset, length and destination) read by both backends give the same bytes.
void test_backends_agree(const std::string& path, const std::vector<char>& file) {
  nchunk::Reader pool(3, 16 * 1024, 64, nchunk::ReaderBackend::threads);
  nchunk::Reader ring(3, 16 * 1024, 64, nchunk::ReaderBackend::io_uring);
  check(ring.backend() == nchunk::ReaderBackend::io_uring, "io_uring backend in use: " + ring.backend_note());
  auto f = pool.open(path);
  check(f->direct(), "the scratch file is read with O_DIRECT");
  std::mt19937_64 rng(7);
  const int64_t size = static_cast<int64_t>(file.size());
  for (int round = 0; round < 20; ++round) {
    std::vector<Extent> extents;
    int64_t dest = 0;
    for (int i = 0; i < 40; ++i) {
      const int64_t length = static_cast<int64_t>(rng() % (round % 2 ? 200000 : 9000));
      const int64_t offset = static_cast<int64_t>(rng() % static_cast<uint64_t>(size - length + 1));
      dest += static_cast<int64_t>(rng() % 3 == 0 ? rng() % 700 : 0);
      extents.push_back({offset, length, dest});
      dest += length;
    }
    Buffer a(static_cast<size_t>(dest)), b(static_cast<size_t>(dest));
    nchunk::ReadStats sa = pool.read(f, extents, a.data, a.size);
    nchunk::ReadStats sb = ring.read(f, extents, b.data, b.size);
    check(matches(file, extents, b.data), "io_uring: random extents, round " + std::to_string(round));
    check(std::memcmp(a.data, b.data, a.size) == 0, "io_uring and threads agree, round " + std::to_string(round));
    check(sa.tasks == sb.tasks && sa.bytes == sb.bytes && sa.bytes_read == sb.bytes_read,
          "same statistics from both backends");
  }
}

void test_forced_fallback() {
  ::setenv("NCHUNK_IO_URING", "off", 1);
  nchunk::Reader reader(2, 4096, 64, nchunk::ReaderBackend::io_uring);
  ::unsetenv("NCHUNK_IO_URING");
  check(reader.backend() == nchunk::ReaderBackend::threads, "NCHUNK_IO_URING=off: thread pool");
  check(contains(reader.backend_note(), "NCHUNK_IO_URING=off"), "the fallback says why: " + reader.backend_note());
  nchunk::Reader threads(2, 4096, 64, nchunk::ReaderBackend::threads);
  check(threads.backend_note().empty(), "no note when the backend asked for is used");
}

// "" when this process can set up an io_uring, otherwise why not.
std::string uring_unavailable() {
  try {
    nchunk::Uring ring(8);
    return "";
  } catch (const nchunk::UringUnavailable& e) {
    return e.what();
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp";
  std::vector<char> file(3 * 100000 + 1234);  // not a multiple of 512
  std::mt19937 rng(1);
  for (char& c : file) c = static_cast<char>(rng());
  const std::string path = write_file(dir, "reader_test_" + std::to_string(::getpid()) + ".bin", file);

  test_alignment(dir, path);
  test_task_plan();
  test_crc32c();
  const std::string unavailable = uring_unavailable();
  std::vector<nchunk::ReaderBackend> backends = {nchunk::ReaderBackend::threads};
  if (unavailable.empty()) backends.push_back(nchunk::ReaderBackend::io_uring);
  for (nchunk::ReaderBackend backend : backends) {
    g_backend = backend;
    test_reads(path, file);
    test_async_and_threads(path, file);
    test_errors(dir, path, file);
    test_row_checks(dir, file);
    test_tmpfs(file);
  }
  if (unavailable.empty()) test_backends_agree(path, file);
  test_forced_fallback();
  std::printf("io_uring: %s\n", unavailable.empty() ? "tested" : ("unavailable, " + unavailable).c_str());

  ::unlink(path.c_str());
  if (g_failures) {
    std::fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all reader checks passed\n");
  return 0;
}
