// The training step over static buffers, eager or captured (see train_step.h).
#include "models/train_step.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

#include "runtime/device.h"
#include "runtime/graph.h"
#include "runtime/ops.h"
#include "runtime/tape.h"

namespace deeplora {

LossRows loss_rows(const Batch& b) {
  LossRows r;
  for (size_t i = 0; i < b.targets.size(); ++i)
    if (b.targets[i] != -100) {
      r.rows.push_back(int32_t(i));
      r.targets.push_back(b.targets[i]);
    }
  return r;
}

int64_t max_loss_rows(const std::vector<Example>& examples, int64_t B, int64_t T) {
  std::vector<int64_t> n;
  for (const Example& e : examples) {
    const int64_t total = std::min<int64_t>(int64_t(e.tokens.size()), T + 1);
    n.push_back(std::clamp<int64_t>(total - std::max<int64_t>(e.n_prompt, 1), 0, T));
  }
  const size_t k = std::min<size_t>(n.size(), size_t(B));
  std::partial_sort(n.begin(), n.begin() + int64_t(k), n.end(), std::greater<>());
  int64_t sum = 0;
  for (size_t i = 0; i < k; ++i) sum += n[i];
  return std::max<int64_t>(sum, 1);
}

TrainStep::TrainStep(CausalLM& model, AdamW& opt, Options o) : model_(model), opt_(opt), o_(std::move(o)) {
  check(o_.batch > 0 && o_.seq_len > 0 && o_.grad_accum > 0 && o_.loss_rows >= 0 && o_.clip >= 0, "TrainStep",
        fmt::format("batch {}, seq_len {} and grad_accum {} must be positive, loss_rows {} and clip {} >= 0", o_.batch,
                    o_.seq_len, o_.grad_accum, o_.loss_rows, o_.clip));
  const Device dev = model_.device();
  for (int64_t m = 0; m < o_.grad_accum; ++m) {
    tokens_.push_back(Tensor::zeros(Shape{o_.batch, o_.seq_len}, DType::i32, dev));
    if (o_.loss_rows > 0) {
      rows_.push_back(Tensor::zeros(Shape{o_.loss_rows}, DType::i32, dev));
      targets_.push_back(Tensor::full(Shape{o_.loss_rows}, -100, DType::i32, dev));
    } else {
      targets_.push_back(Tensor::full(Shape{o_.batch, o_.seq_len}, -100, DType::i32, dev));
    }
  }
  const DType st = model_.compute_dtype() == DType::f64 ? DType::f64 : DType::f32;  // the loss's dtype
  weights_ = Tensor::zeros(Shape{o_.grad_accum}, st, dev);
  losses_ = Tensor::zeros(Shape{o_.grad_accum}, st, dev);
  const bool hooks = bool(o_.before_last_backward) || bool(o_.after_backward);
  graph_ = std::make_unique<StepGraph>([this] { step(); }, dev,
                                       StepGraph::Options{o_.cuda_graph && !hooks && dev == Device::cuda, 1, "training step"});
}

TrainStep::~TrainStep() = default;

bool TrainStep::captured() const { return graph_ && graph_->captured(); }
int64_t TrainStep::graph_nodes() const { return graph_ ? graph_->nodes() : 0; }

void TrainStep::step() {
  ops::TrustedIds trusted;  // run() checked every id on the host: no counting sync per op
  opt_.zero_grad();
  for (int64_t m = 0; m < o_.grad_accum; ++m) {
    LossBatch b(tokens_[size_t(m)], targets_[size_t(m)], o_.loss_rows > 0 ? rows_[size_t(m)] : Tensor());
    Tensor loss = model_.loss(b);
    losses_.slice0(m, m + 1).copy_from(loss.reshape(Shape{1}));
    if (m + 1 == o_.grad_accum && o_.before_last_backward) o_.before_last_backward();
    backward(ops::mul(loss, weights_.slice0(m, m + 1).reshape(Shape{})));
  }
  if (o_.after_backward) o_.after_backward();
  if (o_.reduce_losses) {
    Tensor all = losses_.clone();
    o_.reduce_losses(all);
    opt_.step_on_device(all);
  } else {
    opt_.step_on_device(losses_);
  }
}

// The ids of a micro-batch must index the model's vocabulary (targets may also be -100).
static void check_batch_ids(const Batch& b, size_t m, int64_t V) {
  auto bad = [&](const std::vector<int32_t>& v, bool targets) -> int64_t {
    for (size_t i = 0; i < v.size(); ++i)
      if ((v[i] < 0 || v[i] >= V) && !(targets && v[i] == -100)) return int64_t(i);
    return -1;
  };
  for (bool targets : {false, true}) {
    const std::vector<int32_t>& v = targets ? b.targets : b.inputs;
    if (int64_t i = bad(v, targets); i >= 0)
      throw std::invalid_argument(fmt::format("TrainStep: micro-batch {}: {} id {} at flat index {} is out of range "
                                              "[0, {}) (the model's vocabulary)",
                                              m, targets ? "target" : "input", v[size_t(i)], i, V));
  }
}

void TrainStep::start(const std::vector<Batch>& micro, double lr, const std::vector<double>& weights) {
  check(!started_, "TrainStep::start", "the previous step was not finished (call finish())");
  check(int64_t(micro.size()) == o_.grad_accum, "TrainStep::run",
        fmt::format("{} micro-batches given, grad_accum is {}", micro.size(), o_.grad_accum));
  check(weights.empty() || weights.size() == micro.size(), "TrainStep::run", "one weight per micro-batch");
  const Device dev = model_.device();
  std::vector<double> w = weights.empty() ? std::vector<double>(micro.size(), 1.0 / double(o_.grad_accum)) : weights;
  for (size_t m = 0; m < micro.size(); ++m) {
    const Batch& b = micro[m];
    check(b.B == o_.batch && b.T == o_.seq_len, "TrainStep::run",
          fmt::format("micro-batch {} is {} x {}; the step was built for {} x {}", m, b.B, b.T, o_.batch, o_.seq_len));
    check(b.inputs.size() == size_t(b.B * b.T) && b.targets.size() == b.inputs.size(), "TrainStep::run",
          fmt::format("micro-batch {} holds {} inputs and {} targets for {} x {}", m, b.inputs.size(), b.targets.size(),
                      b.B, b.T));
    check_batch_ids(b, m, model_.vocab_size());
    tokens_[m].copy_from(Tensor::from_ints(b.inputs, Shape{b.B, b.T}));
    if (o_.loss_rows > 0) {
      LossRows r = loss_rows(b);
      check(int64_t(r.rows.size()) <= o_.loss_rows, "TrainStep::run",
            fmt::format("micro-batch {} has more than {} loss positions (loss_rows)", m, o_.loss_rows));
      r.rows.resize(size_t(o_.loss_rows), 0);  // padding rows: ignored targets
      r.targets.resize(size_t(o_.loss_rows), -100);
      rows_[m].copy_from(Tensor::from_ints(r.rows, Shape{o_.loss_rows}));
      targets_[m].copy_from(Tensor::from_ints(r.targets, Shape{o_.loss_rows}));
    } else {
      targets_[m].copy_from(Tensor::from_ints(b.targets, Shape{b.B, b.T}));
    }
  }
  weights_.copy_from(Tensor::from_vector(w, Shape{int64_t(w.size())}, weights_.dtype()));
  opt_.set_step(lr, o_.clip);
  if (graph_failed_) {
    step();
  } else {
    try {
      graph_->run();
    } catch (const std::exception& e) {
      // A step that cannot be captured still trains, eagerly (and says why once).
      if (graph_->captured() || dev != Device::cuda) throw;
      fmt::print(stderr, "warning: the training step runs without a CUDA graph: {}\n", e.what());
      graph_failed_ = true;
      step();
    }
  }
  w_ = std::move(w);
  started_ = true;
}

TrainStep::Result TrainStep::finish() {
  check(started_, "TrainStep::finish", "no step was started");
  started_ = false;
  Result r;
  r.micro_losses = losses_.to_double();  // synchronizes: the step is done
  for (size_t m = 0; m < w_.size(); ++m) r.loss += w_[m] * r.micro_losses[m];
  const AdamW::StepInfo info = opt_.last_step();
  r.norm = info.norm;
  r.grad_scale = info.grad_scale;
  r.skipped = info.skipped;
  return r;
}

}  // namespace deeplora
