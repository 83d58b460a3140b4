// Tensor: shape (<= 4 dims), dtype, device and shared storage, plus the autodiff fields the tape uses.
// Contiguous always; views (reshape, slice along dim 0) share storage at an offset.
#pragma once
#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"

namespace deeplora {

enum class Device : uint8_t { cpu, cuda };
const char* device_name(Device d);

struct Shape {
  std::array<int64_t, 4> d{0, 0, 0, 0};
  int ndim = 0;
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  static Shape of(const std::vector<int64_t>& dims);
  int64_t operator[](int i) const { return d[i < 0 ? i + ndim : i]; }
  int64_t& operator[](int i) { return d[i < 0 ? i + ndim : i]; }
  int64_t numel() const;
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const;  // "[2, 3, 4]"
  std::vector<int64_t> vec() const { return {d.begin(), d.begin() + ndim}; }
};

// Raw memory owned by the CPU heap or the CUDA caching allocator; freed back to its owner.
struct Storage {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device = Device::cpu;
  bool external = false;  // not owned (wraps memory somebody else frees)
  Storage(size_t nbytes, Device dev);
  Storage(void* p, size_t nbytes, Device dev);  // external
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  size_t offset = 0;  // bytes
  Shape shape;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  bool requires_grad = false;
  bool is_leaf = true;               // created by the user, not by an op on the tape
  std::shared_ptr<TensorImpl> grad;  // same shape, dtype and device; allocated on first accumulate
  std::string name;                  // for error messages and checkpoints
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // Creation. Every new tensor's memory comes from the device's allocator.
  static Tensor empty(const Shape& s, DType dt, Device dev = Device::cpu);
  static Tensor zeros(const Shape& s, DType dt, Device dev = Device::cpu);
  static Tensor full(const Shape& s, double v, DType dt, Device dev = Device::cpu);
  // Counter-based RNG: element i gets the same number on CPU and GPU for the same seed.
  static Tensor randn(const Shape& s, uint64_t seed, DType dt, Device dev = Device::cpu, double stddev = 1.0);
  static Tensor uniform(const Shape& s, uint64_t seed, double lo, double hi, DType dt, Device dev = Device::cpu);
  static Tensor from_vector(const std::vector<double>& v, const Shape& s, DType dt, Device dev = Device::cpu);
  static Tensor from_ints(const std::vector<int32_t>& v, const Shape& s, Device dev = Device::cpu);

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl_->shape; }
  int ndim() const { return impl_->shape.ndim; }
  int64_t dim(int i) const { return impl_->shape[i]; }
  int64_t numel() const { return impl_->shape.numel(); }
  DType dtype() const { return impl_->dtype; }
  Device device() const { return impl_->device; }
  bool is_cuda() const { return impl_->device == Device::cuda; }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype()); }
  void* data() const { return static_cast<char*>(impl_->storage->ptr) + impl_->offset; }
  template <class T> T* data_as() const { return static_cast<T*>(data()); }
  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  std::string desc() const;  // "name f32[2, 3] cuda"

  // Autodiff fields.
  bool requires_grad() const { return impl_->requires_grad; }
  Tensor& set_requires_grad(bool r);
  Tensor grad() const { return Tensor(impl_->grad); }
  void zero_grad() { impl_->grad.reset(); }
  Tensor& set_name(std::string n) { impl_->name = std::move(n); return *this; }
  const std::string& name() const { return impl_->name; }

  // Copies and views (not recorded on the tape; ops::reshape / ops::cast are the differentiable forms).
  Tensor to(Device dev) const;
  Tensor to(DType dt) const;
  Tensor clone() const;
  Tensor reshape(const Shape& s) const;  // view
  Tensor slice0(int64_t begin, int64_t end) const;  // view of rows [begin, end) of dim 0
  Tensor detach() const;  // same storage, no grad
  void copy_from(const Tensor& src);  // same shape; any device/dtype pair
  void fill(double v);

  // Host copies for tests and I/O: converted to double / int.
  std::vector<double> to_double() const;
  std::vector<int32_t> to_int() const;
  double item() const;

 private:
  std::shared_ptr<TensorImpl> impl_;
};

// Throws std::invalid_argument with `op: message` unless cond.
void check(bool cond, const char* op, const std::string& msg);

}  // namespace deeplora
