// KV-cache decoding: prefill + token-by-token decode against ops::attention of the full sequence (CPU),
// the row argmax, CUDA vs CPU at shapes that select each kernel path (and inside a CUDA graph), and
// the ops' input checks.
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "kernels/attention_cache.h"
#include "runtime/device.h"
#include "runtime/graph.h"
#include "runtime/ops.h"
#include "runtime/ops_cache.h"
#include "test_util.h"

using namespace deeplora;
using test::contains;
using test::rel_err;

namespace {

// f throws an E whose message names `op` (and holds `part`, when given).
template <class E> void expect_error(const std::function<void()>& f, const std::string& op, const std::string& part = "") {
  std::string msg = "<no error>";
  try {
    f();
  } catch (const E& e) {
    msg = e.what();
  }
  CHECK_MESSAGE(contains(msg, op), msg);
  if (!part.empty()) CHECK_MESSAGE(contains(msg, part), msg);
}

std::vector<double> row_of(const std::vector<double>& v, int64_t row, int64_t len) {
  return {v.begin() + row * len, v.begin() + (row + 1) * len};
}

// Tokens per row of a [B, T, W] host array, as a [B, n, W] tensor: row b's tokens at pos(b, i).
Tensor gather_tokens(const std::vector<double>& src, int64_t T, int64_t W, int64_t B, int64_t n,
                     const std::function<int64_t(int64_t, int64_t)>& pos, DType dt) {
  std::vector<double> v(size_t(B * n * W));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i)
      std::copy_n(src.begin() + (b * T + pos(b, i)) * W, W, v.begin() + (b * n + i) * W);
  return Tensor::from_vector(v, Shape{B, n, W}, dt);
}

// Decoding on the CPU: each row prefilled alone (cache views, start = 0) to its own length, then
// decoded one token per step with every row at its own position, then chunks of Tn > 1 at nonzero
// starts; every output is compared with ops::attention of the full sequence.
void check_cpu_decode(DType dt, double tol) {
  const int64_t B = 3, T = 37, C = 64, H = 4, hd = C / H, Tmax = 64, W = 3 * C;
  // Positions >= T (rows that finish early keep decoding) come from further random tokens.
  Tensor qkv_all = Tensor::randn(Shape{B, Tmax, W}, 4242, DType::f64).to(dt);
  const std::vector<double> all = qkv_all.to_double();
  Tensor qkv = gather_tokens(all, Tmax, W, B, T, [](int64_t, int64_t i) { return i; }, dt);
  const std::vector<double> ref = ops::attention(qkv, H).to_double();
  double worst = 0;
  int n_checked = 0;
  auto compare = [&](const Tensor& out, int64_t b_out, int64_t t_out, int64_t b, int64_t pos) {
    if (pos >= T) return;
    const std::vector<double> o = out.to_double();
    const int64_t Tn = out.dim(1);
    const double e = rel_err(row_of(o, b_out * Tn + t_out, C), row_of(ref, b * T + pos, C));
    worst = std::max(worst, e);
    CHECK_MESSAGE(e <= tol, fmt::format("{} row {} position {}: relative error {:.3g} > {}", dtype_name(dt), b, pos, e, tol));
    ++n_checked;
  };
  auto prefill = [&](Tensor& kc, Tensor& vc, const std::vector<int64_t>& len) {
    for (int64_t b = 0; b < B; ++b) {
      Tensor x = gather_tokens(row_of(all, b, Tmax * W), Tmax, W, 1, len[b], [](int64_t, int64_t i) { return i; }, dt);
      Tensor kb = kc.slice0(b, b + 1), vb = vc.slice0(b, b + 1);
      Tensor s0 = Tensor::from_ints({0}, Shape{1});
      ops::attention_cache_write(x, kb, vb, s0, H);
      Tensor o = ops::attention_cached(x, kb, vb, s0, H);
      for (int64_t t = 0; t < len[b]; ++t) compare(o, 0, t, b, t);
    }
  };

  {  // prefill to different lengths, then one token per step
    Tensor kc = Tensor::full(Shape{B, H, Tmax, hd}, NAN, dt), vc = Tensor::full(Shape{B, H, Tmax, hd}, NAN, dt);
    const std::vector<int64_t> P{4, 13, 29};
    prefill(kc, vc, P);
    for (int64_t k = 0; k + P[0] < T; ++k) {
      std::vector<int32_t> st(B);
      for (int64_t b = 0; b < B; ++b) st[b] = int32_t(P[b] + k);
      Tensor x = gather_tokens(all, Tmax, W, B, 1, [&](int64_t b, int64_t) { return int64_t(st[b]); }, dt);
      Tensor s = Tensor::from_ints(st, Shape{B});
      ops::attention_cache_write(x, kc, vc, s, H);
      Tensor o = ops::attention_cached(x, kc, vc, s, H);
      for (int64_t b = 0; b < B; ++b) compare(o, b, 0, b, st[b]);
    }
  }
  {  // chunks of 5 then 7 tokens at each row's own (nonzero) start
    Tensor kc = Tensor::full(Shape{B, H, Tmax, hd}, NAN, dt), vc = Tensor::full(Shape{B, H, Tmax, hd}, NAN, dt);
    std::vector<int64_t> len{6, 11, 1};
    prefill(kc, vc, len);
    for (int64_t Tn : {5, 7}) {
      std::vector<int32_t> st(len.begin(), len.end());
      Tensor x = gather_tokens(all, Tmax, W, B, Tn, [&](int64_t b, int64_t i) { return len[b] + i; }, dt);
      Tensor s = Tensor::from_ints(st, Shape{B});
      ops::attention_cache_write(x, kc, vc, s, H);
      Tensor o = ops::attention_cached(x, kc, vc, s, H);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < Tn; ++t) compare(o, b, t, b, len[b] + t);
      for (auto& l : len) l += Tn;
    }
  }
  MESSAGE(fmt::format("kv cache decode {}: {} positions checked, worst relative error {:.3g}", dtype_name(dt),
                      n_checked, worst));
}

// Index of the first largest of v[0..n) ignoring NaN (0 when all are NaN).
int32_t first_max(const std::vector<double>& v, int64_t off, int64_t n) {
  int32_t best = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double x = v[size_t(off + i)];
    if (!std::isnan(x) && (best < 0 || x > v[size_t(off + best)])) best = int32_t(i);
  }
  return std::max(best, 0);
}

}  // namespace

TEST_CASE("kv cache: prefill + decode equals full attention on the CPU (f64, f32)") {
  check_cpu_decode(DType::f64, 1e-12);
  check_cpu_decode(DType::f32, 1e-5);
}

TEST_CASE("kv cache: kernel skips positions outside [0, Tmax) on the CPU") {
  // B = 1, H = 2: a write past Tmax of head 0 would land in head 1's first rows.
  const int64_t Tn = 4, C = 16, H = 2, hd = 8, Tmax = 6;
  Tensor qkv = Tensor::randn(Shape{1, Tn, 3 * C}, 7, DType::f64);
  const std::vector<double> q = qkv.to_double();
  for (int32_t s0 : {int32_t(Tmax - 2), -2}) {
    CAPTURE(s0);
    Tensor kc = Tensor::full(Shape{1, H, Tmax, hd}, -7.0, DType::f64), vc = Tensor::full(Shape{1, H, Tmax, hd}, -7.0, DType::f64);
    kernels::cpu::attention_cache_write(DType::f64, qkv.data(), kc.data(), vc.data(), &s0, 1, Tn, C, H, Tmax, nullptr);
    const std::vector<double> k = kc.to_double(), v = vc.to_double();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t p = 0; p < Tmax; ++p)
        for (int64_t d = 0; d < hd; ++d) {
          const int64_t t = p - s0, at = (h * Tmax + p) * hd + d;
          const bool written = t >= 0 && t < Tn;
          CHECK(k[at] == (written ? q[t * 3 * C + C + h * hd + d] : -7.0));
          CHECK(v[at] == (written ? q[t * 3 * C + 2 * C + h * hd + d] : -7.0));
        }
  }
}

TEST_CASE("kv cache: argmax_rows on the CPU (padding, ties, NaN, leading dims)") {
  const int64_t rows = 6, stride = 40, n = 33;
  for (DType dt : {DType::f64, DType::f32, DType::bf16}) {
    CAPTURE(dtype_name(dt));
    std::vector<double> x = Tensor::randn(Shape{rows, stride}, 99, DType::f64).to(dt).to_double();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = n; c < stride; ++c) x[size_t(r * stride + c)] = 100.0 + double(c);  // padding: ignored
    x[size_t(0 * stride + 5)] = x[size_t(0 * stride + 20)] = 50.0;                       // tie: 5
    x[size_t(1 * stride + 0)] = x[size_t(1 * stride + 9)] = NAN;
    x[size_t(1 * stride + 12)] = 60.0;                                                    // NaN skipped: 12
    for (int64_t c = 0; c < n; ++c) x[size_t(2 * stride + c)] = NAN;                      // all NaN: 0
    for (int64_t c = 0; c < n; ++c) x[size_t(3 * stride + c)] = -INFINITY;                // all -inf: 0
    x[size_t(4 * stride + n - 1)] = 70.0;                                                 // last valid column
    Tensor xt = Tensor::from_vector(x, Shape{2, 3, stride}, dt);                          // leading dims flattened
    const std::vector<int32_t> got = ops::argmax_rows(xt, n).to_int();
    REQUIRE(got.size() == size_t(rows));
    CHECK(got[0] == 5);
    CHECK(got[1] == 12);
    CHECK(got[2] == 0);
    CHECK(got[3] == 0);
    CHECK(got[4] == n - 1);
    for (int64_t r = 0; r < rows; ++r) {
      CHECK(got[size_t(r)] == first_max(x, r * stride, n));
      if (r == 0 || r >= 4) {  // rows without NaN: as std::max_element
        auto b = x.begin() + r * stride;
        CHECK(got[size_t(r)] == int32_t(std::max_element(b, b + n) - b));
      }
    }
    // n_valid = 0: every column (the padding wins).
    const std::vector<int32_t> all = ops::argmax_rows(xt).to_int();
    for (int64_t r = 0; r < rows; ++r) CHECK(all[size_t(r)] == stride - 1);
  }
}

TEST_CASE("kv cache: bad inputs name the op and the shapes") {
  const DType f = DType::f32;
  const int64_t B = 2, Tn = 3, C = 32, H = 2, hd = 16, Tmax = 10;
  Tensor qkv = Tensor::randn(Shape{B, Tn, 3 * C}, 1, f);
  Tensor kc = Tensor::zeros(Shape{B, H, Tmax, hd}, f), vc = Tensor::zeros(Shape{B, H, Tmax, hd}, f);
  Tensor st = Tensor::from_ints({0, 4}, Shape{B});
  using IA = std::invalid_argument;
  const std::string at = "attention_cached", aw = "attention_cache_write";
  // Sanity: the good call works.
  ops::attention_cache_write(qkv, kc, vc, st, H);
  CHECK(ops::attention_cached(qkv, kc, vc, st, H).shape() == Shape{B, Tn, C});

  expect_error<IA>([&] { ops::attention_cached(qkv.reshape(Shape{B * Tn, 3 * C}), kc, vc, st, H); }, at, "[B, Tn, 3C]");
  expect_error<IA>([&] { ops::attention_cached(Tensor::zeros(Shape{B, Tn, 95}, f), kc, vc, st, H); }, at, "[B, Tn, 3C]");
  expect_error<IA>([&] { ops::attention_cached(qkv, kc, vc, st, 3); }, at, "n_head 3 must divide");
  expect_error<IA>([&] { ops::attention_cache_write(qkv, kc, vc, st, 0); }, aw, "n_head 0");
  {  // head sizes the CUDA kernel cannot take are refused on every device
    Tensor q12 = Tensor::zeros(Shape{1, 1, 3 * 36}, f), c12 = Tensor::zeros(Shape{1, 3, 4, 12}, f);
    expect_error<IA>([&] { ops::attention_cached(q12, c12, c12, Tensor::from_ints({0}, Shape{1}), 3); }, at,
                     "multiple of 8");
    Tensor q512 = Tensor::zeros(Shape{1, 1, 3 * 512}, f), c512 = Tensor::zeros(Shape{1, 1, 4, 512}, f);
    expect_error<IA>([&] { ops::attention_cached(q512, c512, c512, Tensor::from_ints({0}, Shape{1}), 1); }, at,
                     "at most 256");
  }
  Tensor bad_hd = Tensor::zeros(Shape{B, H, Tmax, hd + 8}, f), bad_b = Tensor::zeros(Shape{B + 1, H, Tmax, hd}, f);
  Tensor bad_h = Tensor::zeros(Shape{B, H + 1, Tmax, hd}, f), v_other = Tensor::zeros(Shape{B, H, Tmax + 1, hd}, f);
  expect_error<IA>([&] { ops::attention_cached(qkv, bad_hd, bad_hd, st, H); }, at, "hd=16");
  expect_error<IA>([&] { ops::attention_cache_write(qkv, bad_b, bad_b, st, H); }, aw, "B=2");
  expect_error<IA>([&] { ops::attention_cached(qkv, bad_h, bad_h, st, H); }, at, "n_head=2");
  expect_error<IA>([&] { ops::attention_cached(qkv, kc, v_other, st, H); }, at, "differ in shape");
  Tensor kc64 = Tensor::zeros(Shape{B, H, Tmax, hd}, DType::f64);
  expect_error<IA>([&] { ops::attention_cached(qkv, kc64, kc64, st, H); }, at, "dtype and device");
  expect_error<IA>([&] { ops::attention_cache_write(qkv, kc, kc, st, H); }, aw, "share memory");
  // start: dtype, length, positions outside the cache (checked on the host for a CPU start).
  expect_error<IA>([&] { ops::attention_cached(qkv, kc, vc, Tensor::zeros(Shape{B}, f), H); }, at, "i32 [B=2]");
  expect_error<IA>([&] { ops::attention_cached(qkv, kc, vc, Tensor::from_ints({0, 0, 0}, Shape{3}), H); }, at,
                   "i32 [B=2]");
  expect_error<IA>([&] { ops::attention_cache_write(qkv, kc, vc, Tensor::from_ints({0, 8}, Shape{B}), H); }, aw,
                   "row 1: positions 8 .. 10");
  expect_error<IA>([&] { ops::attention_cached(qkv, kc, vc, Tensor::from_ints({-1, 0}, Shape{B}), H); }, at, "row 0");
  // Inference only: grad mode on and an input that requires grad is a logic error; NoGrad is fine.
  Tensor qg = qkv.clone();
  qg.set_requires_grad(true);
  expect_error<std::logic_error>([&] { ops::attention_cached(qg, kc, vc, st, H); }, at, "NoGrad");
  expect_error<std::logic_error>([&] { ops::attention_cache_write(qg, kc, vc, st, H); }, aw, "NoGrad");
  {
    NoGrad ng;
    ops::attention_cache_write(qg, kc, vc, st, H);
    CHECK(ops::attention_cached(qg, kc, vc, st, H).shape() == Shape{B, Tn, C});
  }
  // argmax_rows
  Tensor x = Tensor::randn(Shape{3, 8}, 2, f);
  expect_error<IA>([&] { ops::argmax_rows(x, 9); }, "argmax_rows", "n_valid 9");
  expect_error<IA>([&] { ops::argmax_rows(x, -1); }, "argmax_rows", "n_valid -1");
  expect_error<IA>([&] { ops::argmax_rows(Tensor::from_ints({1, 2}, Shape{2})); }, "argmax_rows", "float");
  if (cuda_available()) {  // start on another device than the tensors
    Tensor sd = st.to(Device::cuda);
    expect_error<IA>([&] { ops::attention_cached(qkv, kc, vc, sd, H); }, at, "device");
    Tensor qd = qkv.to(Device::cuda), kd = kc.to(Device::cuda), vd = vc.to(Device::cuda);
    expect_error<IA>([&] { ops::attention_cache_write(qd, kd, vd, st, H); }, aw, "device");
    expect_error<IA>([&] { ops::attention_cached(qd, kc, vc, sd, H); }, at, "dtype and device");
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA vs CPU

namespace {

struct DecCase {
  std::string name;
  int64_t B, Tn, C, H, Tmax;
  std::vector<int32_t> start;
};

// Shapes per code path: head sizes 32/64/80/128/256 (lanes per row 2..32, one, two and four packs per
// lane), Tn 1 (one query per block) and > 1 (tiles of 4, a partial last tile), one split (Tmax below
// one stage, or enough rows for every SM) and many, blocks of more stages than the pipeline holds
// (its slots wrap), positions short and past 1024, starts off every tile.
std::vector<DecCase> dec_cases() {
  std::vector<int32_t> s16{0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 290, 299, 17};
  std::vector<int32_t> l16{0, 1, 7, 63, 64, 65, 127, 300, 511, 777, 1000, 1025, 1031, 1090, 1095, 3};
  return {
      {"hd=64 B=1 Tn=1 long", 1, 1, 768, 12, 2048, {1500}},
      {"hd=64 B=16 Tn=1 short", 16, 1, 128, 2, 300, s16},
      {"hd=128 B=16 Tn=5 long", 16, 5, 256, 2, 1100, l16},
      {"hd=128 B=1 Tn=5", 1, 5, 128, 1, 2000, {1337}},
      {"hd=32 Tn=16", 3, 16, 96, 3, 200, {0, 50, 184}},
      {"hd=80 Tn=3", 2, 3, 160, 2, 500, {0, 421}},
      {"hd=256 Tn=2", 2, 2, 512, 2, 300, {5, 260}},
      {"one split, Tn=3", 4, 3, 128, 2, 30, {0, 9, 27, 14}},
      {"one split, many stages (B=24)", 24, 1, 768, 12, 200,
       {0, 1, 5, 31, 32, 33, 63, 64, 65, 97, 120, 128, 150, 160, 170, 180, 190, 195, 196, 197, 198, 199, 77, 3}},
  };
}

double tol_of(DType dt) { return dt == DType::f64 ? 1e-12 : dt == DType::f32 ? 1e-5 : 1e-2; }

// Equal element by element, NaN equal to NaN.
bool same(const std::vector<double>& a, const std::vector<double>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(),
                    [](double x, double y) { return x == y || (std::isnan(x) && std::isnan(y)); });
}

}  // namespace

TEST_CASE("kv cache: CUDA vs CPU cache write and cached attention (f64, f32, bf16)") {
  if (!cuda_available()) {
    MESSAGE("skipped the CUDA kv-cache checks: " << cuda_unavailable_reason());
    return;
  }
  int n = 0;
  for (DType dt : {DType::f32, DType::bf16, DType::f64})
    for (const DecCase& c : dec_cases()) {
      CAPTURE(c.name);
      CAPTURE(dtype_name(dt));
      const int64_t hd = c.C / c.H;
      const uint64_t seed = std::hash<std::string>{}(c.name) % 10000 + 3;
      Tensor qkv = Tensor::randn(Shape{c.B, c.Tn, 3 * c.C}, seed, DType::f64).to(dt);
      // Earlier positions hold random keys/values; those past the new tokens are NaN (never written):
      // the kernel reads some of them (whole stages, speculative copies) and must mask them out.
      auto cache = [&](uint64_t sd) {
        std::vector<double> v = Tensor::randn(Shape{c.B, c.H, c.Tmax, hd}, sd, DType::f64).to_double();
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t p = c.start[size_t(b)] + c.Tn; p < c.Tmax; ++p)
            for (int64_t h = 0; h < c.H; ++h)
              std::fill_n(v.begin() + ((b * c.H + h) * c.Tmax + p) * hd, hd, NAN);
        return Tensor::from_vector(v, Shape{c.B, c.H, c.Tmax, hd}, dt);
      };
      Tensor kc = cache(seed + 1), vc = cache(seed + 2);
      Tensor st = Tensor::from_ints(c.start, Shape{c.B});
      Tensor qd = qkv.to(Device::cuda), kd = kc.to(Device::cuda), vd = vc.to(Device::cuda), sd = st.to(Device::cuda);
      ops::attention_cache_write(qkv, kc, vc, st, c.H);
      ops::attention_cache_write(qd, kd, vd, sd, c.H);
      CHECK(same(kd.to_double(), kc.to_double()));
      CHECK(same(vd.to_double(), vc.to_double()));
      const std::vector<double> ref = ops::attention_cached(qkv, kc, vc, st, c.H).to_double();
      const std::vector<double> got = ops::attention_cached(qd, kd, vd, sd, c.H).to_double();
      const double e = rel_err(got, ref);
      CHECK_MESSAGE(e <= tol_of(dt), fmt::format("{} {}: relative error {:.3g} > {}", c.name, dtype_name(dt), e, tol_of(dt)));
      ++n;
    }
  MESSAGE(fmt::format("kv cache: {} CUDA-vs-CPU cases checked", n));
}

TEST_CASE("kv cache: CUDA kernels at positions outside [0, Tmax), unaligned qkv, misaligned caches") {
  if (!cuda_available()) {
    MESSAGE("skipped the CUDA kv-cache edge checks: " << cuda_unavailable_reason());
    return;
  }
#ifdef DEEPLORA_HAVE_CUDA
  const int64_t B = 3, Tn = 4, C = 128, H = 2, hd = 64, Tmax = 70;
  for (DType dt : {DType::f32, DType::bf16}) {
    CAPTURE(dtype_name(dt));
    const size_t es = dtype_size(dt);
    // One spare element in front: qkv at an odd element offset takes the write's scalar path.
    Tensor qbuf = Tensor::randn(Shape{B * Tn * 3 * C + 1}, 11, DType::f64).to(dt);
    Tensor kc = Tensor::full(Shape{B, H, Tmax, hd}, -3.0, dt), vc = Tensor::full(Shape{B, H, Tmax, hd}, -3.0, dt);
    Tensor kc2 = Tensor::randn(Shape{B, H, Tmax, hd}, 12, DType::f64).to(dt);
    Tensor vc2 = Tensor::randn(Shape{B, H, Tmax, hd}, 13, DType::f64).to(dt);
    // Past the end (only two rows land), before the start (the last two land), in range.
    const std::vector<int32_t> start{int32_t(Tmax - 2), -2, 33};
    Tensor st = Tensor::from_ints(start, Shape{B});
    Tensor qd = qbuf.to(Device::cuda), kd = kc.to(Device::cuda), vd = vc.to(Device::cuda), sd = st.to(Device::cuda);
    Tensor kd2 = kc2.to(Device::cuda), vd2 = vc2.to(Device::cuda);
    for (size_t off : {size_t(0), es}) {
      CAPTURE(off);
      const void* qh = static_cast<const char*>(qbuf.data()) + off;
      const void* qg = static_cast<const char*>(qd.data()) + off;
      kernels::cpu::attention_cache_write(dt, qh, kc.data(), vc.data(), start.data(), B, Tn, C, H, Tmax, nullptr);
      kernels::cuda::attention_cache_write(dt, qg, kd.data(), vd.data(), sd.data_as<int32_t>(), B, Tn, C, H, Tmax,
                                           cuda_ctx().stream);
      CHECK(kd.to_double() == kc.to_double());
      CHECK(vd.to_double() == vc.to_double());
      // Attention: p >= Tmax attends over the whole cache, p < 0 gives zeros.
      Tensor oh = Tensor::empty(Shape{B, Tn, C}, dt), od = Tensor::empty(Shape{B, Tn, C}, dt, Device::cuda);
      kernels::cpu::attention_cache_fwd(dt, qh, kc2.data(), vc2.data(), start.data(), oh.data(), B, Tn, C, H, Tmax,
                                        nullptr);
      kernels::cuda::attention_cache_fwd(dt, qg, kd2.data(), vd2.data(), sd.data_as<int32_t>(), od.data(), B, Tn, C, H,
                                         Tmax, cuda_ctx().stream);
      const std::vector<double> ref = oh.to_double(), got = od.to_double();
      CHECK(rel_err(got, ref) <= tol_of(dt));
      for (int64_t t = 0; t < 2; ++t)
        for (int64_t c = 0; c < C; ++c) CHECK(got[size_t((1 * Tn + t) * C + c)] == 0.0);
    }
    CHECK_THROWS_AS(kernels::cuda::attention_cache_fwd(dt, qd.data(), static_cast<char*>(kd2.data()) + es, vd2.data(),
                                                       sd.data_as<int32_t>(), qd.data(), 1, 1, C, H, Tmax - 1,
                                                       cuda_ctx().stream),
                    std::invalid_argument);
  }
#endif
}

TEST_CASE("kv cache: a captured decode step (CUDA graph) serves every position") {
  if (!cuda_available()) {
    MESSAGE("skipped the CUDA-graph decode check: " << cuda_unavailable_reason());
    return;
  }
  NoGrad ng;
  const int64_t B = 2, C = 256, H = 4, hd = 64, Tmax = 1500, V = 300;
  const DType dt = DType::bf16;
  Tensor kc = Tensor::randn(Shape{B, H, Tmax, hd}, 21, DType::f64).to(dt), vc = Tensor::randn(Shape{B, H, Tmax, hd}, 22, DType::f64).to(dt);
  Tensor kd = kc.to(Device::cuda), vd = vc.to(Device::cuda);
  Tensor qd = Tensor::zeros(Shape{B, 1, 3 * C}, dt, Device::cuda), sd = Tensor::from_ints({0, 0}, Shape{B}, Device::cuda);
  Tensor od = Tensor::zeros(Shape{B, 1, C}, dt, Device::cuda), ids = Tensor::from_ints({0, 0}, Shape{B}, Device::cuda);
  Tensor logits = Tensor::zeros(Shape{B, V + 4}, dt, Device::cuda);
  StepGraph g(
      [&] {
        ops::attention_cache_write(qd, kd, vd, sd, H);
        od.copy_from(ops::attention_cached(qd, kd, vd, sd, H));
        ids.copy_from(ops::argmax_rows(logits, V));
      },
      Device::cuda, StepGraph::Options{true, 1, "decode step"});
  const std::vector<std::vector<int32_t>> starts{{3, 700}, {4, 1100}, {1200, 5}, {63, 1499}};
  for (size_t k = 0; k < starts.size(); ++k) {
    CAPTURE(k);
    Tensor qh = Tensor::randn(Shape{B, 1, 3 * C}, 30 + k, DType::f64).to(dt), st = Tensor::from_ints(starts[k], Shape{B});
    Tensor lg = Tensor::randn(Shape{B, V + 4}, 40 + k, DType::f64).to(dt);
    qd.copy_from(qh);
    sd.copy_from(st);
    logits.copy_from(lg);
    g.run();
    ops::attention_cache_write(qh, kc, vc, st, H);
    const std::vector<double> ref = ops::attention_cached(qh, kc, vc, st, H).to_double();
    CHECK(rel_err(od.to_double(), ref) <= 1e-2);
    CHECK(ids.to_int() == ops::argmax_rows(lg, V).to_int());
    CHECK(kd.to_double() == kc.to_double());
  }
  CHECK(g.captured());
  CHECK(g.replays() == int64_t(starts.size()) - 1);
}

TEST_CASE("kv cache: CUDA vs CPU argmax_rows (GPT-2 padded vocabulary, odd strides, NaN)") {
  if (!cuda_available()) {
    MESSAGE("skipped the CUDA argmax checks: " << cuda_unavailable_reason());
    return;
  }
  struct A { int64_t rows, stride, n; };
  for (DType dt : {DType::bf16, DType::f32, DType::f64})
    for (const A& a : {A{7, 50304, 50257}, A{3, 1001, 999}, A{64, 50304, 50257}}) {
      CAPTURE(dtype_name(dt));
      CAPTURE(a.stride);
      std::vector<double> x = Tensor::randn(Shape{a.rows, a.stride}, uint64_t(a.stride + a.rows), DType::f64, Device::cpu, 3.0).to(dt).to_double();
      for (int64_t r = 0; r < a.rows; ++r)
        for (int64_t c = a.n; c < a.stride; ++c) x[size_t(r * a.stride + c)] = 1e4;  // padding: ignored
      x[size_t(100)] = x[size_t(a.n - 5)] = 64.0;                                     // tie in row 0
      for (int64_t c = 0; c < a.n; c += 3) x[size_t(a.stride + c)] = NAN;               // row 1 partly NaN
      for (int64_t c = 0; c < a.n; ++c) x[size_t(2 * a.stride + c)] = NAN;              // row 2 all NaN
      Tensor xh = Tensor::from_vector(x, Shape{a.rows, a.stride}, dt);
      const std::vector<int32_t> ref = ops::argmax_rows(xh, a.n).to_int();
      const std::vector<int32_t> got = ops::argmax_rows(xh.to(Device::cuda), a.n).to_int();
      CHECK(got == ref);
      CHECK(ref[0] == 100);
      CHECK(ref[2] == 0);
      for (int64_t r = 0; r < a.rows; ++r) CHECK(ref[size_t(r)] == first_max(x, r * a.stride, a.n));
    }
}
