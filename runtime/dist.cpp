// MPI bootstrap, NCCL communicator, collectives and the bucketed gradient reducer. Every MPI/NCCL
// call sits behind DEEPLORA_HAVE_MPI / DEEPLORA_HAVE_NCCL: a build without them runs a world of one.
#include "runtime/dist.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "runtime/device.h"
#include "runtime/optim.h"
#include "runtime/tape.h"

#ifdef DEEPLORA_HAVE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only; the deprecated C++ bindings warn
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/cuda_check.h"
#ifdef DEEPLORA_HAVE_NCCL
#include <nccl.h>
#endif
#endif

#ifdef DEEPLORA_HAVE_NCCL
#define NCCL_CHECK(call)                                                                         \
  do {                                                                                           \
    ncclResult_t r_ = (call);                                                                    \
    if (r_ != ncclSuccess && r_ != ncclInProgress)                                               \
      ::deeplora::throw_cuda_error(#call, ncclGetErrorString(r_), __FILE__, __LINE__);           \
  } while (0)
#endif

namespace deeplora::dist {
namespace {

struct State {
  Context c;
  bool initialized = false, finalized = false;
  bool owns_mpi = false;  // we called MPI_Init, so we call MPI_Finalize
#ifdef DEEPLORA_HAVE_MPI
  MPI_Op bf16_sum = MPI_OP_NULL;
#endif
#ifdef DEEPLORA_HAVE_NCCL
  ncclComm_t nccl = nullptr;
#endif
};

State& state() {
  static State s;
  return s;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return end && *end == '\0' ? int(x) : fallback;
}

// World size announced by a launcher (OpenMPI's mpirun, Hydra/Slurm PMI, PMIx), 0 if none.
int launcher_world_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"}) {
    int n = env_int(name, 0);
    if (n > 0) return n;
  }
  return std::getenv("PMIX_RANK") ? 1 : 0;  // PMIx without a size variable: MPI tells us the size
}

void scale_cpu(void* p, int64_t n, DType dt, double factor) {
  switch (dt) {
    case DType::f32: {
      float* x = static_cast<float*>(p);
      const float f = float(factor);
      for (int64_t i = 0; i < n; ++i) x[i] *= f;
      break;
    }
    case DType::f64: {
      double* x = static_cast<double*>(p);
      for (int64_t i = 0; i < n; ++i) x[i] *= factor;
      break;
    }
    case DType::bf16: {
      bf16* x = static_cast<bf16*>(p);
      const float f = float(factor);
      for (int64_t i = 0; i < n; ++i) x[i] = bf16(float(x[i]) * f);
      break;
    }
    case DType::i32: throw std::invalid_argument("dist: cannot average an i32 tensor");
  }
}

#ifdef DEEPLORA_HAVE_MPI
// MPI has no bf16: a user op on 16-bit words, each pairwise sum in f32 and rounded back (as NCCL).
void bf16_sum_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const bf16* a = static_cast<const bf16*>(in);
  bf16* b = static_cast<bf16*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = bf16(float(a[i]) + float(b[i]));
}

void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error(fmt::format("{} failed: {}", what, std::string(msg, size_t(len))));
}

void mpi_all_reduce_inplace(void* p, int64_t n, DType dt) {
  State& s = state();
  MPI_Datatype type = MPI_FLOAT;
  MPI_Op op = MPI_SUM;
  switch (dt) {
    case DType::f32: type = MPI_FLOAT; break;
    case DType::f64: type = MPI_DOUBLE; break;
    case DType::i32: type = MPI_INT32_T; break;
    case DType::bf16: type = MPI_UINT16_T; op = s.bf16_sum; break;
  }
  const size_t esz = dtype_size(dt);
  constexpr int64_t kChunk = int64_t(1) << 30;  // MPI counts are int
  for (int64_t off = 0; off < n; off += kChunk) {
    const int cnt = int(std::min(kChunk, n - off));
    mpi_check(MPI_Allreduce(MPI_IN_PLACE, static_cast<char*>(p) + size_t(off) * esz, cnt, type, op, MPI_COMM_WORLD),
              "MPI_Allreduce");
  }
}
#endif

#ifdef DEEPLORA_HAVE_NCCL
ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::f32: return ncclFloat32;
    case DType::bf16: return ncclBfloat16;
    case DType::f64: return ncclFloat64;
    case DType::i32: return ncclInt32;
  }
  return ncclFloat32;
}

// Created on first use by every rank at the same point (the collective ncclCommInitRank).
ncclComm_t nccl_comm() {
  State& s = state();
  if (s.nccl) return s.nccl;
  if (!s.c.mpi) throw std::runtime_error("dist: NCCL needs the MPI bootstrap (launch with mpirun)");
  ncclUniqueId id;
  if (s.c.rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
  mpi_check(MPI_Bcast(&id, int(sizeof id), MPI_BYTE, 0, MPI_COMM_WORLD), "MPI_Bcast of the ncclUniqueId");
  CUDA_CHECK(cudaSetDevice(cuda_ctx().device));
  NCCL_CHECK(ncclCommInitRank(&s.nccl, s.c.world, id, s.c.rank));
  return s.nccl;
}
#endif

[[noreturn]] void no_multi_process(const char* what) {
  throw std::runtime_error(fmt::format(
      "dist: {} needs {} (this build has none); rebuild with it or run a single process", what,
#ifdef DEEPLORA_HAVE_MPI
      "NCCL for CUDA tensors"
#else
      "MPI"
#endif
      ));
}

}  // namespace

const Context& init() {
  State& s = state();
  if (s.initialized) return s.c;
  s.initialized = true;
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);  // NVLink SHARP stays off (see KINDS.md on the GPU hosts)
  const int announced = launcher_world_size();
  if (announced == 0) return s.c;
#ifdef DEEPLORA_HAVE_MPI
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int provided = 0;
    mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    s.owns_mpi = true;
  }
  s.c.mpi = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &s.c.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &s.c.world);
  MPI_Comm local;
  mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, s.c.rank, MPI_INFO_NULL, &local),
            "MPI_Comm_split_type");
  MPI_Comm_rank(local, &s.c.local_rank);
  MPI_Comm_size(local, &s.c.local_size);
  MPI_Comm_free(&local);
  MPI_Op_create(&bf16_sum_op, /*commute=*/1, &s.bf16_sum);
  // One GPU per rank, before anything creates the CUDA context.
  if (const int n = cuda_device_count(); n > 0) select_device(s.c.local_rank % n);
  std::atexit([] { finalize(); });
#else
  if (announced > 1)
    throw std::runtime_error(fmt::format(
        "dist: launched as one of {} processes but this build has no MPI (DEEPLORA_MPI=OFF or MPI not found); "
        "every process would train alone. Rebuild with MPI or run a single process",
        announced));
#endif
  return s.c;
}

const Context& ctx() { return init(); }

void finalize() {
  State& s = state();
  if (!s.initialized || s.finalized) return;
  s.finalized = true;
#ifdef DEEPLORA_HAVE_NCCL
  if (s.nccl) {
    ncclCommDestroy(s.nccl);
    s.nccl = nullptr;
  }
#endif
#ifdef DEEPLORA_HAVE_MPI
  if (s.c.mpi && s.owns_mpi) {
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
      if (s.bf16_sum != MPI_OP_NULL) MPI_Op_free(&s.bf16_sum);
      MPI_Finalize();
    }
  }
#endif
}

void abort_all(int rank, const std::string& msg) {
  std::fflush(stdout);
  std::fprintf(stderr, "rank %d failed: %s\n", rank, msg.c_str());
  std::fflush(stderr);
  State& s = state();
#ifdef DEEPLORA_HAVE_NCCL
  if (s.nccl) ncclCommAbort(s.nccl);  // unblocks our own pending NCCL kernels
  s.nccl = nullptr;
#endif
#ifdef DEEPLORA_HAVE_MPI
  int fin = 0;
  MPI_Finalized(&fin);
  if (s.c.mpi && !fin) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
  (void)s;
  std::_Exit(1);
}

int cuda_device_count() {
#ifdef DEEPLORA_HAVE_CUDA
  if (!cuda_available()) return 0;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

void all_reduce_sum(Tensor& t) {
  const Context& c = ctx();
  if (c.world == 1 || t.numel() == 0) return;
  if (t.is_cuda()) {
#ifdef DEEPLORA_HAVE_NCCL
    NCCL_CHECK(ncclAllReduce(t.data(), t.data(), size_t(t.numel()), nccl_type(t.dtype()), ncclSum, nccl_comm(),
                             cuda_ctx().stream));
    return;
#else
    no_multi_process("all_reduce_sum of a CUDA tensor");
#endif
  }
#ifdef DEEPLORA_HAVE_MPI
  mpi_all_reduce_inplace(t.data(), t.numel(), t.dtype());
#else
  no_multi_process("all_reduce_sum");
#endif
}

double all_reduce_scalar(double v) {
  const Context& c = ctx();
  if (c.world == 1) return v;
#ifdef DEEPLORA_HAVE_MPI
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
  return v;
#else
  no_multi_process("all_reduce_scalar");
#endif
}

void broadcast(Tensor& t, int root) {
  const Context& c = ctx();
  if (c.world == 1 || t.numel() == 0) return;
  if (t.is_cuda()) {
#ifdef DEEPLORA_HAVE_NCCL
    NCCL_CHECK(ncclBroadcast(t.data(), t.data(), t.nbytes(), ncclUint8, root, nccl_comm(), cuda_ctx().stream));
    return;
#else
    no_multi_process("broadcast of a CUDA tensor");
#endif
  }
#ifdef DEEPLORA_HAVE_MPI
  constexpr size_t kChunk = size_t(1) << 30;
  for (size_t off = 0; off < t.nbytes(); off += kChunk)
    mpi_check(MPI_Bcast(static_cast<char*>(t.data()) + off, int(std::min(kChunk, t.nbytes() - off)), MPI_BYTE, root,
                        MPI_COMM_WORLD),
              "MPI_Bcast");
#else
  (void)root;
  no_multi_process("broadcast");
#endif
}

void barrier() {
#ifdef DEEPLORA_HAVE_MPI
  if (ctx().mpi) mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
#endif
}

// ---- GradReducer ------------------------------------------------------------------------------------

struct GradReducer::CudaState {
#ifdef DEEPLORA_HAVE_NCCL
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr, done = nullptr;
  ncclComm_t comm = nullptr;
#endif
};

GradReducer::GradReducer(AdamW& opt, size_t bucket_bytes) {
  check(bucket_bytes > 0, "GradReducer", "bucket size must be > 0 bytes");
  flat_ = opt.flat_grads();
  std::unordered_map<std::string, const TensorImpl*> by_name;
  for (const ParamGroup& g : opt.groups())
    for (const Tensor& p : g.params) by_name[p.name()] = p.impl();
  const auto ranges = opt.grad_ranges();
  for (int b = 0; b < int(flat_.size()); ++b) {
    std::vector<const AdamW::GradRange*> rs;
    for (const auto& r : ranges)
      if (r.buffer == b) rs.push_back(&r);
    std::sort(rs.begin(), rs.end(), [](auto* x, auto* y) { return x->offset < y->offset; });
    const size_t esz = dtype_size(flat_[size_t(b)].dtype());
    Bucket cur;
    cur.buffer = b;
    for (size_t i = 0; i < rs.size(); ++i) {
      cur.params.push_back(by_name.at(rs[i]->name));
      // Up to the next parameter (padding included); the last bucket runs to the buffer's end.
      const int64_t end = i + 1 < rs.size() ? rs[i + 1]->offset : flat_[size_t(b)].numel();
      if (size_t(end - cur.begin) * esz >= bucket_bytes || i + 1 == rs.size()) {
        cur.end = end;
        buckets_.push_back(cur);
        cur = Bucket{};
        cur.buffer = b;
        cur.begin = end;
      }
    }
  }
  if (opt.device() == Device::cuda && ctx().world > 1) {
#ifdef DEEPLORA_HAVE_NCCL
    cuda_ = std::make_unique<CudaState>();
    cuda_->comm = nccl_comm();
    int lo = 0, hi = 0;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    // High priority: a ready bucket's reduction should not queue behind the remaining backward.
    CUDA_CHECK(cudaStreamCreateWithPriority(&cuda_->stream, cudaStreamNonBlocking, hi));
    CUDA_CHECK(cudaEventCreateWithFlags(&cuda_->ready, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&cuda_->done, cudaEventDisableTiming));
#else
    no_multi_process("GradReducer on CUDA");
#endif
  }
}

GradReducer::~GradReducer() {
  if (armed_) tape().set_post_node_hook(nullptr);
#ifdef DEEPLORA_HAVE_NCCL
  if (cuda_) {
    cudaStreamSynchronize(cuda_->stream);
    cudaEventDestroy(cuda_->ready);
    cudaEventDestroy(cuda_->done);
    cudaStreamDestroy(cuda_->stream);
  }
#endif
}

void GradReducer::arm() {
  for (Bucket& b : buckets_) b.launched = false;
  next_ = 0;
  planned_ = false;
  launched_in_backward_ = 0;
  armed_ = true;
  tape().set_post_node_hook([this](size_t index) { on_node(index); });
}

void GradReducer::plan() {
  const Tape& tp = tape();
  for (Bucket& b : buckets_) {
    b.ready_at = INT64_MAX;  // no parameter used in this backward: its gradient is already final
    for (const TensorImpl* p : b.params) {
      const int64_t f = tp.first_use(p);
      if (f >= 0) b.ready_at = std::min(b.ready_at, f);
    }
  }
  // Latest-ready-first as backward runs; ties by index. A function of the tape alone, so every
  // rank launches the same collectives in the same order.
  order_.resize(buckets_.size());
  std::iota(order_.begin(), order_.end(), size_t(0));
  std::stable_sort(order_.begin(), order_.end(),
                   [&](size_t a, size_t b) { return buckets_[a].ready_at > buckets_[b].ready_at; });
  next_ = 0;
  planned_ = true;
}

void GradReducer::on_node(size_t index) {
  if (!planned_) plan();
  while (next_ < order_.size() && buckets_[order_[next_]].ready_at >= int64_t(index)) {
    launch(buckets_[order_[next_++]]);
    ++launched_in_backward_;
  }
}

void GradReducer::launch(Bucket& b) {
  b.launched = true;
  if (observer_) observer_(b);
  const Context& c = ctx();
  if (c.world == 1) return;
  const Tensor& f = flat_[size_t(b.buffer)];
  const DType dt = f.dtype();
  void* p = static_cast<char*>(f.data()) + size_t(b.begin) * dtype_size(dt);
  const int64_t n = b.end - b.begin;
  if (n == 0) return;
  if (f.is_cuda()) {
#ifdef DEEPLORA_HAVE_NCCL
    // The bucket's gradients were written by kernels already queued on the compute stream.
    CUDA_CHECK(cudaEventRecord(cuda_->ready, cuda_ctx().stream));
    CUDA_CHECK(cudaStreamWaitEvent(cuda_->stream, cuda_->ready, 0));
    NCCL_CHECK(ncclAllReduce(p, p, size_t(n), nccl_type(dt), ncclAvg, cuda_->comm, cuda_->stream));
    return;
#else
    no_multi_process("GradReducer on CUDA");
#endif
  }
#ifdef DEEPLORA_HAVE_MPI
  mpi_all_reduce_inplace(p, n, dt);
  scale_cpu(p, n, dt, 1.0 / double(c.world));
#else
  (void)p;
  no_multi_process("GradReducer");
#endif
}

void GradReducer::finish() {
  if (armed_) tape().set_post_node_hook(nullptr);
  armed_ = false;
  if (!planned_) {  // backward never reached the hook (not armed): everything is ready
    order_.resize(buckets_.size());
    std::iota(order_.begin(), order_.end(), size_t(0));
    for (Bucket& b : buckets_) b.launched = false;
    next_ = 0;
  }
  while (next_ < order_.size()) launch(buckets_[order_[next_++]]);
  planned_ = false;
  next_ = 0;
#ifdef DEEPLORA_HAVE_NCCL
  if (cuda_) {
    cudaStream_t compute = cuda_ctx().stream;
    CUDA_CHECK(cudaEventRecord(cuda_->done, cuda_->stream));
    CUDA_CHECK(cudaStreamWaitEvent(compute, cuda_->done, 0));
    // Wait on the host with an eye on NCCL: a dead or stuck peer becomes an exception (the trainer
    // turns it into abort_all) instead of a hang in the next cudaStreamSynchronize.
    const double timeout = double(env_int("DEEPLORA_DIST_TIMEOUT", 600));
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      const cudaError_t e = cudaEventQuery(cuda_->done);
      if (e == cudaSuccess) break;
      if (e != cudaErrorNotReady) CUDA_CHECK(e);
      ncclResult_t async = ncclSuccess;
      NCCL_CHECK(ncclCommGetAsyncError(cuda_->comm, &async));
      if (async != ncclSuccess && async != ncclInProgress)
        throw std::runtime_error(fmt::format("NCCL gradient all-reduce failed: {} ({})", ncclGetErrorString(async),
                                             ncclGetLastError(cuda_->comm)));
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (waited > timeout)
        throw std::runtime_error(fmt::format(
            "NCCL gradient all-reduce did not finish within {:.0f} s (a peer died or hangs); "
            "DEEPLORA_DIST_TIMEOUT sets the limit",
            timeout));
      if (waited < 0.01) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
#endif
}

}  // namespace deeplora::dist
