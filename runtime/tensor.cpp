// Tensor creation, copies, views and host conversion.
#include "runtime/tensor.h"

#include <fmt/format.h>

#include <stdexcept>

#include "runtime/dispatch.h"
#include "kernels/elementwise.h"
#include "runtime/device.h"
#ifdef DEEPLORA_HAVE_CUDA
#include "kernels/cuda_check.h"
#endif

namespace deeplora {

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }


void check(bool cond, const char* op, const std::string& msg) {
  if (!cond) throw std::invalid_argument(fmt::format("{}: {}", op, msg));
}

Shape::Shape(std::initializer_list<int64_t> dims) {
  if (dims.size() > 4) throw std::invalid_argument("Shape: at most 4 dimensions");
  for (int64_t v : dims) d[ndim++] = v;
}

Shape Shape::of(const std::vector<int64_t>& dims) {
  if (dims.size() > 4) throw std::invalid_argument(fmt::format("Shape: {} dimensions, at most 4", dims.size()));
  Shape s;
  for (int64_t v : dims) s.d[s.ndim++] = v;
  return s;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= d[i];
  return n;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim != o.ndim) return false;
  for (int i = 0; i < ndim; ++i)
    if (d[i] != o.d[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < ndim; ++i) s += fmt::format("{}{}", i ? ", " : "", d[i]);
  return s + "]";
}

Storage::Storage(size_t nbytes, Device dev) : bytes(nbytes), device(dev) {
  size_t n = nbytes ? nbytes : 1;
  ptr = dev == Device::cpu ? cpu_alloc(n) : cuda_ctx().allocator.allocate(n);
}

Storage::Storage(void* p, size_t nbytes, Device dev) : ptr(p), bytes(nbytes), device(dev), external(true) {}

Storage::~Storage() {
  if (external || !ptr) return;
  if (device == Device::cpu) cpu_free(ptr);
#ifdef DEEPLORA_HAVE_CUDA
  else cuda_ctx().allocator.deallocate(ptr);
#endif
}

static void check_shape(const Shape& s, const char* op) {
  for (int i = 0; i < s.ndim; ++i)
    check(s.d[i] >= 0, op, fmt::format("negative dimension in shape {}", s.str()));
}

Tensor Tensor::empty(const Shape& s, DType dt, Device dev) {
  check_shape(s, "Tensor::empty");
  if (dev == Device::cuda && !cuda_available())
    throw std::runtime_error("Tensor::empty: CUDA tensor requested but " + cuda_unavailable_reason());
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(size_t(s.numel()) * dtype_size(dt), dev);
  impl->shape = s;
  impl->dtype = dt;
  impl->device = dev;
  return Tensor(impl);
}

Tensor Tensor::zeros(const Shape& s, DType dt, Device dev) { return full(s, 0.0, dt, dev); }

Tensor Tensor::full(const Shape& s, double v, DType dt, Device dev) {
  Tensor t = empty(s, dt, dev);
  t.fill(v);
  return t;
}

Tensor Tensor::randn(const Shape& s, uint64_t seed, DType dt, Device dev, double stddev) {
  check(is_float(dt), "Tensor::randn", "needs a float dtype");
  Tensor t = empty(s, dt, dev);
  DEEPLORA_DISPATCH(dev, rand_normal, dt, t.data(), t.numel(), seed, stddev, stream_for(dev));
  return t;
}

Tensor Tensor::uniform(const Shape& s, uint64_t seed, double lo, double hi, DType dt, Device dev) {
  check(is_float(dt), "Tensor::uniform", "needs a float dtype");
  Tensor t = empty(s, dt, dev);
  DEEPLORA_DISPATCH(dev, rand_uniform, dt, t.data(), t.numel(), seed, lo, hi, stream_for(dev));
  return t;
}

Tensor Tensor::from_vector(const std::vector<double>& v, const Shape& s, DType dt, Device dev) {
  check(int64_t(v.size()) == s.numel(), "Tensor::from_vector",
        fmt::format("{} values for shape {}", v.size(), s.str()));
  Tensor h = empty(s, DType::f64, Device::cpu);
  std::memcpy(h.data(), v.data(), v.size() * sizeof(double));
  if (dt == DType::f64 && dev == Device::cpu) return h;
  Tensor out = empty(s, dt, dev);
  out.copy_from(h);
  return out;
}

Tensor Tensor::from_ints(const std::vector<int32_t>& v, const Shape& s, Device dev) {
  check(int64_t(v.size()) == s.numel(), "Tensor::from_ints",
        fmt::format("{} values for shape {}", v.size(), s.str()));
  Tensor h = empty(s, DType::i32, Device::cpu);
  std::memcpy(h.data(), v.data(), v.size() * sizeof(int32_t));
  return dev == Device::cpu ? h : h.to(dev);
}

std::string Tensor::desc() const {
  if (!defined()) return "<undefined tensor>";
  return fmt::format("{}{}{} {}", name().empty() ? "" : name(), name().empty() ? "" : " ",
                     dtype_name(dtype()), shape().str()) + (is_cuda() ? " cuda" : " cpu");
}

Tensor& Tensor::set_requires_grad(bool r) {
  check(!r || is_float(dtype()), "set_requires_grad", fmt::format("{} is not a float tensor", desc()));
  impl_->requires_grad = r;
  return *this;
}

Tensor Tensor::to(Device dev) const {
  if (dev == device()) return *this;
  Tensor out = empty(shape(), dtype(), dev);
  out.copy_from(*this);
  return out;
}

Tensor Tensor::to(DType dt) const {
  if (dt == dtype()) return *this;
  Tensor out = empty(shape(), dt, device());
  out.copy_from(*this);
  return out;
}

Tensor Tensor::clone() const {
  Tensor out = empty(shape(), dtype(), device());
  out.copy_from(*this);
  return out;
}

Tensor Tensor::reshape(const Shape& s) const {
  check(s.numel() == numel(), "reshape", fmt::format("cannot view {} as {}", desc(), s.str()));
  auto impl = std::make_shared<TensorImpl>(*impl_);
  impl->shape = s;
  impl->grad.reset();
  impl->requires_grad = false;
  impl->is_leaf = true;
  return Tensor(impl);
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  check(ndim() >= 1 && 0 <= begin && begin <= end && end <= dim(0), "slice0",
        fmt::format("rows [{}, {}) out of range for {}", begin, end, desc()));
  auto impl = std::make_shared<TensorImpl>(*impl_);
  impl->shape.d[0] = end - begin;
  impl->offset += size_t(begin) * size_t(numel() / std::max<int64_t>(dim(0), 1)) * dtype_size(dtype());
  impl->grad.reset();
  impl->requires_grad = false;
  impl->is_leaf = true;
  return Tensor(impl);
}

Tensor Tensor::detach() const { return reshape(shape()); }

void Tensor::copy_from(const Tensor& src) {
  check(src.numel() == numel(), "copy_from", fmt::format("{} into {}", src.desc(), desc()));
  if (numel() == 0) return;
  if (src.device() == device()) {
    DEEPLORA_DISPATCH(device(), cast, src.dtype(), src.data(), dtype(), data(), numel(), stream_for(device()));
    return;
  }
#ifdef DEEPLORA_HAVE_CUDA
  // Cross-device: move bytes in the source dtype, then convert on the destination.
  Tensor staged = src.dtype() == dtype() ? *this : empty(shape(), src.dtype(), device());
  auto kind = src.is_cuda() ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  CUDA_CHECK(cudaMemcpyAsync(staged.data(), src.data(), src.nbytes(), kind, cuda_ctx().stream));
  if (kind == cudaMemcpyDeviceToHost) CUDA_CHECK(cudaStreamSynchronize(cuda_ctx().stream));
  if (staged.impl() != impl()) copy_from(staged);
  if (kind == cudaMemcpyHostToDevice) CUDA_CHECK(cudaStreamSynchronize(cuda_ctx().stream));  // host src may be freed
#else
  throw std::runtime_error("copy_from: built without CUDA");
#endif
}

void Tensor::fill(double v) {
  DEEPLORA_DISPATCH(device(), fill, dtype(), data(), numel(), v, stream_for(device()));
}

std::vector<double> Tensor::to_double() const {
  Tensor h = to(Device::cpu).to(DType::f64);
  const double* p = h.data_as<double>();
  return std::vector<double>(p, p + numel());
}

std::vector<int32_t> Tensor::to_int() const {
  Tensor h = to(Device::cpu).to(DType::i32);
  const int32_t* p = h.data_as<int32_t>();
  return std::vector<int32_t>(p, p + numel());
}

double Tensor::item() const {
  check(numel() == 1, "item", fmt::format("{} has {} elements, expected 1", desc(), numel()));
  return to_double()[0];
}

}  // namespace deeplora
