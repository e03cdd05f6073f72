// Standalone checks of the selection kernels (select.hpp), without Python:
//
//   g++ -std=c++17 -O2 -Wall -Wextra -I nchunk_core/csrc nchunk_core/csrc/tests/test_select.cpp
//       nchunk_core/csrc/select.cpp -o /tmp/test_select
//   /tmp/test_select    # prints "all passed"; exit status 1 on failure
//
// Covers the latency estimator, the invariants of every method (exact budget, sorted maximal runs),
// a few hand-made cases, optimality of the dynamic program against brute force, and errors.
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "select.hpp"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

std::vector<double> affine_table(int n_kib, double setup_s, double bytes_per_s) {
  std::vector<double> t(static_cast<size_t>(n_kib));
  for (int k = 0; k < n_kib; ++k)
    t[static_cast<size_t>(k)] = setup_s + (k + 1) * 1024.0 / bytes_per_s;
  return t;
}

int64_t total_rows(const std::vector<nchunk::Run>& runs) {
  int64_t n = 0;
  for (const auto& r : runs) n += r.length;
  return n;
}

bool valid_runs(const std::vector<nchunk::Run>& runs, int64_t rows) {
  for (size_t i = 0; i < runs.size(); ++i) {
    if (runs[i].length < 1 || runs[i].start < 0) return false;
    if (runs[i].start + runs[i].length > rows) return false;
    if (i > 0 && runs[i].start <= runs[i - 1].start + runs[i - 1].length) return false;  // maximal
  }
  return true;
}

void test_estimator() {
  const std::vector<double> t = {1.0, 2.0, 4.0};  // grid: 1, 2, 3 KiB
  const nchunk::LatencyModel model(t.data(), 3, 1024);
  check(model.estimate(0.0) == 0.0 && model.estimate(-3.0) == 0.0, "estimate of no bytes is 0");
  check(model.estimate(100.0) == 1.0, "below one step costs the first entry");
  check(model.estimate(1536.0) == 1.5, "linear between grid points");
  check(model.estimate(2560.0) == 3.0, "linear between grid points (2)");
  check(model.estimate(3072.0) == 4.0, "last grid point");
  check(model.estimate(6144.0) == 8.0, "beyond the table: scaled by size");
  check(model.table_bytes() == 3072, "table bytes");
}

void test_methods_invariants() {
  std::mt19937 rng(5);
  std::lognormal_distribution<float> lognormal(0.0f, 1.5f);
  const std::vector<double> t = affine_table(256, 80e-6, 1e9);
  const nchunk::LatencyModel model(t.data(), 256, 1024);
  for (const int64_t rows : {1, 7, 300, 3584}) {
    std::vector<float> v(static_cast<size_t>(rows));
    for (auto& x : v) x = lognormal(rng);
    for (const int64_t row_bytes : {1024, 7168, 75776}) {
      for (const int64_t budget : {int64_t{0}, int64_t{1}, rows / 3, rows - 1, rows}) {
        const nchunk::WindowRows w{1, 37, 1, 5};
        const auto mag = nchunk::select_magnitude(v.data(), rows, budget);
        const auto chunk = nchunk::select_chunking(v.data(), rows, budget, w, model, row_bytes);
        const auto dp = nchunk::select_dp(v.data(), rows, budget, model, row_bytes);
        const std::string where = " rows=" + std::to_string(rows) +
                                  " budget=" + std::to_string(budget) +
                                  " row_bytes=" + std::to_string(row_bytes);
        for (const auto* runs : {&mag, &chunk, &dp}) {
          check(total_rows(*runs) == budget, "budget met exactly" + where);
          check(valid_runs(*runs, rows), "sorted maximal runs" + where);
        }
      }
    }
  }
}

void test_hand_made_cases() {
  const std::vector<double> t = affine_table(64, 80e-6, 1e9);
  const nchunk::LatencyModel model(t.data(), 64, 1024);
  std::vector<float> v(64, 0.01f);
  for (int i = 20; i < 30; ++i) v[static_cast<size_t>(i)] = 1.0f;
  const auto chunk = nchunk::select_chunking(v.data(), 64, 10, {1, 64, 1, 1}, model, 1024);
  check(chunk.size() == 1 && chunk[0].start == 20 && chunk[0].length == 10,
        "hot block taken whole");
  const auto mag = nchunk::select_magnitude(v.data(), 64, 10);
  check(mag.size() == 1 && mag[0].start == 20 && mag[0].length == 10, "magnitude of a hot block");
  const auto dense = nchunk::select_dense(64);
  check(dense.size() == 1 && dense[0].length == 64, "dense is one run");
  const std::vector<float> ones(10, 1.0f);
  const auto tie = nchunk::select_magnitude(ones.data(), 10, 3);
  check(tie.size() == 1 && tie[0].start == 0 && tie[0].length == 3, "ties favour lower rows");
}

// Value of a selection for the program of lagrangian_runs.
double program_value(const std::vector<bool>& mask, const std::vector<float>& v, double lambda,
                     const nchunk::LatencyModel& model, int64_t row_bytes) {
  double value = 0.0;
  int64_t run = 0;
  for (size_t i = 0; i <= mask.size(); ++i) {
    if (i < mask.size() && mask[i]) {
      value += v[i];
      ++run;
    } else if (run > 0) {
      value -= lambda * model.estimate(static_cast<double>(run * row_bytes));
      run = 0;
    }
  }
  return value;
}

void test_program_is_optimal() {
  std::mt19937 rng(9);
  std::lognormal_distribution<float> lognormal(0.0f, 1.0f);
  std::uniform_real_distribution<double> price(0.2, 5.0);
  const std::vector<double> t = affine_table(4, 80e-6, 1e9);  // 4 KiB grid: long runs occur
  const nchunk::LatencyModel model(t.data(), 4, 1024);
  for (int trial = 0; trial < 200; ++trial) {
    const int rows = 1 + trial % 12;
    const int64_t row_bytes = trial % 2 ? 1024 : 3072;
    std::vector<float> v(static_cast<size_t>(rows));
    double mean = 0.0;
    for (auto& x : v) mean += (x = lognormal(rng)) / rows;
    const double lambda = price(rng) * mean / 1e-4;
    std::vector<bool> mask(static_cast<size_t>(rows), false);
    for (const auto& r : nchunk::lagrangian_runs(v.data(), rows, lambda, model, row_bytes))
      for (int64_t i = r.start; i < r.start + r.length; ++i) mask[static_cast<size_t>(i)] = true;
    const double got = program_value(mask, v, lambda, model, row_bytes);
    double best = -HUGE_VAL;
    for (uint32_t bits = 0; bits < (1u << rows); ++bits) {
      std::vector<bool> m(static_cast<size_t>(rows));
      for (int i = 0; i < rows; ++i) m[static_cast<size_t>(i)] = (bits >> i) & 1u;
      best = std::max(best, program_value(m, v, lambda, model, row_bytes));
    }
    check(std::fabs(got - best) <= 1e-9 * (1.0 + std::fabs(best)),
          "program optimal, trial " + std::to_string(trial));
  }
}

void test_errors() {
  const std::vector<double> t = affine_table(4, 80e-6, 1e9);
  const nchunk::LatencyModel model(t.data(), 4, 1024);
  const std::vector<float> v = {1.0f, -1.0f};
  bool thrown = false;
  try {
    nchunk::check_importance(v.data(), 2);
  } catch (const std::invalid_argument&) {
    thrown = true;
  }
  check(thrown, "negative importance rejected");
  thrown = false;
  try {
    nchunk::select_magnitude(v.data(), 2, 3);
  } catch (const std::invalid_argument&) {
    thrown = true;
  }
  check(thrown, "budget above rows rejected");
  thrown = false;
  try {
    nchunk::select_chunking(v.data(), 2, 1, {0, 1, 1, 1}, model, 1024);
  } catch (const std::invalid_argument&) {
    thrown = true;
  }
  check(thrown, "window of 0 rows rejected");
}

}  // namespace

int main() {
  test_estimator();
  test_methods_invariants();
  test_hand_made_cases();
  test_program_is_optimal();
  test_errors();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
