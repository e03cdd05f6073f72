// Selection kernels declared in select.hpp: dense, magnitude top-R, greedy chunking and the
// Lagrangian dynamic program, plus the latency estimator they share with latency.py.
//
// Ordering keys pack a non-negative float32 score and the candidate index into one uint64:
//   key = bits(score) << 32 | (0xFFFFFFFF - index)
// For non-negative IEEE floats the bit pattern orders like the value, so sorting keys in descending
// order gives descending score with ties broken by the lower index. The NumPy reference builds the
// same keys, which is what makes the two implementations agree run for run.
#include "select.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define NCHUNK_SSE2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define NCHUNK_NEON 1
#endif

namespace nchunk {

// ---- latency estimator -------------------------------------------------------------------------

LatencyModel::LatencyModel(const double* latency_s, int64_t n, int64_t step_bytes)
    : latency_s_(latency_s), n_(n), step_bytes_(static_cast<double>(step_bytes)) {
  if (latency_s == nullptr || n <= 0) throw std::invalid_argument("latency table is empty");
  if (step_bytes <= 0) throw std::invalid_argument("latency table step_bytes must be positive");
}

double LatencyModel::estimate(double bytes) const {
  if (!(bytes > 0.0)) return 0.0;
  const double x = bytes / step_bytes_;  // grid units: entry k sits at x = k + 1
  const double n = static_cast<double>(n_);
  if (x > n) return latency_s_[n_ - 1] * x / n;
  if (x <= 1.0) return latency_s_[0];
  if (x >= n) return latency_s_[n_ - 1];
  const int64_t k = static_cast<int64_t>(x) - 1;  // x in [k + 1, k + 2)
  const double slope = latency_s_[k + 1] - latency_s_[k];
  return slope * (x - static_cast<double>(k + 1)) + latency_s_[k];
}

double estimate_runs(const std::vector<Run>& runs, int64_t row_bytes, const LatencyModel& table) {
  double total = 0.0;
  for (const Run& r : runs) total += table.estimate(static_cast<double>(r.length * row_bytes));
  return total;
}

// ---- helpers -----------------------------------------------------------------------------------

namespace {

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline uint64_t order_key(float score, uint32_t index) {
  return (static_cast<uint64_t>(float_bits(score)) << 32) | (0xFFFFFFFFu - index);
}

inline uint32_t key_index(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }

// prefix[i] = sum of importance[0, i) in float64, summed left to right like np.cumsum.
void prefix_sums(const float* importance, int64_t rows, std::vector<double>& prefix) {
  prefix.resize(static_cast<size_t>(rows) + 1);
  double acc = 0.0;
  prefix[0] = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    acc += static_cast<double>(importance[i]);
    prefix[static_cast<size_t>(i) + 1] = acc;
  }
}

// One bit per row: which rows are selected.
class RowMask {
 public:
  explicit RowMask(int64_t rows) : rows_(rows), words_(static_cast<size_t>((rows + 63) / 64), 0) {}

  bool any(int64_t start, int64_t length) const {
    const int64_t end = start + length;  // exclusive, length >= 1
    int64_t w = start >> 6;
    const int64_t last = (end - 1) >> 6;
    uint64_t head = ~0ull << (start & 63);
    const uint64_t tail = ~0ull >> (63 - ((end - 1) & 63));
    if (w == last) return (words_[w] & head & tail) != 0;
    if (words_[w] & head) return true;
    for (++w; w < last; ++w)
      if (words_[w]) return true;
    return (words_[last] & tail) != 0;
  }

  void set(int64_t start, int64_t length) {
    const int64_t end = start + length;
    int64_t w = start >> 6;
    const int64_t last = (end - 1) >> 6;
    const uint64_t head = ~0ull << (start & 63);
    const uint64_t tail = ~0ull >> (63 - ((end - 1) & 63));
    if (w == last) {
      words_[w] |= head & tail;
      return;
    }
    words_[w] |= head;
    for (++w; w < last; ++w) words_[w] = ~0ull;
    words_[last] |= tail;
  }

  bool test(int64_t row) const { return (words_[row >> 6] >> (row & 63)) & 1u; }
  void reset(int64_t row) { words_[row >> 6] &= ~(1ull << (row & 63)); }

  // Maximal runs of set bits, in row order.
  std::vector<Run> runs() const {
    std::vector<Run> out;
    int64_t row = 0;
    while (true) {
      const int64_t start = next(row, false);
      if (start >= rows_) break;
      const int64_t end = next(start, true);
      out.push_back({start, end - start});
      row = end;
    }
    return out;
  }

 private:
  // First row >= from whose bit is set (find_clear = false) or clear (true); rows_ if none.
  int64_t next(int64_t from, bool find_clear) const {
    if (from >= rows_) return rows_;
    int64_t w = from >> 6;
    uint64_t bits = find_clear ? ~words_[w] : words_[w];
    bits &= ~0ull << (from & 63);
    const int64_t n_words = static_cast<int64_t>(words_.size());
    while (bits == 0) {
      if (++w >= n_words) return rows_;
      bits = find_clear ? ~words_[w] : words_[w];
    }
    return std::min<int64_t>(rows_, (w << 6) + __builtin_ctzll(bits));
  }

  int64_t rows_;
  std::vector<uint64_t> words_;
};

// Selects the `count` unselected rows of highest importance (ties: lower index).
void fill_best_rows(const float* importance, int64_t rows, int64_t count, RowMask& mask,
                    std::vector<uint64_t>& keys) {
  if (count <= 0) return;
  keys.clear();
  for (int64_t i = 0; i < rows; ++i)
    if (!mask.test(i)) keys.push_back(order_key(importance[i], static_cast<uint32_t>(i)));
  count = std::min<int64_t>(count, static_cast<int64_t>(keys.size()));
  if (count < static_cast<int64_t>(keys.size()))
    std::nth_element(keys.begin(), keys.begin() + (count - 1), keys.end(),
                     std::greater<uint64_t>());
  for (int64_t j = 0; j < count; ++j) mask.set(key_index(keys[static_cast<size_t>(j)]), 1);
}

// Candidate windows of the chunking method: sizes r_min + k * r_step <= r_max (k < n_sizes), each
// at starts 0, stride, 2 stride, ... plus one start ending at the last row. A candidate's index
// packs start and size number, index = start << size_bits | k: sparse but unique, and ordering ties
// by start row, then size.
struct WindowGrid {
  WindowGrid(const WindowRows& w, int64_t rows)
      : r_min(w.r_min), r_step(w.r_step), jump_cap(w.jump_cap),
        n_sizes((std::min(w.r_max, rows) - w.r_min) / w.r_step + 1) {
    while ((int64_t{1} << size_bits) < n_sizes) ++size_bits;
    if ((rows << size_bits) > int64_t{0xFFFFFFFF})
      throw std::invalid_argument("too many rows and window sizes for one matrix");
  }
  uint32_t index(int64_t start, int64_t k) const {
    return static_cast<uint32_t>((start << size_bits) | k);
  }
  int64_t start(uint32_t index) const { return index >> size_bits; }
  int64_t length(uint32_t index) const {
    return r_min + static_cast<int64_t>(index & ((1u << size_bits) - 1)) * r_step;
  }
  size_t count(int64_t rows) const {  // number of candidates
    size_t n = 0;
    for (int64_t k = 0; k < n_sizes; ++k) {
      const int64_t r = r_min + k * r_step, stride = std::min(r, jump_cap);
      const int64_t on_grid = (rows - r) / stride + 1;
      n += static_cast<size_t>(on_grid + ((on_grid - 1) * stride + r < rows ? 1 : 0));
    }
    return n;
  }

  int64_t r_min, r_step, jump_cap, n_sizes;
  int size_bits = 0;
};

// Counting-sort pass: `out` holds `keys` grouped into buckets of descending score (the high 32
// bits), bucket b being out[bucket_end[b - 1], bucket_end[b]). Bucket bounds are linear in the
// float bit pattern, i.e. roughly logarithmic in the score. Keys inside a bucket are left
// unsorted. `lo` and `hi` bound the scores of all keys.
void bucket_descending(const std::vector<uint64_t>& keys, uint32_t lo, uint32_t hi,
                       std::vector<uint64_t>& out, std::vector<size_t>& bucket_end) {
  out.resize(keys.size());
  bucket_end.clear();
  if (keys.empty()) return;
  // About 16 keys per bucket on average.
  const uint64_t target = std::max<uint64_t>(64, keys.size() / 16);
  int shift = 0;
  while ((static_cast<uint64_t>(hi - lo) >> shift) >= target) ++shift;
  const size_t n_buckets = static_cast<size_t>((hi - lo) >> shift) + 1;
  bucket_end.assign(n_buckets, 0);
  auto bucket_of = [&](uint64_t k) {  // highest score -> bucket 0
    return n_buckets - 1 - static_cast<size_t>((static_cast<uint32_t>(k >> 32) - lo) >> shift);
  };
  for (const uint64_t k : keys) ++bucket_end[bucket_of(k)];
  size_t total = 0;
  for (size_t& e : bucket_end) {  // bucket_end[b] now = start of bucket b
    const size_t count = e;
    e = total;
    total += count;
  }
  for (const uint64_t k : keys) out[bucket_end[bucket_of(k)]++] = k;  // start -> end
}

// Scratch buffers reused across calls on the same thread (no page faults on the hot path).
struct Scratch {
  std::vector<double> prefix;
  std::vector<uint64_t> keys, sorted;
  std::vector<size_t> bucket_end;
  std::vector<double> f, g, e, best, piece_t, cost_rev;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

void check_rows_budget(int64_t rows, int64_t budget) {
  if (rows < 0) throw std::invalid_argument("rows must be >= 0");
  if (rows > static_cast<int64_t>(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument("too many rows for one matrix");
  if (budget < 0 || budget > rows)
    throw std::invalid_argument("budget_rows must be in [0, rows], got " + std::to_string(budget) +
                                " for " + std::to_string(rows) + " rows");
}

}  // namespace

// ---- methods -----------------------------------------------------------------------------------

void check_importance(const float* importance, int64_t rows) {
  for (int64_t i = 0; i < rows; ++i) {
    const float x = importance[i];
    if (!(x >= 0.0f) || !std::isfinite(x))
      throw std::invalid_argument("importance must be finite and >= 0 (row " + std::to_string(i) +
                                  " is " + std::to_string(x) + ")");
  }
}

double retained_importance(const std::vector<Run>& runs, const float* importance, int64_t rows) {
  double total = 0.0, kept = 0.0;
  for (int64_t i = 0; i < rows; ++i) total += static_cast<double>(importance[i]);
  for (const Run& r : runs)
    for (int64_t i = r.start; i < r.start + r.length; ++i)
      kept += static_cast<double>(importance[i]);
  return total > 0.0 ? kept / total : 1.0;
}

std::vector<Run> select_dense(int64_t rows) {
  if (rows <= 0) return {};
  return {Run{0, rows}};
}

std::vector<Run> select_magnitude(const float* importance, int64_t rows, int64_t budget) {
  check_rows_budget(rows, budget);
  RowMask mask(rows);
  fill_best_rows(importance, rows, budget, mask, scratch().keys);
  return mask.runs();
}

std::vector<Run> select_chunking(const float* importance, int64_t rows, int64_t budget,
                                 const WindowRows& w, const LatencyModel& table,
                                 int64_t row_bytes) {
  check_rows_budget(rows, budget);
  if (w.r_min < 1 || w.r_max < w.r_min || w.r_step < 1 || w.jump_cap < 1)
    throw std::invalid_argument(
        "window sizes need 1 <= r_min <= r_max, r_step >= 1, jump_cap >= 1");
  if (row_bytes <= 0) throw std::invalid_argument("row_bytes must be positive");
  Scratch& s = scratch();
  RowMask mask(rows);
  int64_t remaining = budget;

  if (w.r_min <= std::min(rows, remaining)) {
    const WindowGrid grid(w, rows);
    prefix_sums(importance, rows, s.prefix);
    const double* prefix = s.prefix.data();
    s.keys.resize(grid.count(rows));
    uint64_t* key = s.keys.data();
    uint32_t lo = 0xFFFFFFFFu, hi = 0;  // range of score bits, for the bucketing
    auto add = [&](int64_t start, int64_t k, double inv_t, int64_t r) {
      const float score = static_cast<float>((prefix[start + r] - prefix[start]) * inv_t);
      lo = std::min(lo, float_bits(score));
      hi = std::max(hi, float_bits(score));
      *key++ = order_key(score, grid.index(start, k));
    };
    for (int64_t k = 0; k < grid.n_sizes; ++k) {
      const int64_t r = grid.r_min + k * grid.r_step;
      const int64_t stride = std::min(r, w.jump_cap);
      const double inv_t = 1.0 / table.estimate(static_cast<double>(r * row_bytes));
      int64_t p = 0;
      for (; p + r <= rows; p += stride) add(p, k, inv_t, r);
      // A window ending at the last row keeps the tail reachable.
      if (p - stride + r < rows) add(rows - r, k, inv_t, r);
    }

    // Greedy over candidates in descending key order. Candidates are bucketed by score in one pass;
    // when the greedy reaches a bucket it first drops candidates that can no longer be accepted
    // (overlap or too long: that never reverts), then sorts the rest. Same result as a full sort.
    bucket_descending(s.keys, lo, hi, s.sorted, s.bucket_end);
    auto rejected = [&](uint64_t candidate) {
      const uint32_t c = key_index(candidate);
      const int64_t len = grid.length(c);
      return len > remaining || mask.any(grid.start(c), len);
    };
    size_t begin = 0;
    for (size_t b = 0; b < s.bucket_end.size() && remaining >= w.r_min; ++b) {
      const auto first = s.sorted.begin() + begin;
      auto stop = s.sorted.begin() + s.bucket_end[b];
      begin = s.bucket_end[b];
      stop = std::remove_if(first, stop, rejected);
      std::sort(first, stop, std::greater<uint64_t>());
      for (auto it = first; it != stop && remaining >= w.r_min; ++it) {
        if (rejected(*it)) continue;
        const uint32_t c = key_index(*it);
        mask.set(grid.start(c), grid.length(c));
        remaining -= grid.length(c);
      }
    }
  }
  fill_best_rows(importance, rows, remaining, mask, s.keys);
  return mask.runs();
}

// ---- Lagrangian dynamic program ----------------------------------------------------------------

namespace {

// max over t in [0, n) of a[t] - b[t], n >= 1. Max is exact, so the order does not matter; two
// lanes (SSE2 on x86-64, NEON on aarch64) and two accumulators keep the loop short.
double max_difference(const double* a, const double* b, int64_t n) {
  double m = -HUGE_VAL;
  int64_t t = 0;
#if defined(NCHUNK_SSE2)
  __m128d m0 = _mm_set1_pd(-HUGE_VAL), m1 = m0;
  for (; t + 4 <= n; t += 4) {
    m0 = _mm_max_pd(m0, _mm_sub_pd(_mm_loadu_pd(a + t), _mm_loadu_pd(b + t)));
    m1 = _mm_max_pd(m1, _mm_sub_pd(_mm_loadu_pd(a + t + 2), _mm_loadu_pd(b + t + 2)));
  }
  double lanes[2];
  _mm_storeu_pd(lanes, _mm_max_pd(m0, m1));
  m = std::max(lanes[0], lanes[1]);
#elif defined(NCHUNK_NEON)
  float64x2_t m0 = vdupq_n_f64(-HUGE_VAL), m1 = m0;
  for (; t + 4 <= n; t += 4) {
    m0 = vmaxq_f64(m0, vsubq_f64(vld1q_f64(a + t), vld1q_f64(b + t)));
    m1 = vmaxq_f64(m1, vsubq_f64(vld1q_f64(a + t + 2), vld1q_f64(b + t + 2)));
  }
  m = vmaxvq_f64(vmaxq_f64(m0, m1));
#endif
  for (; t < n; ++t) m = std::max(m, a[t] - b[t]);
  return m;
}

// Removes `count` selected rows, each time the least important row at the end of a run (ties:
// lower row). Removing run ends never splits a run, so the estimated time does not grow.
void trim_run_ends(RowMask& mask, const float* importance, int64_t rows, int64_t count) {
  using Entry = std::pair<float, int64_t>;  // (importance, row), smallest first
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> ends;
  for (const Run& r : mask.runs()) {
    ends.push({importance[r.start], r.start});
    if (r.length > 1) ends.push({importance[r.start + r.length - 1], r.start + r.length - 1});
  }
  while (count > 0 && !ends.empty()) {
    const int64_t row = ends.top().second;
    ends.pop();
    if (!mask.test(row)) continue;  // already removed
    mask.reset(row);
    --count;
    for (const int64_t next : {row - 1, row + 1})
      if (next >= 0 && next < rows && mask.test(next)) ends.push({importance[next], next});
  }
}

// Adds `count` rows, each time the most important unselected row next to a run (ties: lower row);
// with no run yet, the most important row starts one. Growing runs adds no new reads.
void grow_run_ends(RowMask& mask, const float* importance, int64_t rows, int64_t count) {
  using Entry = std::pair<float, int64_t>;  // (importance, -row), largest first
  std::priority_queue<Entry> next_to;
  for (const Run& r : mask.runs()) {
    if (r.start > 0) next_to.push({importance[r.start - 1], -(r.start - 1)});
    const int64_t after = r.start + r.length;
    if (after < rows) next_to.push({importance[after], -after});
  }
  if (next_to.empty() && rows > 0) {
    int64_t best = 0;
    for (int64_t i = 1; i < rows; ++i)
      if (importance[i] > importance[best]) best = i;
    next_to.push({importance[best], -best});
  }
  while (count > 0 && !next_to.empty()) {
    const int64_t row = -next_to.top().second;
    next_to.pop();
    if (mask.test(row)) continue;  // already added
    mask.set(row, 1);
    --count;
    for (const int64_t next : {row - 1, row + 1})
      if (next >= 0 && next < rows && !mask.test(next)) next_to.push({importance[next], -next});
  }
}

// The program for one matrix: maximise  sum of selected importance - lambda * sum over maximal
// runs of T[run bytes]. A run of at least m rows (m rows fill the latency table) costs T in
// proportion to its length, so runs are built from short pieces of 1..m-1 rows and long runs
// priced per row.
// Pieces may touch; touching pieces cost at least their merged run when T is subadditive, so the
// optimum of the program is then the optimum over run sets.
class RunProgram {
 public:
  RunProgram(const float* importance, int64_t rows, const LatencyModel& table, int64_t row_bytes,
             Scratch& s)
      : v_(importance), rows_(rows), s_(s) {
    prefix_sums(importance, rows, s.prefix);
    m_ = std::max<int64_t>(1, (table.table_bytes() + row_bytes - 1) / row_bytes);
    m_ = std::min(m_, rows + 1);  // no long runs when m > rows
    s.piece_t.assign(static_cast<size_t>(m_), 0.0);
    for (int64_t len = 1; len < m_; ++len)
      s.piece_t[len] = table.estimate(static_cast<double>(len * row_bytes));
    t_long_ = table.estimate(static_cast<double>(m_ * row_bytes));  // = m * per-row cost
  }

  int64_t long_rows() const { return m_; }

  // Solves at price `lambda`, writes the rows into `mask` and returns their number.
  //   f[i]  best value on rows [0, i);   g[j] = f[j] - prefix[j];   v = importance[i - 1]
  //   e[i]  best value on rows [0, i) whose last run is a long run ending at row i - 1:
  //         e[i] = max(e[i-1] + v - lambda T[m] / m,  g[i-m] + prefix[i] - lambda T[m])
  //   f[i] = max(f[i-1] + max(0, v - lambda T[1]),              skip row, or a piece of one row
  //              e[i],                                           a long run
  //              prefix[i] + max_{L in [2, m)} g[i-L] - lambda T[L])   a short piece
  // The one-row term keeps the step-to-step dependency short; longer pieces read g from at least
  // two steps back.
  int64_t solve(double lambda, RowMask& mask) {
    Scratch& s = s_;
    const int64_t n = rows_, m = m_;
    const double* prefix = s.prefix.data();
    // cost_rev[t] = lambda * T[m - 1 - t], so the short pieces read g[i-k .. i-2] forwards.
    s.cost_rev.assign(static_cast<size_t>(m), 0.0);
    for (int64_t len = 1; len < m; ++len) s.cost_rev[m - 1 - len] = lambda * s.piece_t[len];
    const double* cost_rev = s.cost_rev.data();
    const double long_cost = lambda * t_long_;
    const double per_row = long_cost / static_cast<double>(m);
    const double one_cost = m > 1 ? cost_rev[m - 2] : HUGE_VAL;  // no one-row piece when m == 1
    s.f.resize(static_cast<size_t>(n) + 1);
    s.g.resize(static_cast<size_t>(n) + 1);
    s.e.resize(static_cast<size_t>(n) + 1);
    s.best.resize(static_cast<size_t>(n) + 1);
    double *f = s.f.data(), *g = s.g.data(), *e = s.e.data(), *best = s.best.data();
    f[0] = g[0] = 0.0;
    e[0] = best[0] = -HUGE_VAL;
    double f_prev = 0.0, e_prev = -HUGE_VAL;
    for (int64_t i = 1; i <= n; ++i) {
      const double v = static_cast<double>(v_[i - 1]);
      const int64_t k = std::min(i, m - 1);  // short pieces of 2..k rows
      const double b =
          k > 1 ? max_difference(g + (i - k), cost_rev + (m - 1 - k), k - 1) : -HUGE_VAL;
      const double e_i =
          i >= m ? std::max(e_prev + v - per_row, g[i - m] + prefix[i] - long_cost) : -HUGE_VAL;
      f_prev = std::max(f_prev + std::max(0.0, v - one_cost), std::max(e_i, prefix[i] + b));
      best[i] = b;
      e[i] = e_prev = e_i;
      f[i] = f_prev;
      g[i] = f_prev - prefix[i];
    }
    // Walk back. Recomputing a candidate value gives the same bits, so == identifies the choice;
    // ties prefer skipping a row, then a long run, then a piece of one row.
    int64_t count = 0, i = n;
    while (i > 0) {
      int64_t start = i;
      if (f[i] == f[i - 1]) {
        --i;
        continue;
      }
      if (f[i] == e[i]) {
        int64_t j = i;
        while (e[j] != g[j - m] + prefix[j] - long_cost) --j;  // extensions back to the start
        start = j - m;
      } else if (f[i] == f[i - 1] + std::max(0.0, static_cast<double>(v_[i - 1]) - one_cost)) {
        start = i - 1;
      } else {
        int64_t len = 2;
        while (g[i - len] - cost_rev[m - 1 - len] != best[i]) ++len;
        start = i - len;
      }
      mask.set(start, i - start);
      count += i - start;
      i = start;
    }
    return count;
  }

  double total() const { return s_.prefix[static_cast<size_t>(rows_)]; }

 private:
  const float* v_;
  int64_t rows_;
  Scratch& s_;
  int64_t m_ = 1;
  double t_long_ = 0.0;
};

}  // namespace

std::vector<Run> lagrangian_runs(const float* importance, int64_t rows, double lambda,
                                 const LatencyModel& table, int64_t row_bytes) {
  check_rows_budget(rows, 0);
  if (!(lambda >= 0.0) || !std::isfinite(lambda))
    throw std::invalid_argument("lambda must be finite and >= 0");
  if (row_bytes <= 0) throw std::invalid_argument("row_bytes must be positive");
  RowMask mask(rows);
  RunProgram program(importance, rows, table, row_bytes, scratch());
  program.solve(lambda, mask);
  return mask.runs();
}

std::vector<Run> select_dp(const float* importance, int64_t rows, int64_t budget,
                           const LatencyModel& table, int64_t row_bytes, int* solves) {
  check_rows_budget(rows, budget);
  if (row_bytes <= 0) throw std::invalid_argument("row_bytes must be positive");
  if (solves) *solves = 0;
  if (budget == 0) return {};
  if (budget == rows) return select_dense(rows);
  Scratch& s = scratch();
  RunProgram program(importance, rows, table, row_bytes, s);
  const double total = program.total();
  if (!(total > 0.0)) return select_magnitude(importance, rows, budget);

  // Search the price of time (x = log lambda). The row count falls as the price rises and moves in
  // jumps (a run appears or grows), so the search stops once a solution is within `close` rows of
  // the budget (it is then trimmed or grown at its run ends) or the price bracket is narrow. Secant
  // steps on F = logit(count / rows) - logit(budget / rows): extrapolated until the budget is
  // bracketed, then regula falsi with the Illinois correction against one-sided stalls.
  // Start where reading one row at peak throughput costs one row of mean importance.
  const double table_bytes = static_cast<double>(table.table_bytes());
  const double t_row = table.estimate(table_bytes) / table_bytes * static_cast<double>(row_bytes);
  const double x0 = std::log(total / static_cast<double>(rows) / t_row);
  const int64_t close = std::max<int64_t>(program.long_rows(), budget / 32);
  auto logit = [rows](int64_t count) {  // of the selected fraction, kept finite at 0 and rows
    return std::log((static_cast<double>(count) + 1.0) / (static_cast<double>(rows - count) + 1.0));
  };
  const double f_budget = logit(budget);
  bool have_lo = false, have_hi = false;  // lo: count > budget; hi: count < budget
  double x_lo = 0.0, x_hi = 0.0, f_lo = 0.0, f_hi = 0.0, x_prev = 0.0, f_prev = 0.0;
  int64_t count_lo = 0, count_hi = 0;
  int side = 0;  // +1 if the last solve moved lo, -1 if it moved hi
  RowMask above(rows), below(rows);
  double x = x0;
  int n = 0;
  while (n < kDpMaxSolves) {
    RowMask mask(rows);
    const int64_t count = program.solve(std::exp(x), mask);
    ++n;
    if (count == budget) {
      if (solves) *solves = n;
      return mask.runs();
    }
    const double fx = logit(count) - f_budget;
    if (count > budget) {
      if (have_lo && have_hi && side == 1) f_hi *= 0.5;  // Illinois
      have_lo = true, x_lo = x, f_lo = fx, count_lo = count, above = mask, side = 1;
    } else {
      if (have_lo && have_hi && side == -1) f_lo *= 0.5;
      have_hi = true, x_hi = x, f_hi = fx, count_hi = count, below = mask, side = -1;
    }
    if ((have_lo && count_lo - budget <= close) || (have_hi && budget - count_hi <= close)) break;
    double next;
    if (have_lo && have_hi) {
      if (x_hi - x_lo <= kDpPriceTolerance) break;
      const double t = std::min(0.98, std::max(0.02, f_lo / (f_lo - f_hi)));
      next = x_lo + t * (x_hi - x_lo);
    } else {
      // Not bracketed: secant through the last two solves (slope -2 after the first),
      // overshooting by 20 %, and a step of at least log(1.25) and at most log(8).
      const double slope = n > 1 && x != x_prev ? (fx - f_prev) / (x - x_prev) : -2.0;
      double step = slope < 0.0 ? -1.2 * fx / slope : std::log(8.0);
      step = std::min(std::log(8.0), std::max(std::log(1.25), std::fabs(step)));
      if (fx < 0.0) step = -step;
      next = x + step;
      if (std::fabs(next - x0) > 30.0) break;
    }
    x_prev = x, f_prev = fx, x = next;
  }
  if (solves) *solves = n;
  // Complete the solution nearest to the budget: trim the one above or grow the one below.
  if (have_lo && (!have_hi || count_lo - budget <= budget - count_hi)) {
    trim_run_ends(above, importance, rows, count_lo - budget);
    return above.runs();
  }
  grow_run_ends(below, importance, rows, budget - count_hi);
  return below.runs();
}

}  // namespace nchunk
