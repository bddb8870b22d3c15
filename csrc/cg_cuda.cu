// CUDA conjugate gradient for (A + damping I) x = b with device-side scalars.
// The host launches work only: alpha, beta and the convergence test live in a
// small float64 state vector on the device (cuBLAS device-pointer-mode style), so
// no value ever travels to the host inside the loop and the loop is capturable in
// a CUDA graph. Dot products accumulate in float64.
#include "cg_cuda.h"

#include <cuda_runtime.h>

#include <cmath>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace rosa {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  if (blocks > 1024) blocks = 1024;
  return static_cast<int>(blocks);
}

__device__ void block_add(double v, double* target) {
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(target, buf[0]);
}

template <typename T>
__global__ void k_init(const T* b, T* x, T* r, T* p, const T* ap, int64_t n, double damping, bool x0_given,
                       double* st) {
  double rr = 0.0, bb = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    double bi = b[i];
    double ri = x0_given ? bi - (double)ap[i] - damping * (double)x[i] : bi;
    if (!x0_given) x[i] = T(0);
    r[i] = T(ri);
    p[i] = T(ri);
    rr += ri * ri;
    bb += bi * bi;
  }
  block_add(rr, st + kRR);
  __syncthreads();
  block_add(bb, st + kBB);
}

__global__ void k_init_scalar(double* st, double tol) {
  double bb = st[kBB], rr = st[kRR];
  bool finite = isfinite(bb) && isfinite(rr);
  st[kBad] = finite ? 0.0 : 1.0;
  st[kStop] = tol * tol * bb;
  st[kActive] = (finite && bb > 0.0 && rr > tol * tol * bb) ? 1.0 : 0.0;
  st[kIters] = 0.0;
}

template <typename T>
__global__ void k_dot_pap(const T* p, const T* ap, int64_t n, double damping, double* st) {
  if (st[kActive] == 0.0) return;  // uniform across the grid: no divergence at the sync
  double s = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    double pi = p[i];
    s += pi * ((double)ap[i] + damping * pi);
  }
  block_add(s, st + kPAP);
}

template <typename T>
__global__ void k_update_xr(T* x, T* r, const T* p, const T* ap, int64_t n, double damping, double* st) {
  double pap = st[kPAP];
  if (st[kActive] == 0.0 || !isfinite(pap) || pap <= 0.0) return;
  double alpha = st[kRR] / pap;
  double s = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    double pi = p[i];
    x[i] = T((double)x[i] + alpha * pi);
    double ri = (double)r[i] - alpha * ((double)ap[i] + damping * pi);
    r[i] = T(ri);
    s += ri * ri;
  }
  block_add(s, st + kRRNew);
}

__global__ void k_step_scalar(double* st) {
  st[kUpdP] = 0.0;
  if (st[kActive] != 0.0) {
    double pap = st[kPAP];
    if (!isfinite(pap)) {
      st[kBad] = 1.0;
      st[kActive] = 0.0;
    } else if (pap <= 0.0) {
      st[kActive] = 0.0;  // breakdown: not positive definite along p
    } else {
      double rr_new = st[kRRNew];
      if (!isfinite(rr_new)) {
        st[kBad] = 1.0;
        st[kActive] = 0.0;
      } else {
        st[kBeta] = rr_new / st[kRR];
        st[kRR] = rr_new;
        st[kIters] += 1.0;
        bool go = rr_new > st[kStop];
        st[kActive] = go ? 1.0 : 0.0;
        st[kUpdP] = go ? 1.0 : 0.0;
      }
    }
  }
  st[kPAP] = 0.0;
  st[kRRNew] = 0.0;
}

template <typename T>
__global__ void k_update_p(T* p, const T* r, int64_t n, const double* st) {
  if (st[kUpdP] == 0.0) return;
  double beta = st[kBeta];
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = T((double)r[i] + beta * (double)p[i]);
}

void check_status(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it, so that it is not reported again by the next check
    throw std::runtime_error(std::string("cg (CUDA) ") + what + ": " + cudaGetErrorString(e));
  }
}

// After a launch: launch errors only (cudaGetLastError never synchronises).
void check(const char* what) { check_status(cudaGetLastError(), what); }

// Makes `device` current for the launches and restores the previous device after.
// This module links its own (static) CUDA runtime, whose current device need not
// follow torch's, and a launch into another device's stream fails.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) throw std::invalid_argument("cg (CUDA): device index must be >= 0, got " + std::to_string(device));
    check_status(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check_status(cudaSetDevice(device), "cudaSetDevice");
    } else {
      prev_ = -1;
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

template <typename T>
void init_t(uintptr_t b, uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t ap, uintptr_t state, int64_t n,
            double damping, double tol, bool x0_given, cudaStream_t s) {
  double* st = reinterpret_cast<double*>(state);
  check_status(cudaMemsetAsync(st, 0, kStateSize * sizeof(double), s), "memset");
  k_init<T><<<grid_for(n), kThreads, 0, s>>>(reinterpret_cast<const T*>(b), reinterpret_cast<T*>(x),
                                            reinterpret_cast<T*>(r), reinterpret_cast<T*>(p),
                                            reinterpret_cast<const T*>(ap), n, damping, x0_given, st);
  check("init");
  k_init_scalar<<<1, 1, 0, s>>>(st, tol);
  check("init_scalar");
}

template <typename T>
void step_t(uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t ap, uintptr_t state, int64_t n, double damping,
            cudaStream_t s) {
  double* st = reinterpret_cast<double*>(state);
  int g = grid_for(n);
  k_dot_pap<T><<<g, kThreads, 0, s>>>(reinterpret_cast<const T*>(p), reinterpret_cast<const T*>(ap), n, damping, st);
  check("dot");
  k_update_xr<T><<<g, kThreads, 0, s>>>(reinterpret_cast<T*>(x), reinterpret_cast<T*>(r),
                                        reinterpret_cast<const T*>(p), reinterpret_cast<const T*>(ap), n, damping, st);
  check("update_xr");
  k_step_scalar<<<1, 1, 0, s>>>(st);
  check("scalar");
  k_update_p<T><<<g, kThreads, 0, s>>>(reinterpret_cast<T*>(p), reinterpret_cast<const T*>(r), n, st);
  check("update_p");
}

void check_args(const std::string& dtype, int64_t n, std::initializer_list<uintptr_t> vectors, uintptr_t state) {
  if (dtype != "float32" && dtype != "float64")
    throw std::invalid_argument("cg: dtype must be 'float32' or 'float64', got '" + dtype + "'");
  if (n < 0) throw std::invalid_argument("cg: n must be >= 0, got " + std::to_string(n));
  if (state == 0) throw std::invalid_argument("cg (CUDA): the state pointer is null");
  if (n > 0)
    for (uintptr_t v : vectors)
      if (v == 0) throw std::invalid_argument("cg (CUDA): a vector pointer is null while n > 0");
}

}  // namespace

void cg_cuda_init(uintptr_t b, uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t ap, uintptr_t state, int64_t n,
                  const std::string& dtype, double damping, double tol, bool x0_given, int device,
                  uintptr_t stream) {
  check_args(dtype, n, {b, x, r, p, ap}, state);
  if (!(damping >= 0.0) || !std::isfinite(damping)) throw std::invalid_argument("cg: damping must be >= 0 and finite");
  if (!(tol >= 0.0)) throw std::invalid_argument("cg: tol must be >= 0");
  DeviceGuard guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == "float32") init_t<float>(b, x, r, p, ap, state, n, damping, tol, x0_given, s);
  else init_t<double>(b, x, r, p, ap, state, n, damping, tol, x0_given, s);
}

void cg_cuda_step(uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t ap, uintptr_t state, int64_t n,
                  const std::string& dtype, double damping, int device, uintptr_t stream) {
  check_args(dtype, n, {x, r, p, ap}, state);
  DeviceGuard guard(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == "float32") step_t<float>(x, r, p, ap, state, n, damping, s);
  else step_t<double>(x, r, p, ap, state, n, damping, s);
}

}  // namespace rosa
