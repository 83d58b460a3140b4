// bench: kernel microbenchmarks at GPT-2 124M shapes. Each CUDA launcher is timed alone with CUDA events
// (warm-up, then the median of N repetitions) against ceilings measured in the same run.
//
// Counting (stated once here, repeated in the table header):
// - Memory-bound ops: minimal traffic. Each input read once, each output written once, accumulating
//   outputs (backward kernels, beta = 1) read + written; gathered/scattered embedding rows counted once
//   per distinct token. % of the device-to-device copy bandwidth (cudaMemcpyAsync, read + write bytes).
// - GEMMs: 2·M·N·K FLOPs. % of a plain cuBLASLt GEMM (kernels::cuda::gemm, no transposes, beta = 0,
//   no bias) at the same M, N, K, timed in this run; the ceiling column also shows the absolute figure,
//   and the JSON line carries % of the large-GEMM peak (8192³ by default).
// - Causal attention: useful FLOPs only. Forward = 2 GEMMs (QKᵀ, PV) of 2·T²·hd each per head, halved
//   by the causal mask: 2·B·H·T²·hd. Backward = 5 such GEMMs (QKᵀ recomputed, dV, dP, dQ, dK):
//   5·B·H·T²·hd. % of the large-GEMM peak.
// - KV-cache decode attention: the bytes of K and V read once (memory-bound), % of the copy bandwidth.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "runtime/device.h"
#include "runtime/tensor.h"
#include "tools/cli_ranges.h"

#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/attention_cache.h"
#include "kernels/elementwise.h"
#include "kernels/matmul.h"
#include "kernels/nn.h"
#include "kernels/optim.h"
#include "kernels/cuda_check.h"
#include "runtime/optim.h"
#endif

namespace {

struct Options {
  int64_t B = 32, T = 1024, C = 768, V = 50257, H = 12, L = 12;
  int reps = 20, warmup = 3;
  double copy_gib = 2.0;
  int64_t peak_n = 8192;
  std::string only;  // run only ops whose name contains this
  bool json = false;
};

#ifdef DEEPLORA_HAVE_CUDA
using namespace deeplora;
namespace kc = deeplora::kernels::cuda;
using kernels::Gemm;

constexpr DType kBf = DType::bf16, kF32 = DType::f32;
constexpr double kE = 2, kF = 4;  // bytes of bf16, f32 / i32

struct Row {
  std::string op, shape;
  double ms = 0, rate = 0;  // GB/s or TFLOP/s
  bool flops = false;
  double ceiling = 0;       // same unit as rate
  std::string ceiling_name;
  double peak_pct = -1;     // GEMM-like rows: % of the large-GEMM peak
};

class Bench {
 public:
  explicit Bench(Options o) : o_(std::move(o)) {
    for (int i = 0; i < 2 * o_.reps; ++i) {
      cudaEvent_t e;
      CUDA_CHECK(cudaEventCreate(&e));
      ev_.push_back(e);
    }
  }
  ~Bench() {
    for (cudaEvent_t e : ev_) cudaEventDestroy(e);
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

  const Options& opt() const { return o_; }
  cudaStream_t stream() const { return cuda_ctx().stream; }
  bool wanted(const std::string& op) const { return o_.only.empty() || op.find(o_.only) != std::string::npos; }

  // Median of reps, each repetition between its own pair of events on the context's stream.
  double time_ms(const std::function<void()>& f) {
    cudaStream_t s = stream();
    for (int i = 0; i < o_.warmup; ++i) f();
    CUDA_CHECK(cudaStreamSynchronize(s));
    for (int r = 0; r < o_.reps; ++r) {
      CUDA_CHECK(cudaEventRecord(ev_[2 * r], s));
      f();
      CUDA_CHECK(cudaEventRecord(ev_[2 * r + 1], s));
    }
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<float> t(o_.reps);
    for (int r = 0; r < o_.reps; ++r) CUDA_CHECK(cudaEventElapsedTime(&t[r], ev_[2 * r], ev_[2 * r + 1]));
    std::sort(t.begin(), t.end());
    const int n = o_.reps;
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
  }

  void measure_ceilings() {
    {  // device-to-device copy of a ~copy_gib buffer: bytes read + bytes written
      const int64_t n = int64_t(o_.copy_gib * double(int64_t(1) << 30)) / 4;
      Tensor src = Tensor::randn(Shape{n}, 1, kF32, Device::cuda);
      Tensor dst = Tensor::randn(Shape{n}, 2, kF32, Device::cuda);
      const double ms = time_ms([&] {
        CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToDevice, stream()));
      });
      copy_gbs_ = 2.0 * double(src.nbytes()) / ms / 1e6;
      emit(Row{"ceiling copy d2d", fmt::format("{:.2f} GiB", o_.copy_gib), ms, copy_gbs_, false, copy_gbs_, "itself"});
    }
    cuda_ctx().allocator.empty_cache();
    const int64_t p = o_.peak_n;
    peak_tflops_ = plain_gemm_tflops(p, p, p);
    emit(Row{"ceiling gemm bf16", fmt::format("{}x{}x{}", p, p, p), 2.0 * p * p * p / (peak_tflops_ * 1e9),
             peak_tflops_, true, peak_tflops_, "itself", 100.0});
  }

  // A memory-bound op moving `bytes` (minimal traffic).
  void mem(const std::string& op, const std::string& shape, double bytes, const std::function<void()>& f) {
    if (!wanted(op)) return;
    const double ms = time_ms(f);
    emit(Row{op, shape, ms, bytes / ms / 1e6, false, copy_gbs_, "copy"});
  }
  // A GEMM (ceiling: plain GEMM at M, N, K) or attention (ceiling: the large-GEMM peak).
  void flop(const std::string& op, const std::string& shape, double flops, const std::function<void()>& f,
            double ceiling_tflops, const std::string& ceiling_name) {
    if (!wanted(op)) return;
    const double ms = time_ms(f);
    const double tf = flops / ms / 1e9;
    emit(Row{op, shape, ms, tf, true, ceiling_tflops, ceiling_name, 100.0 * tf / peak_tflops_});
  }

  // TFLOP/s of C[M,N] = A[M,K] B[K,N] in bf16, beta = 0, no bias; cached per shape. Uses scratch
  // buffers of its own so the caller's data is never reinterpreted.
  double plain_gemm_tflops(int64_t M, int64_t N, int64_t K) {
    auto key = std::make_tuple(M, N, K);
    if (auto it = plain_.find(key); it != plain_.end()) return it->second;
    Tensor a = Tensor::randn(Shape{M, K}, 11, kBf, Device::cuda);
    Tensor b = Tensor::randn(Shape{K, N}, 12, kBf, Device::cuda, 0.02);
    Tensor c = Tensor::randn(Shape{M, N}, 13, kBf, Device::cuda);
    Gemm g = make_gemm(false, false, M, N, K, a.data(), K, b.data(), N, c.data(), N, 0.0, nullptr);
    const double ms = time_ms([&] { kc::gemm(g, stream()); });
    return plain_[key] = 2.0 * double(M) * double(N) * double(K) / ms / 1e9;
  }

  static Gemm make_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B,
                        int64_t ldb, void* C, int64_t ldc, double beta, const void* bias) {
    Gemm g;
    g.dt = kBf;
    g.ta = ta;
    g.tb = tb;
    g.M = M;
    g.N = N;
    g.K = K;
    g.A = A; g.lda = lda;
    g.B = B; g.ldb = ldb;
    g.C = C; g.ldc = ldc;
    g.beta = beta;
    g.bias = bias;
    return g;
  }

  double peak_tflops() const { return peak_tflops_; }

 private:
  void emit(const Row& r) {
    const char* unit = r.flops ? "TFLOP/s" : "GB/s";
    if (o_.json) {
      fmt::print("{{\"op\":\"{}\",\"shape\":\"{}\",\"ms\":{:.6f},\"{}\":{:.3f},\"ceiling\":\"{}\",\"ceiling_{}\":{:.3f},"
                 "\"pct_ceiling\":{:.2f}",
                 r.op, r.shape, r.ms, r.flops ? "tflops" : "gbs", r.rate, r.ceiling_name, r.flops ? "tflops" : "gbs",
                 r.ceiling, 100.0 * r.rate / r.ceiling);
      if (r.peak_pct >= 0) fmt::print(",\"pct_peak_gemm\":{:.2f}", r.peak_pct);
      fmt::print("}}\n");
    } else {
      if (!header_) {
        fmt::print("{:<26} {:<24} {:>10} {:>16} {:>7}  {}\n", "op", "shape", "ms", "rate", "%ceil", "ceiling");
        header_ = true;
      }
      fmt::print("{:<26} {:<24} {:>10.4f} {:>8.1f} {:<7} {:>6.1f}%  {} {:.0f} {}{}\n", r.op, r.shape, r.ms, r.rate,
                 unit, 100.0 * r.rate / r.ceiling, r.ceiling_name, r.ceiling, unit,
                 r.ceiling_name == "plain gemm" ? fmt::format(" ({:.1f}% of peak)", r.peak_pct) : "");
    }
    std::fflush(stdout);
  }

  Options o_;
  std::vector<cudaEvent_t> ev_;
  double copy_gbs_ = 1, peak_tflops_ = 1;
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> plain_;
  bool header_ = false;
};

std::string shp(std::initializer_list<int64_t> d) {
  std::string s;
  for (int64_t v : d) s += (s.empty() ? "" : "x") + std::to_string(v);
  return s;
}

Tensor rnd(std::initializer_list<int64_t> dims, uint64_t seed, DType dt, double sd = 1.0) {
  return Tensor::randn(Shape(dims), seed, dt, Device::cuda, sd);
}

// Token ids uniform in [0, V) drawn on the host; returns the tensor and the number of distinct ids.
std::pair<Tensor, int64_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, int32_t(V - 1));
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::vector<char> seen(static_cast<size_t>(V), 0);
  int64_t distinct = 0;
  for (auto& x : v) {
    x = d(rng);
    distinct += seen[size_t(x)] ? 0 : 1;
    seen[size_t(x)] = 1;
  }
  return {Tensor::from_ints(v, Shape{n}, Device::cuda), distinct};
}

// GPT-2 parameter shapes (HF names), tied lm_head.
std::vector<std::pair<std::string, Shape>> gpt2_params(const Options& o) {
  const int64_t C = o.C;
  std::vector<std::pair<std::string, Shape>> p = {{"wte", Shape{o.V, C}}, {"wpe", Shape{o.T, C}}};
  for (int64_t l = 0; l < o.L; ++l) {
    const std::string h = fmt::format("h.{}.", l);
    p.insert(p.end(), {{h + "ln_1.weight", Shape{C}}, {h + "ln_1.bias", Shape{C}},
                       {h + "attn.c_attn.weight", Shape{3 * C, C}}, {h + "attn.c_attn.bias", Shape{3 * C}},
                       {h + "attn.c_proj.weight", Shape{C, C}}, {h + "attn.c_proj.bias", Shape{C}},
                       {h + "ln_2.weight", Shape{C}}, {h + "ln_2.bias", Shape{C}},
                       {h + "mlp.c_fc.weight", Shape{4 * C, C}}, {h + "mlp.c_fc.bias", Shape{4 * C}},
                       {h + "mlp.c_proj.weight", Shape{C, 4 * C}}, {h + "mlp.c_proj.bias", Shape{C}}});
  }
  p.insert(p.end(), {{"ln_f.weight", Shape{C}}, {"ln_f.bias", Shape{C}}});
  return p;
}

void bench_activations(Bench& b) {
  const Options& o = b.opt();
  const int64_t B = o.B, T = o.T, C = o.C, V = o.V, R = B * T;
  const double n = double(R * C);
  cudaStream_t s = b.stream();
  const std::string btc = shp({B, T, C});

  {  // embedding: wte rows gathered / scattered once per distinct token
    auto ids = random_ids(R, V, 21);
    Tensor tok = ids.first;
    const int64_t distinct = ids.second;
    Tensor wte = rnd({V, C}, 22, kBf, 0.02), wpe = rnd({T, C}, 23, kBf, 0.02), y = rnd({R, C}, 24, kBf);
    Tensor dy = rnd({R, C}, 25, kBf), dwte = rnd({V, C}, 26, kBf), dwpe = rnd({T, C}, 27, kBf);
    const double rows = double(distinct * C) * kE, pos = double(T * C) * kE;
    b.mem("embedding fwd", btc, R * kF + rows + pos + n * kE,
          [&] { kc::embedding_fwd(kBf, tok.data_as<int32_t>(), wte.data(), wpe.data(), y.data(), B, T, C, s); });
    b.mem("embedding bwd", btc, R * kF + n * kE + 2 * rows + 2 * pos, [&] {
      kc::embedding_bwd(kBf, tok.data_as<int32_t>(), dy.data(), dwte.data(), dwpe.data(), B, T, C, V, s);
    });
  }
  {  // layernorm over C, stats in f32
    Tensor x = rnd({R, C}, 31, kBf), w = rnd({C}, 32, kBf), bb = rnd({C}, 33, kBf), y = rnd({R, C}, 34, kBf);
    Tensor mu = rnd({R}, 35, kF32), rs = Tensor::uniform(Shape{R}, 36, 0.5, 2.0, kF32, Device::cuda);
    Tensor dy = rnd({R, C}, 37, kBf), dx = rnd({R, C}, 38, kBf), dw = rnd({C}, 39, kBf), db = rnd({C}, 40, kBf);
    b.mem("layernorm fwd", btc, 2 * n * kE + 2 * C * kE + 2 * R * kF, [&] {
      kc::layernorm_fwd(kBf, x.data(), w.data(), bb.data(), y.data(), mu.data(), rs.data(), R, C, 1e-5, s);
    });
    b.mem("layernorm bwd (dx accumulate)", btc, 4 * n * kE + 5 * C * kE + 2 * R * kF, [&] {
      kc::layernorm_bwd(kBf, x.data(), w.data(), mu.data(), rs.data(), dy.data(), dx.data(), dw.data(), db.data(), R,
                        C, true, s);
    });
    b.mem("layernorm bwd (dx first write)", btc, 3 * n * kE + 5 * C * kE + 2 * R * kF, [&] {
      kc::layernorm_bwd(kBf, x.data(), w.data(), mu.data(), rs.data(), dy.data(), dx.data(), dw.data(), db.data(), R,
                        C, false, s);
    });
  }
  {  // residual add; its backward is one accumulate per input (y += dy)
    Tensor a = rnd({R, C}, 41, kBf), c = rnd({R, C}, 42, kBf), y = rnd({R, C}, 43, kBf);
    b.mem("add fwd", btc, 3 * n * kE, [&] { kc::add(kBf, a.data(), c.data(), y.data(), R * C, s); });
    b.mem("add bwd (acc)", btc, 3 * n * kE, [&] { kc::acc(kBf, a.data(), y.data(), R * C, 1.0, s); });
    Tensor out = rnd({1}, 44, kBf);
    b.mem("sum", btc, n * kE + kE, [&] { kc::sum(kBf, a.data(), R * C, out.data(), s); });
  }
  {  // GELU on the MLP hidden [R, 4C]
    const int64_t m = R * 4 * C;
    Tensor x = rnd({m}, 51, kBf), y = rnd({m}, 52, kBf), dy = rnd({m}, 53, kBf), dx = rnd({m}, 54, kBf);
    const std::string sh = shp({B, T, 4 * C});
    b.mem("gelu fwd", sh, 2.0 * m * kE, [&] { kc::gelu_fwd(kBf, x.data(), y.data(), m, s); });
    b.mem("gelu bwd (accumulate)", sh, 4.0 * m * kE, [&] { kc::gelu_bwd(kBf, x.data(), dy.data(), dx.data(), m, true, s); });
    b.mem("gelu bwd (first write)", sh, 3.0 * m * kE, [&] { kc::gelu_bwd(kBf, x.data(), dy.data(), dx.data(), m, false, s); });
  }
  {  // softmax cross-entropy over the vocabulary
    Tensor tgt = random_ids(R, V, 61).first;
    Tensor logits = rnd({R, V}, 62, kBf), lse = rnd({R}, 63, kF32), loss = rnd({R}, 64, kF32);
    Tensor dlogits = rnd({R, V}, 65, kBf);
    Tensor dloss = Tensor::full(Shape{1}, 1.0, kF32, Device::cuda), count = Tensor::full(Shape{1}, double(R), kF32, Device::cuda);
    kc::cross_entropy_fwd(kBf, logits.data(), tgt.data_as<int32_t>(), lse.data(), loss.data(), R, V, V, -100, s);
    const double lg = double(R) * double(V) * kE;
    const std::string sh = shp({B, T, V});
    b.mem("cross_entropy fwd", sh, lg + R * kF + 2 * R * kF, [&] {
      kc::cross_entropy_fwd(kBf, logits.data(), tgt.data_as<int32_t>(), lse.data(), loss.data(), R, V, V, -100, s);
    });
    b.mem("cross_entropy bwd (accumulate)", sh, 3 * lg + 2 * R * kF, [&] {
      kc::cross_entropy_bwd(kBf, logits.data(), tgt.data_as<int32_t>(), lse.data(), dloss.data(), count.data(),
                            dlogits.data(), R, V, V, -100, true, s);
    });
    b.mem("cross_entropy bwd (first write)", sh, 2 * lg + 2 * R * kF, [&] {
      kc::cross_entropy_bwd(kBf, logits.data(), tgt.data_as<int32_t>(), lse.data(), dloss.data(), count.data(),
                            dlogits.data(), R, V, V, -100, false, s);
    });
  }
}

void bench_attention(Bench& b) {
  const Options& o = b.opt();
  const int64_t B = o.B, T = o.T, C = o.C, H = o.H, hd = C / H;
  if (!b.wanted("attention fwd") && !b.wanted("attention bwd")) return;
  cudaStream_t s = b.stream();
  Tensor qkv = rnd({B, T, 3 * C}, 71, kBf), out = rnd({B, T, C}, 72, kBf), lse = rnd({B, H, T}, 73, kF32);
  Tensor dout = rnd({B, T, C}, 74, kBf), dqkv = rnd({B, T, 3 * C}, 75, kBf);
  kc::attention_fwd(kBf, qkv.data(), out.data(), lse.data(), B, T, C, H, s);  // consistent out / lse for bwd
  const double unit = double(B) * double(H) * double(T) * double(T) * double(hd);
  const std::string sh = fmt::format("{} H={}", shp({B, T, C}), H);
  b.flop("attention fwd", sh, 2 * unit,
         [&] { kc::attention_fwd(kBf, qkv.data(), out.data(), lse.data(), B, T, C, H, s); }, b.peak_tflops(), "peak gemm");
  b.flop("attention bwd (accumulate)", sh, 5 * unit, [&] {
    kc::attention_bwd(kBf, qkv.data(), out.data(), lse.data(), dout.data(), dqkv.data(), B, T, C, H, true, s);
  }, b.peak_tflops(), "peak gemm");
  b.flop("attention bwd (first write)", sh, 5 * unit, [&] {
    kc::attention_bwd(kBf, qkv.data(), out.data(), lse.data(), dout.data(), dqkv.data(), B, T, C, H, false, s);
  }, b.peak_tflops(), "peak gemm");
}

// KV-cache decode attention: one new token per row over a full cache of Tmax = 1024 positions. Bytes:
// K and V read once (q and out are noise). Calls rotate over enough cache copies (>= 256 MiB in all)
// that K/V come from HBM, not L2, as in a real decode step where every layer's cache is touched once.
void bench_decode(Bench& b) {
  const Options& o = b.opt();
  const int64_t C = o.C, H = o.H, hd = C / H, Tmax = 1024, Tn = 1;
  if (hd % 8 != 0 || hd > 256) return;  // the decode kernel's head sizes
  cudaStream_t s = b.stream();
  for (int64_t B : {int64_t(1), int64_t(16)}) {
    const std::string op = fmt::format("attention_cached B={}", B);
    if (!b.wanted(op)) continue;
    const double kv = 2.0 * double(B * H * Tmax * hd) * kE;
    const int64_t copies = std::max<int64_t>(1, int64_t(std::ceil(double(int64_t(256) << 20) / kv)));
    std::vector<Tensor> caches;
    for (int64_t i = 0; i < 2 * copies; ++i) caches.push_back(rnd({B, H, Tmax, hd}, 200 + uint64_t(i), kBf));
    Tensor qkv = rnd({B, Tn, 3 * C}, 199, kBf), out = rnd({B, Tn, C}, 198, kBf);
    Tensor start = Tensor::from_ints(std::vector<int32_t>(size_t(B), int32_t(Tmax - Tn)), Shape{B}, Device::cuda);
    int64_t next = 0;
    b.mem(op, fmt::format("{} H={} Tmax={}", shp({B, Tn, C}), H, Tmax), kv, [&] {
      const Tensor& kcache = caches[size_t(2 * next)];
      const Tensor& vcache = caches[size_t(2 * next + 1)];
      next = (next + 1) % copies;
      kc::attention_cache_fwd(kBf, qkv.data(), kcache.data(), vcache.data(), start.data_as<int32_t>(), out.data(), B,
                              Tn, C, H, Tmax, s);
    });
    caches.clear();
    cuda_ctx().allocator.empty_cache();
  }
}

// Each GPT-2 linear (PyTorch layout: w [N, K], y = x wᵀ + b) forward and both backward GEMMs, exactly as
// ops::linear issues them, plus the bias gradient (colsum).
void bench_linears(Bench& b) {
  const Options& o = b.opt();
  const int64_t R = o.B * o.T, C = o.C;
  cudaStream_t s = b.stream();
  struct Lin { const char* name; int64_t K, N; bool bias; };
  const Lin lins[] = {{"qkv", C, 3 * C, true}, {"proj", C, C, true}, {"fc", C, 4 * C, true},
                      {"mproj", 4 * C, C, true}, {"lm_head", C, o.V, false},
                      {"lm_head padded", C, (o.V + 63) / 64 * 64, false}};
  for (const Lin& l : lins) {
    const std::string base = std::string("linear ") + l.name;
    if (!b.wanted(base + " fwd") && !b.wanted(base + " bwd dx") && !b.wanted(base + " bwd dw") &&
        !b.wanted(base + " bwd db"))
      continue;
    const int64_t K = l.K, N = l.N;
    Tensor x = rnd({R, K}, 81, kBf), w = rnd({N, K}, 82, kBf, 0.02), bias = rnd({N}, 83, kBf, 0.02);
    Tensor y = rnd({R, N}, 84, kBf), dy = rnd({R, N}, 85, kBf), dx = rnd({R, K}, 86, kBf);
    Tensor dw = rnd({N, K}, 87, kBf), db = rnd({N}, 88, kBf);
    const double f = 2.0 * double(R) * double(N) * double(K);
    auto ceil = [&](int64_t M_, int64_t N_, int64_t K_) {
      return std::make_pair(b.plain_gemm_tflops(M_, N_, K_), std::string("plain gemm"));
    };
    if (b.wanted(base + " fwd")) {
      auto [c, cn] = ceil(R, N, K);
      Gemm g = Bench::make_gemm(false, true, R, N, K, x.data(), K, w.data(), K, y.data(), N, 0.0,
                                l.bias ? bias.data() : nullptr);
      b.flop(base + " fwd", fmt::format("MNK {}x{}x{}", R, N, K), f, [&] { kc::gemm(g, s); }, c, cn);
    }
    if (b.wanted(base + " bwd dx")) {  // dx[R,K] += dy[R,N] w[N,K]
      auto [c, cn] = ceil(R, K, N);
      Gemm g = Bench::make_gemm(false, false, R, K, N, dy.data(), N, w.data(), K, dx.data(), K, 1.0, nullptr);
      b.flop(base + " bwd dx", fmt::format("MNK {}x{}x{}", R, K, N), f, [&] { kc::gemm(g, s); }, c, cn);
    }
    if (b.wanted(base + " bwd dw")) {  // dw[N,K] += dy[R,N]ᵀ x[R,K]
      auto [c, cn] = ceil(N, K, R);
      Gemm g = Bench::make_gemm(true, false, N, K, R, dy.data(), N, x.data(), K, dw.data(), K, 1.0, nullptr);
      b.flop(base + " bwd dw", fmt::format("MNK {}x{}x{}", N, K, R), f, [&] { kc::gemm(g, s); }, c, cn);
    }
    if (l.bias)
      b.mem(base + " bwd db", shp({R, N}), double(R) * double(N) * kE + 2.0 * N * kE,
            [&] { kc::colsum_acc(kBf, dy.data(), R, N, db.data(), s); });
    cuda_ctx().allocator.empty_cache();  // the lm_head buffers are large; keep the footprint flat
  }
}

// Master-weight casts, the fused AdamW step and the gradient-norm reduction over all GPT-2 parameters.
void bench_optimizer(Bench& b) {
  const Options& o = b.opt();
  cudaStream_t s = b.stream();
  auto shapes = gpt2_params(o);
  int64_t n = 0;
  for (auto& [name, sh] : shapes) n += sh.numel();
  const std::string sh = fmt::format("{} params", n);
  {
    Tensor m = rnd({n}, 91, kF32, 0.02), w = rnd({n}, 92, kBf, 0.02);
    b.mem("cast f32->bf16", sh, n * (kF + kE), [&] { kc::cast(kF32, m.data(), kBf, w.data(), n, s); });
    b.mem("cast bf16->f32", sh, n * (kF + kE), [&] { kc::cast(kBf, w.data(), kF32, m.data(), n, s); });
  }
  if (!b.wanted("adamw") && !b.wanted("grad_norm")) return;
  ParamGroup grp;
  grp.name = "all";
  grp.weight_decay = 0.1;
  uint64_t seed = 100;
  for (auto& [name, shape] : shapes) {
    Tensor p = Tensor::randn(shape, seed++, kBf, Device::cuda, 0.02);
    p.set_requires_grad(true).set_name(name);
    grp.params.push_back(p);
  }
  AdamW opt({grp});
  std::vector<Tensor> flat = opt.flat_grads();
  for (const auto& r : opt.grad_ranges()) {
    char* base = static_cast<char*>(flat[size_t(r.buffer)].data()) + r.offset * int64_t(kE);
    kc::rand_normal(kBf, base, r.numel, seed++, 1e-3, s);
  }
  opt.step(1e-4);  // m, v nonzero from here on
  const int64_t np = opt.n_params();
  // grad (bf16) read; master, m, v (f32) read + written; bf16 working copy written.
  b.mem("adamw step", fmt::format("{} params", np), np * (kE + 6 * kF + kE), [&] { opt.step(1e-4); });
  Tensor out = rnd({1}, 99, kF32);
  for (const Tensor& g : flat)
    b.mem("grad_norm sumsq", fmt::format("{} {}", g.numel(), dtype_name(g.dtype())), double(g.nbytes()),
          [&] { kc::sumsq(g.dtype(), g.data(), g.numel(), out.data(), s); });
}

void run_bench(const Options& o) {
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, cuda_ctx().device));
  if (!o.json)
    fmt::print("bench: {} ({} SMs), B={} T={} C={} H={} V={}, median of {} (warm-up {}), bf16 with f32 stats\n"
               "bytes: minimal traffic (inputs read once, outputs written once, accumulated outputs read+written);\n"
               "FLOPs: GEMM 2MNK, causal attention fwd 2*B*H*T^2*hd, bwd 5*B*H*T^2*hd\n",
               prop.name, prop.multiProcessorCount, o.B, o.T, o.C, o.H, o.V, o.reps, o.warmup);
  Bench b(o);
  b.measure_ceilings();
  bench_activations(b);
  bench_attention(b);
  bench_decode(b);
  bench_linears(b);
  bench_optimizer(b);
  cuda_sync();
}
#endif  // DEEPLORA_HAVE_CUDA

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"deeplora bench: CUDA kernel microbenchmarks at GPT-2 124M shapes"};
  app.add_option("-B,--batch", o.B, "sequences per batch")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 16));
  app.add_option("-T,--seq-len", o.T, "tokens per sequence")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--n-embd", o.C, "model width C")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(65536)));
  app.add_option("--n-head", o.H, "attention heads")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1024)));
  app.add_option("--vocab", o.V, "vocabulary size")->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1) << 24));
  app.add_option("--n-layer", o.L, "layers (parameter count of the optimizer rows)")
      ->capture_default_str()->check(CLI::Range(int64_t(1), int64_t(1024)));
  app.add_option("--reps", o.reps, "timed repetitions (median)")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--warmup", o.warmup, "untimed repetitions first")->capture_default_str()->check(CLI::Range(0, 100000));
  app.add_option("--copy-gib", o.copy_gib, "buffer size of the copy-bandwidth ceiling")
      ->capture_default_str()->check(deeplora::cli::positive(64));
  app.add_option("--peak-n", o.peak_n, "M=N=K of the peak-GEMM ceiling")
      ->capture_default_str()->check(CLI::Range(int64_t(16), int64_t(65536)));
  app.add_option("--only", o.only, "run only ops whose name contains this (ceilings always run)");
  app.add_flag("--json", o.json, "one JSON object per row instead of the table");
  CLI11_PARSE(app, argc, argv);
  if (o.C % o.H != 0) {
    fmt::print(stderr, "bench: --n-embd ({}) must be a multiple of --n-head ({})\n", o.C, o.H);
    return 1;
  }
  if (!deeplora::cuda_available()) {
    fmt::print(stderr, "bench: no CUDA device ({})\n", deeplora::cuda_unavailable_reason());
    return 2;
  }
#ifdef DEEPLORA_HAVE_CUDA
  try {
    run_bench(o);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench: error: {}\n", e.what());
    return 1;
  }
  return 0;
#else
  return 2;  // unreachable: cuda_available() is false without CUDA
#endif
}
