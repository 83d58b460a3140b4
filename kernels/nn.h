// Neural-network kernels: embedding, layernorm, softmax cross-entropy. Statistics use stat_dtype().
// Backward launchers accumulate into their (nullable) outputs.
#pragma once
#include "kernels/common.h"

#define DEEPLORA_NN_DECLS                                                                           \
  /* y[b,t,:] = wte[tok[b,t],:] + wpe[t,:]  (wpe may be null). Tokens must be in [0, V). */         \
  void embedding_fwd(DType dt, const int32_t* tok, const void* wte, const void* wpe, void* y,       \
                     int64_t B, int64_t T, int64_t C, cudaStream_t s);                              \
  /* dwte[tok[b,t],:] += dy[b,t,:]; dwpe[t,:] += sum_b dy[b,t,:]  (either may be null) */           \
  void embedding_bwd(DType dt, const int32_t* tok, const void* dy, void* dwte, void* dwpe,          \
                     int64_t B, int64_t T, int64_t C, int64_t V, cudaStream_t s);                   \
  /* Number of ids outside [0, V) that are not equal to `ignore` (synchronous). */                  \
  int64_t count_out_of_range(const int32_t* tok, int64_t n, int64_t V, int64_t ignore, cudaStream_t s); \
  /* y = (x - mean) * rstd * w + b over the last dim C; mean/rstd: [rows] in stat_dtype(dt) */      \
  void layernorm_fwd(DType dt, const void* x, const void* w, const void* b, void* y, void* mean,    \
                     void* rstd, int64_t rows, int64_t C, double eps, cudaStream_t s);              \
  /* dx (+)= the input gradient (+= when dx_accumulate, else = : dx may hold garbage before);       \
     dw += sum over rows of dy * xhat, db += sum of dy. Any of dx, dw, db may be null. */           \
  void layernorm_bwd(DType dt, const void* x, const void* w, const void* mean, const void* rstd,    \
                     const void* dy, void* dx, void* dw, void* db, int64_t rows, int64_t C,         \
                     bool dx_accumulate, cudaStream_t s);                                           \
  /* Per row r: lse[r] = logsumexp(logits[r,:V]); loss[r] = lse[r] - logits[r, tgt[r]], or 0 where\
     tgt[r] == ignore. Row r starts at r*row_stride (>= V: columns past V are padding, ignored). \
     lse, loss in stat_dtype(dt). Targets outside [0,V) other than ignore must have been rejected \
     by the caller. */                                                                              \
  void cross_entropy_fwd(DType dt, const void* logits, const int32_t* tgt, void* lse, void* loss,   \
                         int64_t rows, int64_t V, int64_t row_stride, int32_t ignore, cudaStream_t s); \
  /* dlogits[r,:] += dloss[0] / count[0] * (softmax(logits[r,:]) - onehot(tgt[r])), 0 for ignored  \
     rows; padding columns are not touched. !accumulate: = instead of +=, and ignored rows and      \
     padding columns are written as zeros (dlogits may hold garbage before). dloss has dtype         \
     stat_dtype(dt) (one element); count is f32 / f64 likewise. */                                  \
  void cross_entropy_bwd(DType dt, const void* logits, const int32_t* tgt, const void* lse,         \
                         const void* dloss, const void* count, void* dlogits, int64_t rows,         \
                         int64_t V, int64_t row_stride, int32_t ignore, bool accumulate,            \
                         cudaStream_t s);                                                           \
  /* out[0] = sum(loss) / count, count_out[0] = #(tgt != ignore) (both stat_dtype(dt)) */           \
  void cross_entropy_reduce(DType dt, const void* loss, const int32_t* tgt, int64_t rows,           \
                            int32_t ignore, void* out, void* count_out, cudaStream_t s);

namespace deeplora::kernels::cpu {
DEEPLORA_NN_DECLS
}
namespace deeplora::kernels::cuda {
DEEPLORA_NN_DECLS
}
