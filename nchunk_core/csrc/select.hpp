// Row selection for one weight matrix and one input: which stored rows to read so that the reads
// carry the most importance per unit of estimated drive time (Neuron Chunking, arXiv 2511.18692).
//
// Every method returns the selected rows as sorted, maximal, non-overlapping runs. The Python layer
// (nchunk_core/select.py) converts sizes in KiB to rows, validates arguments and holds plain NumPy
// reference implementations that the tests compare with these kernels. No Python in here.
#pragma once

#include <cstdint>
#include <vector>

namespace nchunk {

// Latency table T of a drive on a byte grid: latency_s[k] = seconds per chunk of
// (k + 1) * step_bytes. A view: the caller keeps the array alive. Same rule as
// LatencyTable.estimate in latency.py.
class LatencyModel {
 public:
  LatencyModel(const double* latency_s, int64_t n, int64_t step_bytes);
  // Seconds per contiguous chunk of `bytes`: 0 for bytes <= 0, the first entry below one step,
  // linear between grid points, and the last entry scaled by size beyond the table (peak rate).
  double estimate(double bytes) const;
  // Bytes covered by the grid; beyond this size chunks cost in proportion to their size.
  int64_t table_bytes() const { return n_ * static_cast<int64_t>(step_bytes_); }

 private:
  const double* latency_s_;
  int64_t n_;
  double step_bytes_;
};

struct Run {
  int64_t start;
  int64_t length;
};

// Candidate window sizes of the chunking method, already converted to rows of this matrix.
struct WindowRows {
  int64_t r_min;     // smallest window (>= 1)
  int64_t r_max;     // largest window (>= r_min); sizes are r_min, r_min + r_step, ... <= r_max
  int64_t r_step;    // >= 1
  int64_t jump_cap;  // stride of a window of r rows is min(r, jump_cap), >= 1
};

// Throws std::invalid_argument unless every value is finite and >= 0.
void check_importance(const float* importance, int64_t rows);

// All rows as one run (empty for rows == 0).
std::vector<Run> select_dense(int64_t rows);

// The `budget` rows of highest importance (ties: lower row index first), as maximal runs.
std::vector<Run> select_magnitude(const float* importance, int64_t rows, int64_t budget);

// Greedy chunking: candidate windows of every size at stride min(r, jump_cap) (plus one window
// ending at the last row), utility = window importance / T[window bytes], accepted in descending
// utility (ties: lower start, then smaller window) when they overlap no accepted window and fit in
// the remaining budget. Rows left over once no window fits are filled with the best unselected
// single rows, so exactly `budget` rows are selected.
std::vector<Run> select_chunking(const float* importance, int64_t rows, int64_t budget,
                                 const WindowRows& windows, const LatencyModel& table,
                                 int64_t row_bytes);

// Search limits of select_dp: most solves of the program, and the relative width of the price
// bracket at which the search stops (counts jump; a finer price rarely changes the selection).
constexpr int kDpMaxSolves = 8;
constexpr double kDpPriceTolerance = 1e-3;

// Runs maximising  sum of selected importance - lambda * sum over maximal runs of T[run bytes]
// (lambda in importance per second), by dynamic programming over row positions. Exact for the
// program whenever T is subadditive (T[a + b] <= T[a] + T[b]).
std::vector<Run> lagrangian_runs(const float* importance, int64_t rows, double lambda,
                                 const LatencyModel& table, int64_t row_bytes);

// Exactly `budget` rows on the best importance-versus-estimated-time trade-off: lambda is searched
// (secant steps on the row count) until lagrangian_runs selects `budget` rows. Where the count
// jumps past the budget, the solution nearest to it is trimmed at its least important run ends or
// grown at its most important run neighbours. An exact hit is optimal: no selection of at most the
// same estimated time retains more importance. `solves`, if given, receives the number of solves.
std::vector<Run> select_dp(const float* importance, int64_t rows, int64_t budget,
                           const LatencyModel& table, int64_t row_bytes, int* solves = nullptr);

// Sum of T over the runs, each run being length * row_bytes bytes.
double estimate_runs(const std::vector<Run>& runs, int64_t row_bytes, const LatencyModel& table);

// Selected importance / total importance (1 when the total is 0).
double retained_importance(const std::vector<Run>& runs, const float* importance, int64_t rows);

}  // namespace nchunk
