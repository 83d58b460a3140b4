// Deep matrix completion's target (models/deep_mc.h): generated from a seed, or read from / written to
// the text format; M's values at the observed set in both orders.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <unordered_set>

#include "kernels/rng.h"
#include "models/deep_mc.h"
#include "runtime/linalg.h"
#include "runtime/ops.h"

namespace deeplora::deep_mc {
namespace {

// Target values at the pattern's entries, in CSR order, from f64 host factors.
std::vector<double> values_at(const SparsePattern& p, const std::vector<double>& U, const std::vector<double>& V,
                              int64_t k) {
  std::vector<double> m(static_cast<size_t>(p.nnz));
  for (int64_t i = 0; i < p.rows; ++i)
    for (int32_t e = p.h_row_ptr[size_t(i)]; e < p.h_row_ptr[size_t(i) + 1]; ++e) {
      const int64_t j = p.h_col_idx[size_t(e)];
      double s = 0;
      for (int64_t c = 0; c < k; ++c) s += U[size_t(i * k + c)] * V[size_t(j * k + c)];
      m[size_t(e)] = s;
    }
  return m;
}

Target finish_target(int64_t d, int64_t rank, const std::vector<double>& U, const std::vector<double>& V,
                     const std::vector<int32_t>& ri, const std::vector<int32_t>& ci, DType dt, Device dev,
                     std::string source) {
  if (ri.empty())
    throw std::invalid_argument(fmt::format("{}: no entry is observed (raise --p or check the file)", source));
  Target t;
  t.d = d;
  t.rank = rank;
  t.source = std::move(source);
  SparsePattern host = SparsePattern::from_pairs(d, d, ri, ci, Device::cpu, t.source);
  std::vector<double> m = values_at(host, U, V, rank);
  t.omega = host.to(dev);
  t.U = Tensor::from_vector(U, Shape{d, rank}, dt, dev);
  t.V = Tensor::from_vector(V, Shape{d, rank}, dt, dev);
  t.m_csr = Tensor::from_vector(m, Shape{host.nnz}, dt, dev);
  t.m_csc = Tensor::from_vector(host.csr_to_csc(m), Shape{host.nnz}, dt, dev);
  return t;
}

}  // namespace

// ---- target ---------------------------------------------------------------------------------------

Target make_target(int64_t d, int64_t r, double p, int64_t obs_per_row, uint64_t seed, DType dt, Device dev) {
  if (d < 2 || r < 1 || r > d) throw std::invalid_argument(fmt::format("make_target: bad d = {} or r = {}", d, r));
  if (!(p > 0.0 && p <= 1.0) && obs_per_row <= 0)
    throw std::invalid_argument(fmt::format("make_target: p = {} must be in (0, 1]", p));
  // M = (√s·Q_U)(√s·Q_V)ᵀ, Q_* orthonormal bases of seeded Gaussians, every singular value s = 2·sqrt(d).
  const double root_s = std::sqrt(2.0 * std::sqrt(double(d)));
  auto factor = [&](uint64_t k) {
    Tensor q = linalg::orthonormalize(Tensor::randn(Shape{d, r}, seed_of(seed, k), DType::f64, Device::cpu));
    std::vector<double> v = q.to_double();
    for (double& x : v) x *= root_s;
    return v;
  };
  std::vector<double> U = factor(1), V = factor(2);
  std::vector<int32_t> ri, ci;
  const uint64_t mseed = seed_of(seed, 3);
  const double lq = p < 1.0 ? std::log1p(-p) : 0.0;
  std::vector<int32_t> row;
  for (int64_t i = 0; i < d; ++i) {
    const uint64_t s = rng::bits(mseed, uint64_t(i));
    row.clear();
    if (obs_per_row > 0) {
      const int64_t n = std::min(obs_per_row, d);
      std::unordered_set<int64_t> chosen;
      uint64_t c = 0;
      for (int64_t j = d - n; j < d; ++j) {  // Floyd: n distinct values from [0, d)
        int64_t t = int64_t(rng::u01(s, c++) * double(j + 1));
        if (t > j) t = j;
        if (!chosen.insert(t).second) chosen.insert(j);
      }
      for (int64_t j : chosen) row.push_back(int32_t(j));
      std::sort(row.begin(), row.end());
    } else if (p >= 1.0) {
      for (int64_t j = 0; j < d; ++j) row.push_back(int32_t(j));
    } else {
      double j = -1.0;
      for (uint64_t c = 0;; ++c) {
        j += 1.0 + std::floor(std::log(rng::u01_open(s, c)) / lq);
        if (j >= double(d)) break;
        row.push_back(int32_t(j));
      }
    }
    for (int32_t j : row) {
      ri.push_back(int32_t(i));
      ci.push_back(j);
    }
  }
  std::string src = obs_per_row > 0 ? fmt::format("generated (seed {}, d {}, rank {}, {} observed per row)", seed, d, r,
                                                  obs_per_row)
                                    : fmt::format("generated (seed {}, d {}, rank {}, p {})", seed, d, r, p);
  return finish_target(d, r, U, V, ri, ci, dt, dev, src);
}

Target load_target(const std::string& path, DType dt, Device dev) {
  constexpr int64_t kReserveCap = int64_t(1) << 20;  // elements reserved before any is read
  std::ifstream in(path);
  if (!in) throw std::invalid_argument(fmt::format("target file '{}': cannot open it for reading", path));
  int64_t lineno = 0;
  std::string line;
  auto fail = [&](const std::string& msg) -> std::invalid_argument {
    return std::invalid_argument(fmt::format("target file '{}': line {}: {}", path, lineno, msg));
  };
  // Next non-blank, non-comment line, split into tokens.
  auto next = [&](const char* expecting) {
    while (std::getline(in, line)) {
      ++lineno;
      const size_t h = line.find('#');
      if (h != std::string::npos) line.resize(h);
      std::istringstream ss(line);
      std::vector<std::string> tok;
      for (std::string w; ss >> w;) tok.push_back(w);
      if (!tok.empty()) return tok;
    }
    ++lineno;
    throw fail(fmt::format("unexpected end of file, expected {}", expecting));
  };
  auto to_int = [&](const std::string& s, const char* what) {
    size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(s, &pos);
    } catch (...) {
      pos = 0;
    }
    if (pos != s.size()) throw fail(fmt::format("{} '{}' is not an integer", what, s));
    return int64_t(v);
  };
  auto to_num = [&](const std::string& s) {
    size_t pos = 0;
    double v = 0;
    try {
      v = std::stod(s, &pos);
    } catch (...) {
      pos = 0;
    }
    if (pos != s.size() || !std::isfinite(v)) throw fail(fmt::format("'{}' is not a finite number", s));
    return v;
  };
  auto keyed = [&](const char* key) {
    auto t = next(key);
    if (t.size() != 2 || t[0] != key) throw fail(fmt::format("expected '{} <value>'", key));
    return t[1];
  };
  auto head = next("the header 'deep_mc_target 1'");
  if (head.size() != 2 || head[0] != "deep_mc_target" || head[1] != "1")
    throw fail("expected the header 'deep_mc_target 1'");
  const int64_t d = to_int(keyed("d"), "d");
  if (d < 2 || d > (int64_t(1) << 30)) throw fail(fmt::format("d = {} out of range [2, 2^30]", d));
  const int64_t k = to_int(keyed("rank"), "rank");
  if (k < 1 || k > d) throw fail(fmt::format("rank = {} out of range [1, d = {}]", k, d));
  auto matrix = [&](const char* name) {
    auto t = next(name);
    if (t.size() != 1 || t[0] != name) throw fail(fmt::format("expected the line '{}'", name));
    // Grown as the rows are read, not sized from d and rank up front: a 40-byte file claiming
    // d = 2^30 must fail at its end of file, not ask for gigabytes first (fuzz/fuzz_deep_mc_target).
    std::vector<double> m;
    m.reserve(size_t(std::min<int64_t>(d * k, kReserveCap)));
    for (int64_t i = 0; i < d; ++i) {
      auto row = next(fmt::format("row {} of {}", i, name).c_str());
      if (int64_t(row.size()) != k) throw fail(fmt::format("row {} of {} has {} numbers, expected {}", i, name, row.size(), k));
      for (int64_t c = 0; c < k; ++c) m.push_back(to_num(row[size_t(c)]));
    }
    return m;
  };
  std::vector<double> U = matrix("U"), V = matrix("V");
  const int64_t n = to_int(keyed("observed"), "observed");
  if (n < 1 || n > d * d) throw fail(fmt::format("observed = {} out of range [1, d² = {}]", n, d * d));
  std::vector<int32_t> ri, ci;
  ri.reserve(size_t(std::min<int64_t>(n, kReserveCap)));
  ci.reserve(size_t(std::min<int64_t>(n, kReserveCap)));
  for (int64_t e = 0; e < n; ++e) {
    auto t = next("an observed entry 'i j'");
    if (t.size() != 2) throw fail("expected an observed entry 'i j'");
    const int64_t i = to_int(t[0], "row index"), j = to_int(t[1], "column index");
    if (i < 0 || i >= d || j < 0 || j >= d) throw fail(fmt::format("entry ({}, {}) is outside [0, {})", i, j, d));
    ri.push_back(int32_t(i));
    ci.push_back(int32_t(j));
  }
  while (std::getline(in, line)) {
    ++lineno;
    const size_t h = line.find('#');
    if (line.substr(0, h).find_first_not_of(" \t\r") != std::string::npos)
      throw fail(fmt::format("unexpected content after the {} observed entries", n));
  }
  return finish_target(d, k, U, V, ri, ci, dt, dev, fmt::format("target file '{}'", path));
}

void save_target(const Target& t, const std::string& path) {
  std::ofstream out(path);
  if (!out) throw std::invalid_argument(fmt::format("target file '{}': cannot open it for writing", path));
  out << "deep_mc_target 1\n# M = U V^T; observed entries are 0-based (row, column)\n";
  out << "d " << t.d << "\nrank " << t.rank << "\n";
  for (const auto& [name, m] : {std::pair<const char*, Tensor>{"U", t.U}, {"V", t.V}}) {
    out << name << "\n";
    std::vector<double> v = m.to_double();
    for (int64_t i = 0; i < t.d; ++i) {
      for (int64_t c = 0; c < t.rank; ++c) out << (c ? " " : "") << fmt::format("{:.17g}", v[size_t(i * t.rank + c)]);
      out << "\n";
    }
  }
  out << "observed " << t.omega.nnz << "\n";
  for (int64_t i = 0; i < t.d; ++i)
    for (int32_t e = t.omega.h_row_ptr[size_t(i)]; e < t.omega.h_row_ptr[size_t(i) + 1]; ++e)
      out << i << " " << t.omega.h_col_idx[size_t(e)] << "\n";
  if (!out) throw std::runtime_error(fmt::format("target file '{}': write failed", path));
}

}  // namespace deeplora::deep_mc
