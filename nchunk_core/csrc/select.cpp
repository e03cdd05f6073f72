// Selection kernels declared in select.hpp: dense, magnitude top-R, greedy chunking and the Lagrangian
// dynamic program, plus the latency estimator they share with latency.py.
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
#include <stdexcept>
#include <string>

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
    std::nth_element(keys.begin(), keys.begin() + (count - 1), keys.end(), std::greater<uint64_t>());
  for (int64_t j = 0; j < count; ++j) mask.set(key_index(keys[static_cast<size_t>(j)]), 1);
}

// Candidate windows of the chunking method: sizes r_min + k * r_step <= r_max (k < n_sizes), each at
// starts 0, stride, 2 stride, ... plus one start ending at the last row. A candidate's index packs
// start and size number, index = start << size_bits | k: sparse but unique, and ordering ties by
// start row, then size.
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

// Counting-sort pass: `out` holds `keys` grouped into buckets of descending score (the high 32 bits),
// bucket b being out[bucket_end[b - 1], bucket_end[b]). Bucket bounds are linear in the float bit
// pattern, i.e. roughly logarithmic in the score. Keys inside a bucket are left unsorted.
// `lo` and `hi` bound the scores of all keys.
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
  std::vector<double> f, g, best;
  std::vector<double> piece_cost;
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
    for (int64_t i = r.start; i < r.start + r.length; ++i) kept += static_cast<double>(importance[i]);
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
    throw std::invalid_argument("window sizes need 1 <= r_min <= r_max, r_step >= 1, jump_cap >= 1");
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
    auto rejected = [&](uint64_t key) {
      const uint32_t c = key_index(key);
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

// Maximises  sum over selected rows (v_i - mu) - sum over pieces piece_cost[length]  over sets of
// non-overlapping pieces of 1..max_len rows (pieces may touch). Writes the selected rows into
// `mask` and returns their number.
//   f[i]: best value on rows [0, i);  g[j] = f[j] - prefix[j] + mu * j
//   f[i] = max(f[i-1], prefix[i] - mu * i + max_L (g[i-L] - piece_cost[L]))
int64_t solve_pieces(const double* prefix, int64_t rows, const double* piece_cost, int64_t max_len,
                     double mu, Scratch& s, RowMask& mask) {
  s.f.assign(static_cast<size_t>(rows) + 1, 0.0);
  s.g.assign(static_cast<size_t>(rows) + 1, 0.0);
  s.best.assign(static_cast<size_t>(rows) + 1, 0.0);
  double* f = s.f.data();
  double* g = s.g.data();
  double* best = s.best.data();
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int64_t i = 1; i <= rows; ++i) {
    const int64_t lmax = std::min(i, max_len);
    // Four independent maxima keep the loop pipelined; the order of the max does not matter.
    double m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    int64_t len = 1;
    for (; len + 3 <= lmax; len += 4) {
      m0 = std::max(m0, g[i - len] - piece_cost[len]);
      m1 = std::max(m1, g[i - len - 1] - piece_cost[len + 1]);
      m2 = std::max(m2, g[i - len - 2] - piece_cost[len + 2]);
      m3 = std::max(m3, g[i - len - 3] - piece_cost[len + 3]);
    }
    for (; len <= lmax; ++len) m0 = std::max(m0, g[i - len] - piece_cost[len]);
    const double m = std::max(std::max(m0, m1), std::max(m2, m3));
    best[i] = m;
    const double take = prefix[i] - mu * static_cast<double>(i) + m;
    f[i] = std::max(f[i - 1], take);
    g[i] = f[i] - prefix[i] + mu * static_cast<double>(i);
  }
  // Walk back; recomputing g[i-L] - piece_cost[L] gives bit-identical values, so == finds the piece.
  int64_t count = 0;
  int64_t i = rows;
  while (i > 0) {
    if (f[i] == f[i - 1]) {
      --i;
      continue;
    }
    const int64_t lmax = std::min(i, max_len);
    int64_t len = 1;
    while (len < lmax && g[i - len] - piece_cost[len] != best[i]) ++len;
    mask.set(i - len, len);
    count += len;
    i -= len;
  }
  return count;
}

// piece_cost[L] = lambda * T[L * row_bytes] for L = 0..max_len. Pieces of at least m rows (m = rows
// that fill the table) cost in proportion to their length, so any run splits into pieces shorter
// than 2m at no extra cost: max_len = 2m - 1 loses nothing.
int64_t piece_costs(int64_t rows, double lambda, const LatencyModel& table, int64_t row_bytes,
                    int64_t table_bytes, std::vector<double>& cost) {
  const int64_t m = std::max<int64_t>(1, (table_bytes + row_bytes - 1) / row_bytes);
  const int64_t max_len = std::max<int64_t>(1, std::min(rows, 2 * m - 1));
  cost.assign(static_cast<size_t>(max_len) + 1, 0.0);
  for (int64_t len = 1; len <= max_len; ++len)
    cost[len] = lambda * table.estimate(static_cast<double>(len * row_bytes));
  return max_len;
}

}  // namespace

std::vector<Run> lagrangian_runs(const float* importance, int64_t rows, double lambda, double mu,
                                 const LatencyModel& table, int64_t row_bytes) {
  check_rows_budget(rows, 0);
  if (!(lambda >= 0.0) || !std::isfinite(lambda) || !std::isfinite(mu))
    throw std::invalid_argument("lambda must be finite and >= 0, mu finite");
  Scratch& s = scratch();
  RowMask mask(rows);
  if (rows == 0) return {};
  prefix_sums(importance, rows, s.prefix);
  const int64_t max_len =
      piece_costs(rows, lambda, table, row_bytes, table.table_bytes(), s.piece_cost);
  solve_pieces(s.prefix.data(), rows, s.piece_cost.data(), max_len, mu, s, mask);
  return mask.runs();
}

std::vector<Run> select_dp(const float* importance, int64_t rows, int64_t budget, double lambda,
                           const LatencyModel& table, int64_t row_bytes) {
  check_rows_budget(rows, budget);
  if (!(lambda >= 0.0) || !std::isfinite(lambda))
    throw std::invalid_argument("lambda must be finite and >= 0");
  if (row_bytes <= 0) throw std::invalid_argument("row_bytes must be positive");
  if (budget == 0) return {};
  if (budget == rows) return select_dense(rows);
  Scratch& s = scratch();
  prefix_sums(importance, rows, s.prefix);
  const int64_t max_len =
      piece_costs(rows, lambda, table, row_bytes, table.table_bytes(), s.piece_cost);
  // Row count is non-increasing in the row price mu: at mu_lo every row pays for itself as a piece
  // of one row (all rows selected), at mu_hi no row does (none selected).
  float v_max = 0.0f;
  for (int64_t i = 0; i < rows; ++i) v_max = std::max(v_max, importance[i]);
  double mu_lo = -s.piece_cost[1] - 1.0, mu_hi = static_cast<double>(v_max);
  RowMask chosen(rows);  // solution at mu_hi: fewest rows <= budget seen so far
  for (int iter = 0; iter < 40 && mu_hi - mu_lo > 1e-12 * (1.0 + std::fabs(mu_hi)); ++iter) {
    const double mu = 0.5 * (mu_lo + mu_hi);
    RowMask mask(rows);
    const int64_t count = solve_pieces(s.prefix.data(), rows, s.piece_cost.data(), max_len, mu, s, mask);
    if (count > budget) {
      mu_lo = mu;
    } else {
      mu_hi = mu;
      chosen = mask;
      if (count == budget) break;
    }
  }
  int64_t have = 0;
  for (const Run& r : chosen.runs()) have += r.length;
  fill_best_rows(importance, rows, budget - have, chosen, s.keys);
  return chosen.runs();
}

}  // namespace nchunk
