// The one pybind11 binding file of nchunk_core: converts and validates Python arguments while holding
// the GIL, then releases it around pure C++ work. All logic lives in the C++ core headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

// ---- reader section (begin) ----
// Binds reader.hpp and crc32c.hpp. The Python wrapper (nchunk_core/io/reader.py) passes the
// destination as an address and a byte count plus the object owning that memory, and the row checksum
// table as an array; the request keeps both alive until done. Errors become the exception classes of
// nchunk_core/io/errors.py, built there from the fields of the C++ error.
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "crc32c.hpp"
#include "reader.hpp"
#include "uring.hpp"

namespace {

// A submitted read as Python sees it; owns a reference to the destination's owner until the read is
// over. Destroying it unwaited waits (with the GIL released) before letting go of that reference.
class PyReadRequest {
 public:
  PyReadRequest(nchunk::ReadRequest request, py::object owner, py::object table)
      : request_(std::move(request)), owner_(std::move(owner)), table_(std::move(table)) {}
  PyReadRequest(PyReadRequest&&) = default;
  ~PyReadRequest() {
    if (!request_.done()) {
      py::gil_scoped_release release;
      nchunk::ReadRequest finishing = std::move(request_);  // its destructor waits
    }
  }
  nchunk::ReadStats wait() {
    py::gil_scoped_release release;
    return request_.wait();
  }
  bool done() const { return request_.done(); }

 private:
  nchunk::ReadRequest request_;
  py::object owner_;
  py::object table_;  // the row checksum table the workers compare with
};

py::tuple stats_tuple(const nchunk::ReadStats& s) {
  return py::make_tuple(s.bytes, s.bytes_read, s.requests, s.tasks, s.wall_s, s.rows_checked);
}

py::tuple alignment_tuple(const nchunk::DioAlignment& a) {
  return py::make_tuple(a.memory, a.offset, a.direct);
}

// Copies an int64 [n, 3] array of (file_offset, length, dest_offset) rows; runs with the GIL held.
std::vector<nchunk::Extent> to_extents(const py::array_t<int64_t, py::array::c_style>& rows) {
  if (rows.ndim() != 2 || rows.shape(1) != 3) {
    throw py::value_error("extents must have shape [n, 3] (file_offset, length, dest_offset)");
  }
  std::vector<nchunk::Extent> extents(static_cast<size_t>(rows.shape(0)));
  if (!extents.empty()) std::memcpy(extents.data(), rows.data(), extents.size() * sizeof(nchunk::Extent));
  return extents;
}
static_assert(sizeof(nchunk::Extent) == 3 * sizeof(int64_t), "Extent is three packed int64");

using Table = py::array_t<uint32_t, py::array::c_style | py::array::forcecast>;
using Checks = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Row checks of a request and the table array they point into, which the request must keep alive.
struct RowChecksArgs {
  nchunk::RowChecksums checks;
  py::object table = py::none();
};

// From a uint32 [rows] table and an int64 [n, 2] array of (row_bytes, first_row) per extent; nothing
// is checked when `row_checks` is None. Runs with the GIL held.
RowChecksArgs to_row_checks(const py::object& row_table, const py::object& row_checks) {
  RowChecksArgs out;
  if (row_checks.is_none()) return out;
  Table table = Table::ensure(row_table);
  Checks rows = Checks::ensure(row_checks);
  if (!table || !rows) throw py::error_already_set();
  if (table.ndim() != 1) throw py::value_error("the row checksum table must be 1-D");
  if (rows.ndim() != 2 || rows.shape(1) != 2) {
    throw py::value_error("row checks must have shape [n, 2] (row_bytes, first_row)");
  }
  out.checks.table = table.data();
  out.checks.table_rows = table.shape(0);
  out.checks.extents.resize(static_cast<size_t>(rows.shape(0)));
  if (!out.checks.extents.empty()) {
    std::memcpy(out.checks.extents.data(), rows.data(), out.checks.extents.size() * sizeof(nchunk::RowCheck));
  }
  out.table = std::move(table);
  return out;
}
static_assert(sizeof(nchunk::RowCheck) == 2 * sizeof(int64_t), "RowCheck is two packed int64");

// Raises the Python exception that nchunk_core.io.errors builds from the fields of a C++ I/O error.
void set_io_error(const nchunk::IoError& e, const char* kind, py::object row = py::none(),
                  py::object expected = py::none(), py::object actual = py::none()) {
  py::object build = py::module_::import("nchunk_core.io.errors").attr("from_native");
  py::object error = build(kind, e.error_code(), std::string(e.what()), e.detail(), e.path(), e.offset(),
                           e.length(), row, expected, actual);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
}

void translate_reader_errors(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const nchunk::ChecksumError& e) {
    set_io_error(e, "checksum", py::int_(e.row()), py::int_(e.expected()), py::int_(e.actual()));
  } catch (const nchunk::EndOfFileError& e) {
    set_io_error(e, "end_of_file");
  } catch (const nchunk::IoError& e) {
    set_io_error(e, "errno");
  }
}

nchunk::Crc32cPath crc32c_path(const std::string& name) {
  if (name == "auto") return nchunk::Crc32cPath::automatic;
  if (name == "table") return nchunk::Crc32cPath::table;
  if (name == "hardware") return nchunk::Crc32cPath::hardware;
  throw py::value_error("path must be 'auto', 'table' or 'hardware', got '" + name + "'");
}

using Bytes = py::array_t<uint8_t, py::array::c_style>;

nchunk::ReaderBackend reader_backend(const std::string& name) {
  if (name == "threads") return nchunk::ReaderBackend::threads;
  if (name == "io_uring") return nchunk::ReaderBackend::io_uring;
  throw py::value_error("backend must be 'threads' or 'io_uring', got '" + name + "'");
}

const char* backend_name(nchunk::ReaderBackend b) {
  return b == nchunk::ReaderBackend::io_uring ? "io_uring" : "threads";
}

}  // namespace

static void bind_reader(py::module_& m) {
  py::register_exception_translator(&translate_reader_errors);

  m.def("crc32c_hardware", &nchunk::crc32c_hardware,
        "The CRC-32C instruction used on this CPU: 'sse4.2', 'armv8-crc', or '' (table only).");
  m.def(
      "crc32c",
      [](const Bytes& data, uint32_t crc, const std::string& path) {
        const nchunk::Crc32cPath p = crc32c_path(path);
        py::gil_scoped_release release;
        return nchunk::crc32c(crc, data.data(), static_cast<size_t>(data.size()), p);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("path") = "auto",
      "CRC-32C of a uint8 array, continuing from crc; path 'auto', 'table' or 'hardware'.");
  m.def(
      "crc32c_rows",
      [](const Bytes& data, int64_t row_bytes, const std::string& path) {
        const nchunk::Crc32cPath p = crc32c_path(path);
        if (row_bytes <= 0 || data.size() % row_bytes != 0) {
          throw py::value_error(std::to_string(data.size()) + " bytes are not whole rows of " +
                                std::to_string(row_bytes) + " bytes");
        }
        const int64_t rows = data.size() / row_bytes;
        py::array_t<uint32_t> out(rows);
        uint32_t* dst = out.mutable_data();
        {
          py::gil_scoped_release release;
          nchunk::crc32c_rows(data.data(), static_cast<size_t>(row_bytes), static_cast<size_t>(rows), dst, p);
        }
        return out;
      },
      py::arg("data"), py::arg("row_bytes"), py::arg("path") = "auto",
      "CRC-32C of each row of row_bytes bytes of a uint8 array: uint32 [rows].");

  m.def(
      "dio_alignment",
      [](const std::string& path) {
        nchunk::DioAlignment a;
        {
          py::gil_scoped_release release;
          a = nchunk::dio_alignment(path);
        }
        return alignment_tuple(a);
      },
      py::arg("path"),
      "Direct-I/O alignment of a file (or of new files in a directory): (memory, offset, direct).");

  py::class_<nchunk::File, std::shared_ptr<nchunk::File>>(m, "File", "A file opened by a Reader.")
      .def_property_readonly("path", &nchunk::File::path)
      .def_property_readonly("size", &nchunk::File::size, "Size in bytes when opened.")
      .def_property_readonly("direct", &nchunk::File::direct, "True when reads use O_DIRECT.")
      .def_property_readonly(
          "alignment", [](const nchunk::File& f) { return alignment_tuple(f.alignment()); },
          "(memory, offset, direct) alignment used for reads.")
      .def("fileno", &nchunk::File::fd, "The file descriptor.");

  py::class_<PyReadRequest>(m, "ReadRequest", "A submitted read; wait() returns its statistics.")
      .def(
          "wait", [](PyReadRequest& r) { return stats_tuple(r.wait()); },
          "Block until done; return (bytes, bytes_read, requests, tasks, wall_s) or raise the error.")
      .def("done", &PyReadRequest::done, "True once every task has finished.");

  m.def(
      "io_uring_unavailable",
      [] {
        py::gil_scoped_release release;
        try {
          nchunk::Uring ring(8);
          return std::string();
        } catch (const nchunk::UringUnavailable& e) {
          return std::string(e.what());
        }
      },
      "'' when this process can set up an io_uring, otherwise why not.");

  py::class_<nchunk::Reader>(m, "Reader", "Reads file extents into buffers: a thread pool or an io_uring.")
      .def(py::init([](int threads, int64_t max_task_bytes, int max_queued_requests, const std::string& backend) {
             const nchunk::ReaderBackend b = reader_backend(backend);
             py::gil_scoped_release release;
             return new nchunk::Reader(threads, max_task_bytes, max_queued_requests, b);
           }),
           py::arg("threads") = 6, py::arg("max_task_bytes") = int64_t{1} << 20,
           py::arg("max_queued_requests") = 64, py::arg("backend") = "threads",
           "threads: reads in flight; backend 'threads' or 'io_uring' (the thread pool where no ring\n"
           "can be set up: see backend and backend_note).")
      .def_property_readonly("threads", &nchunk::Reader::threads)
      .def_property_readonly("max_task_bytes", &nchunk::Reader::max_task_bytes)
      .def_property_readonly(
          "backend", [](const nchunk::Reader& r) { return backend_name(r.backend()); },
          "The backend in use: 'threads' or 'io_uring'.")
      .def_property_readonly("backend_note", &nchunk::Reader::backend_note,
                             "Why the backend in use is not the one asked for ('' when it is).")
      .def(
          "open",
          [](nchunk::Reader& r, const std::string& path) {
            py::gil_scoped_release release;
            return r.open(path);
          },
          py::arg("path"), "Open a file for reading (O_DIRECT when the file system allows it).")
      .def(
          "submit",
          [](nchunk::Reader& r, std::shared_ptr<nchunk::File> file,
             const py::array_t<int64_t, py::array::c_style>& extents, uintptr_t dest_address,
             size_t dest_bytes, py::object owner, py::object row_table, py::object row_checks) {
            std::vector<nchunk::Extent> rows = to_extents(extents);
            RowChecksArgs checks = to_row_checks(row_table, row_checks);
            void* dest = reinterpret_cast<void*>(dest_address);
            nchunk::ReadRequest request = [&] {
              py::gil_scoped_release release;
              return r.submit(std::move(file), std::move(rows), dest, dest_bytes, std::move(checks.checks));
            }();
            return PyReadRequest(std::move(request), std::move(owner), std::move(checks.table));
          },
          py::arg("file"), py::arg("extents"), py::arg("dest_address"), py::arg("dest_bytes"),
          py::arg("owner"), py::arg("row_table") = py::none(), py::arg("row_checks") = py::none(),
          "Queue a read of extents into dest_bytes bytes at dest_address; owner is kept alive.\n"
          "row_checks int64 [n, 2] (row_bytes, first_row) per extent index the uint32 row_table of\n"
          "expected CRC-32C values; a mismatching row raises ChecksumError from wait().")
      .def(
          "read",
          [](nchunk::Reader& r, std::shared_ptr<nchunk::File> file,
             const py::array_t<int64_t, py::array::c_style>& extents, uintptr_t dest_address,
             size_t dest_bytes, py::object row_table, py::object row_checks) {
            std::vector<nchunk::Extent> rows = to_extents(extents);
            RowChecksArgs checks = to_row_checks(row_table, row_checks);
            void* dest = reinterpret_cast<void*>(dest_address);
            nchunk::ReadStats stats;
            {
              py::gil_scoped_release release;
              stats = r.read(std::move(file), std::move(rows), dest, dest_bytes, std::move(checks.checks));
            }
            return stats_tuple(stats);
          },
          py::arg("file"), py::arg("extents"), py::arg("dest_address"), py::arg("dest_bytes"),
          py::arg("row_table") = py::none(), py::arg("row_checks") = py::none(),
          "Read extents into dest_bytes bytes at dest_address and wait; returns the statistics\n"
          "(bytes, bytes_read, requests, tasks, wall_s, rows_checked). Row checks as for submit().")
      .def(
          "close",
          [](nchunk::Reader& r) {
            py::gil_scoped_release release;
            r.close();
          },
          "Finish queued reads and stop the threads.");
}
// ---- reader section (end) ----

// ---- select section (begin) ----
#include "select.hpp"

namespace select_binding {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using F64 = py::array_t<double, py::array::c_style | py::array::forcecast>;

nchunk::LatencyModel latency_model(const F64& latency_s, int64_t step_bytes) {
  if (latency_s.ndim() != 1) throw py::value_error("latency_s must be 1-D");
  return nchunk::LatencyModel(latency_s.data(), latency_s.shape(0), step_bytes);
}

const float* importance_data(const F32& importance) {
  if (importance.ndim() != 1) throw py::value_error("importance must be 1-D");
  return importance.data();
}

py::array_t<int64_t> runs_array(const std::vector<nchunk::Run>& runs) {
  py::array_t<int64_t> out({static_cast<py::ssize_t>(runs.size()), py::ssize_t{2}});
  int64_t* dst = out.mutable_data();
  for (size_t i = 0; i < runs.size(); ++i) {
    dst[2 * i] = runs[i].start;
    dst[2 * i + 1] = runs[i].length;
  }
  return out;
}

// importance [rows] -> (runs int64 [k, 2], estimated seconds, retained importance fraction)
py::tuple select_rows(const F32& importance, int64_t budget_rows, const std::string& method,
                      const F64& latency_s, int64_t step_bytes, int64_t row_bytes, int64_t r_min,
                      int64_t r_max, int64_t r_step, int64_t jump_cap) {
  const float* v = importance_data(importance);
  const int64_t rows = importance.shape(0);
  const nchunk::LatencyModel table = latency_model(latency_s, step_bytes);
  if (row_bytes <= 0) throw py::value_error("row_bytes must be positive");
  if (method != "dense" && method != "magnitude" && method != "chunking" && method != "dp")
    throw py::value_error("unknown selection method: " + method);
  std::vector<nchunk::Run> runs;
  double latency = 0.0, retained = 0.0;
  {
    py::gil_scoped_release release;
    nchunk::check_importance(v, rows);
    if (budget_rows < 0 || budget_rows > rows)
      throw std::invalid_argument("budget_rows must be in [0, rows]");
    if (method == "dense" || budget_rows == rows)
      runs = nchunk::select_dense(rows);
    else if (method == "magnitude")
      runs = nchunk::select_magnitude(v, rows, budget_rows);
    else if (method == "chunking")
      runs = nchunk::select_chunking(v, rows, budget_rows, {r_min, r_max, r_step, jump_cap}, table,
                                     row_bytes);
    else
      runs = nchunk::select_dp(v, rows, budget_rows, table, row_bytes);
    latency = nchunk::estimate_runs(runs, row_bytes, table);
    retained = nchunk::retained_importance(runs, v, rows);
  }
  return py::make_tuple(runs_array(runs), latency, retained);
}

}  // namespace select_binding

static void bind_select(py::module_& m) {
  using namespace select_binding;
  m.def("select_rows", &select_rows, py::arg("importance"), py::arg("budget_rows"),
        py::arg("method"), py::arg("latency_s"), py::arg("step_bytes"), py::arg("row_bytes"),
        py::arg("r_min") = 1, py::arg("r_max") = 1, py::arg("r_step") = 1, py::arg("jump_cap") = 1,
        "Select budget_rows rows of one matrix ('dense' selects every row whatever the budget).\n"
        "Window sizes are in rows. Returns (runs int64 [k, 2] of (start, length), estimated\n"
        "seconds, retained importance fraction). Releases the GIL.");
  m.def(
      "estimate",
      [](const F64& latency_s, int64_t step_bytes, const F64& run_bytes) {
        const nchunk::LatencyModel table = latency_model(latency_s, step_bytes);
        py::array_t<double> out(run_bytes.size());
        const double* src = run_bytes.data();
        double* dst = out.mutable_data();
        for (py::ssize_t i = 0; i < run_bytes.size(); ++i) dst[i] = table.estimate(src[i]);
        return out;
      },
      py::arg("latency_s"), py::arg("step_bytes"), py::arg("run_bytes"),
      "Estimated seconds per chunk of each size in run_bytes (flattened), as in LatencyTable.");
  m.def(
      "lagrangian_runs",
      [](const F32& importance, double lam, const F64& latency_s, int64_t step_bytes,
         int64_t row_bytes) {
        const float* v = importance_data(importance);
        const int64_t rows = importance.shape(0);
        const nchunk::LatencyModel table = latency_model(latency_s, step_bytes);
        if (row_bytes <= 0) throw py::value_error("row_bytes must be positive");
        std::vector<nchunk::Run> runs;
        {
          py::gil_scoped_release release;
          nchunk::check_importance(v, rows);
          runs = nchunk::lagrangian_runs(v, rows, lam, table, row_bytes);
        }
        return runs_array(runs);
      },
      py::arg("importance"), py::arg("lam"), py::arg("latency_s"),
      py::arg("step_bytes"), py::arg("row_bytes"),
      "Runs maximising sum of selected importance - lam * sum over runs of T (no row budget).");
}
// ---- select section (end) ----

PYBIND11_MODULE(_native, m) {
  m.doc() = "nchunk native core: direct-I/O reader (thread pool or io_uring) with row checksums, and chunk selection.";
  bind_reader(m);
  bind_select(m);
}
