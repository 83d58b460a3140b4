// Data parallelism: the MPI bootstrap (rank, world, local rank -> GPU), the NCCL communicator, plain
// collectives, and GradReducer, which all-reduces an optimizer's flat gradients in buckets while
// backward is still running. Without mpirun (or in a build without MPI) the world is one process.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace deeplora {
class AdamW;
}

namespace deeplora::dist {

struct Context {
  int rank = 0, world = 1;
  int local_rank = 0, local_size = 1;  // within this node (MPI_COMM_TYPE_SHARED)
  bool mpi = false;                    // MPI_Init was called here
};

// Idempotent. Under a launcher (OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK in the environment)
// initializes MPI, finds the node-local rank and, where CUDA is available, selects GPU
// local_rank % device_count: call it before anything touches the GPU. Sets NCCL_NVLS_ENABLE=0
// unless the environment sets it. Registers finalize() to run at exit. Otherwise: a world of one.
const Context& init();
const Context& ctx();  // init() if nobody has yet
// NCCL communicator destroyed, MPI_Finalize. Idempotent; runs at exit anyway.
void finalize();
// Prints "rank R failed: msg" to stderr, aborts the NCCL communicator if there is one, then
// MPI_Abort: mpirun tears every rank down within seconds. Without MPI: exits with status 1.
[[noreturn]] void abort_all(int rank, const std::string& msg);

// In-place sum over ranks, every rank gets the result. CUDA tensors: NCCL on the context stream
// (stream-ordered, no host sync). CPU tensors: MPI_Allreduce. f32, bf16 (f32 accumulation per step
// on the CPU), f64, i32. A no-op for a world of one.
void all_reduce_sum(Tensor& t);
double all_reduce_scalar(double v);  // sum over ranks, on the host
void broadcast(Tensor& t, int root = 0);
void barrier();
// GPUs this process can see (0 without CUDA), for tests that need two.
int cuda_device_count();

// Bucketed, overlapped gradient all-reduce of an AdamW's flat gradient buffers (only trainable
// parameters live there: with adapters the traffic is tiny). Buckets are contiguous ranges of the
// flat buffers, cut at parameter boundaries once they hold >= bucket_bytes. A bucket is ready once
// backward has run the first tape node that read each of its parameters (Tape::first_use); its
// all-reduce launches then (CUDA: NCCL on a side stream after an event on the compute stream; CPU:
// MPI_Allreduce at once). Gradients end up averaged over ranks (ncclAvg; a scale pass on the CPU).
//
// Per optimizer step: arm() before the last micro-batch's backward (earlier micro-batches only
// accumulate locally), then finish() before grad_norm()/step(). Every rank must see the same tape
// (same model and shapes), so the buckets launch in the same order everywhere.
class GradReducer {
 public:
  static constexpr size_t kDefaultBucketBytes = size_t(25) << 20;
  GradReducer(AdamW& opt, size_t bucket_bytes = kDefaultBucketBytes);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Installs the post-node hook on this thread's tape for the next backward.
  void arm();
  // Launches every bucket not launched yet, removes the hook and orders the compute stream after
  // the reductions. On CUDA the host waits for them too, polling ncclCommGetAsyncError and giving
  // up after DEEPLORA_DIST_TIMEOUT seconds (default 600): abort_all instead of a silent hang.
  void finish();

  struct Bucket {
    int buffer = 0;
    int64_t begin = 0, end = 0;  // elements of flat_grads()[buffer]
    std::vector<const TensorImpl*> params;
    int64_t ready_at = 0;  // this backward: launch once the node with this index has run
    bool launched = false;
  };
  const std::vector<Bucket>& buckets() const { return buckets_; }
  int64_t n_launched_in_backward() const { return launched_in_backward_; }  // overlap diagnostics
  // Called just before a bucket's all-reduce is launched (tests: its gradients must be final then).
  void set_launch_observer(std::function<void(const Bucket&)> f) { observer_ = std::move(f); }

 private:
  void on_node(size_t index);
  void plan();  // ready_at and launch order from the tape's first_use
  void launch(Bucket& b);

  std::vector<Tensor> flat_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> order_;  // launch order this backward
  size_t next_ = 0;
  bool armed_ = false, planned_ = false;
  int64_t launched_in_backward_ = 0;
  std::function<void(const Bucket&)> observer_;
  struct CudaState;
  std::unique_ptr<CudaState> cuda_;
};

}  // namespace deeplora::dist
