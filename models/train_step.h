// One optimizer step of training as a single function over static input buffers: zero the
// gradients, grad_accum forward/backward passes, the global-norm clip and AdamW, with the learning
// rate and step count in device memory (AdamW::set_step) and the norm, clip factor and a skip flag
// (a non-finite loss or norm: nothing is updated) computed on the device. On CUDA it is captured
// into a CUDA graph at its second call and replayed after (runtime/graph.h), so a small-batch step
// costs one launch instead of hundreds; on the CPU, or with the graph off, the same function runs
// eagerly. The host reads the step's losses and norm once per step.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "models/causal_lm.h"
#include "runtime/io/dataloader.h"
#include "runtime/optim.h"

namespace deeplora {

class StepGraph;

class TrainStep {
 public:
  struct Options {
    int64_t batch = 0, seq_len = 0, grad_accum = 1;
    // Example data: at most this many loss positions per micro-batch, padded to it, so that only
    // those rows reach the lm_head (CausalLM::loss_at). 0: dense targets [B, T] (token streams).
    int64_t loss_rows = 0;
    double clip = 1.0;  // global-norm clip (0: off)
    bool cuda_graph = true;
    // Data parallel: called before the last micro-batch's backward and after it (the gradient
    // reducer's arm and finish; tests poison gradients there). With either set, the step runs eagerly.
    std::function<void()> before_last_backward, after_backward;
    // Data parallel: sums the step's micro-batch losses over ranks (in place, on the device) before
    // the non-finite check, so that every rank skips a step together when any rank's loss is bad.
    std::function<void(Tensor&)> reduce_losses;
  };
  struct Result {
    double loss = 0;                  // sum over micro-batches of weight x loss
    std::vector<double> micro_losses;
    double norm = 0, grad_scale = 1;  // before clipping; the clip factor applied
    bool skipped = false;             // a non-finite loss or norm: the weights were not touched
  };

  TrainStep(CausalLM& model, AdamW& opt, Options o);
  ~TrainStep();
  TrainStep(const TrainStep&) = delete;
  TrainStep& operator=(const TrainStep&) = delete;

  // One step on grad_accum micro-batches of B x T (and at most loss_rows loss positions each).
  // weights: each micro-batch loss's weight in the step's loss (empty: 1 / grad_accum each; token
  // counts over their total make the step's loss the token mean of the whole step).
  // Ids are checked on the host against the model's vocabulary (a clear error naming the micro-batch).
  Result run(const std::vector<Batch>& micro, double lr, const std::vector<double>& weights = {}) {
    start(micro, lr, weights);
    return finish();
  }
  // run() in two halves: start() copies the batches in and launches the step (asynchronous on the
  // GPU); finish() waits for it and reads the result. The host may prepare the next batch between.
  void start(const std::vector<Batch>& micro, double lr, const std::vector<double>& weights = {});
  Result finish();
  bool captured() const;
  int64_t graph_nodes() const;  // nodes of the captured step (0 when eager)
  const Options& options() const { return o_; }

 private:
  void step();
  CausalLM& model_;
  AdamW& opt_;
  Options o_;
  std::vector<Tensor> tokens_, targets_, rows_;
  Tensor weights_, losses_;
  std::unique_ptr<StepGraph> graph_;
  bool graph_failed_ = false, started_ = false;
  std::vector<double> w_;
};

// The loss positions of a batch: the flat indices into [B * T] of its targets that are not -100, and
// those targets (empty for a batch without loss tokens).
struct LossRows {
  std::vector<int32_t> rows, targets;
};
LossRows loss_rows(const Batch& b);

// The most loss positions any batch of these examples can hold at B rows of T inputs: the B largest
// completion lengths (capped at T), summed.
int64_t max_loss_rows(const std::vector<Example>& examples, int64_t B, int64_t T);

}  // namespace deeplora
