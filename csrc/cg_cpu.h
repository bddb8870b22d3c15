// CPU conjugate gradient over caller-owned buffers (raw pointers, no libtorch).
#pragma once
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace rosa {

struct CgStats {
  int64_t iterations;  // CG iterations run
  double residual;     // ||b - (A + damping I) x|| / ||b|| (recursive residual; 0 when b = 0)
  int64_t breakdown;   // 1 if p^T (A + damping I) p <= 0 stopped the loop
};

// Raised when the operator or b produces NaN/Inf; mapped to Python's FloatingPointError.
struct NonFiniteError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Solves (A + damping I) x = b. `apply()` must write A p into `ap` (both n-vectors of
// `dtype`, "float32" or "float64"). If x0_given, x holds the initial guess on entry.
CgStats cg_cpu(const std::function<void()>& apply, uintptr_t b, uintptr_t x, uintptr_t r, uintptr_t p,
               uintptr_t ap, int64_t n, const std::string& dtype, double damping, int64_t max_iter,
               double tol, bool x0_given);

}  // namespace rosa
