// The one pybind11 binding file of nchunk_core: converts and validates Python arguments while holding
// the GIL, then releases it around pure C++ work. All logic lives in the C++ core headers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

// ---- reader section (begin) ----
// Binds reader.hpp. The Python wrapper (nchunk_core/reader.py) passes the destination as an address
// and a byte count plus the object owning that memory, which the request keeps alive until done.
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "reader.hpp"

namespace {

// A submitted read as Python sees it; owns a reference to the destination's owner until the read is
// over. Destroying it unwaited waits (with the GIL released) before letting go of that reference.
class PyReadRequest {
 public:
  PyReadRequest(nchunk::ReadRequest request, py::object owner)
      : request_(std::move(request)), owner_(std::move(owner)) {}
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
};

py::tuple stats_tuple(const nchunk::ReadStats& s) {
  return py::make_tuple(s.bytes, s.bytes_read, s.requests, s.tasks, s.wall_s);
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

void translate_reader_errors(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const nchunk::IoError& e) {
    // OSError(errno, ...) builds the matching subclass: FileNotFoundError, PermissionError, ...
    std::string message = std::string(std::strerror(e.error_code())) + " (" + e.detail() + ")";
    py::object error = py::handle(PyExc_OSError)(e.error_code(), message, e.path());
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
  } catch (const nchunk::EndOfFileError& e) {
    PyErr_SetString(PyExc_EOFError, e.what());
  }
}

}  // namespace

static void bind_reader(py::module_& m) {
  py::register_exception_translator(&translate_reader_errors);

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

  py::class_<nchunk::Reader>(m, "Reader", "A pool of threads reading file extents into buffers.")
      .def(py::init<int, int64_t, int>(), py::arg("threads") = 6,
           py::arg("max_task_bytes") = int64_t{1} << 20, py::arg("max_queued_requests") = 64)
      .def_property_readonly("threads", &nchunk::Reader::threads)
      .def_property_readonly("max_task_bytes", &nchunk::Reader::max_task_bytes)
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
             size_t dest_bytes, py::object owner) {
            std::vector<nchunk::Extent> rows = to_extents(extents);
            void* dest = reinterpret_cast<void*>(dest_address);
            nchunk::ReadRequest request = [&] {
              py::gil_scoped_release release;
              return r.submit(std::move(file), std::move(rows), dest, dest_bytes);
            }();
            return PyReadRequest(std::move(request), std::move(owner));
          },
          py::arg("file"), py::arg("extents"), py::arg("dest_address"), py::arg("dest_bytes"),
          py::arg("owner"),
          "Queue a read of extents into dest_bytes bytes at dest_address; owner is kept alive.")
      .def(
          "read",
          [](nchunk::Reader& r, std::shared_ptr<nchunk::File> file,
             const py::array_t<int64_t, py::array::c_style>& extents, uintptr_t dest_address,
             size_t dest_bytes) {
            std::vector<nchunk::Extent> rows = to_extents(extents);
            void* dest = reinterpret_cast<void*>(dest_address);
            nchunk::ReadStats stats;
            {
              py::gil_scoped_release release;
              stats = r.read(std::move(file), std::move(rows), dest, dest_bytes);
            }
            return stats_tuple(stats);
          },
          py::arg("file"), py::arg("extents"), py::arg("dest_address"), py::arg("dest_bytes"),
          "Read extents into dest_bytes bytes at dest_address and wait; returns the statistics.")
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
  m.doc() = "nchunk native core: threaded direct-I/O reader and chunk selection.";
  bind_reader(m);
  bind_select(m);
}
