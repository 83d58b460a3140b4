// Differentiable layout ops (copies, since tensors are always contiguous): transpose of the last two
// dims, concat along the last dim, last-dim slice and split. Any dtype forward; gradients for floats.
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/tape.h"
#include "runtime/tensor.h"

namespace deeplora::ops {

// x [..., R, C] (2-D, 3-D or 4-D) -> [..., C, R].
Tensor transpose(const Tensor& x);
// Tensors of one dtype and device with equal leading dims, [..., C_i] -> [..., sum C_i]. At least one
// input; sizes of 0 are allowed.
Tensor concat(const std::vector<Tensor>& xs);
// x[..., begin:end), 0 <= begin <= end <= x.dim(-1).
Tensor slice_last(const Tensor& x, int64_t begin, int64_t end);
// Consecutive last-dim pieces of the given sizes (summing to x.dim(-1)); one tape node for all, so
// the input's gradient is written once, with zeros where a piece got no gradient.
std::vector<Tensor> split_last(const Tensor& x, const std::vector<int64_t>& sizes);

}  // namespace deeplora::ops
