// CUDA conjugate gradient steps with every scalar on the device (no host sync).
#pragma once
#include <cstdint>
#include <string>

namespace rosa {

// Layout of the device state vector (float64, kStateSize entries).
enum CgState : int {
  kRR = 0,      // r.r
  kBB = 1,      // b.b
  kPAP = 2,     // accumulator: p.(A p + damping p)
  kRRNew = 3,   // accumulator: r.r after the x/r update
  kActive = 4,  // 1 while iterating; 0 once converged, broken down or non-finite
  kIters = 5,   // iterations run
  kBad = 6,     // 1 if NaN/Inf was seen
  kStop = 7,    // tol^2 * b.b
  kBeta = 8,    // beta of the last iteration
  kUpdP = 9,    // 1 if p must be updated this step
  kStateSize = 10
};

// All pointers are device addresses on CUDA device `device` (n-vectors of `dtype`,
// "float32" or "float64"; `state` float64[kStateSize]); `stream` is a cudaStream_t of
// that device. Work is only enqueued: neither function synchronises.

// r = b - ap - damping x (x0_given: ap holds A x0) or x = 0, r = b; p = r; fills the state.
void cg_cuda_init(uintptr_t b, uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t ap, uintptr_t state,
                  int64_t n, const std::string& dtype, double damping, double tol, bool x0_given,
                  int device, uintptr_t stream);

// One CG iteration after the caller wrote ap = A p on the same stream. Frozen (a no-op
// on x, r, p) once state[kActive] is 0, so a fixed number of launches is graph-capturable.
void cg_cuda_step(uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t ap, uintptr_t state, int64_t n,
                  const std::string& dtype, double damping, int device, uintptr_t stream);

}  // namespace rosa
