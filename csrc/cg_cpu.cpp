// Conjugate gradient on the CPU for (A + damping I) x = b, A given by a Python
// callback. Vectors are caller-owned buffers passed as raw pointers, so this
// file needs no libtorch (rosa_ext/MATH.md section 4: each matvec is a JVP then a VJP).
#include "cg_cpu.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace rosa {
namespace {

template <typename T>
double dot(const T* a, const T* b, int64_t n) {
  double s = 0.0;  // accumulate in double whatever the vector dtype
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

template <typename T>
CgStats run(const std::function<void()>& apply, const T* b, T* x, T* r, T* p, T* ap, int64_t n,
            double damping, int64_t max_iter, double tol, bool x0_given) {
  CgStats out{0, 0.0, 0};
  const double bb = dot(b, b, n);
  if (!std::isfinite(bb)) throw NonFiniteError("cg: the right-hand side b contains NaN/Inf");
  if (x0_given) {
    for (int64_t i = 0; i < n; ++i) p[i] = x[i];
    apply();  // ap = A x0
    for (int64_t i = 0; i < n; ++i) r[i] = static_cast<T>(b[i] - ap[i] - damping * x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) { x[i] = T(0); r[i] = b[i]; }
  }
  if (bb == 0.0) {  // b = 0: the solution is x = 0
    for (int64_t i = 0; i < n; ++i) x[i] = T(0);
    return out;
  }
  double rr = dot(r, r, n);
  const double stop = tol * tol * bb;
  for (int64_t i = 0; i < n; ++i) p[i] = r[i];
  while (out.iterations < max_iter && rr > stop) {
    apply();  // ap = A p
    const double pap = dot(p, ap, n) + damping * dot(p, p, n);
    if (!std::isfinite(pap))
      throw NonFiniteError("cg: the operator returned NaN/Inf at iteration " +
                           std::to_string(out.iterations));
    if (pap <= 0.0) {  // A + damping I not positive definite along p: stop
      out.breakdown = 1;
      break;
    }
    const double alpha = rr / pap;
    for (int64_t i = 0; i < n; ++i) {
      x[i] = static_cast<T>(x[i] + alpha * p[i]);
      r[i] = static_cast<T>(r[i] - alpha * (ap[i] + damping * p[i]));
    }
    const double rr_new = dot(r, r, n);
    const double beta = rr_new / rr;
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(r[i] + beta * p[i]);
    rr = rr_new;
    ++out.iterations;
  }
  out.residual = std::sqrt(rr / bb);
  return out;
}

}  // namespace

CgStats cg_cpu(const std::function<void()>& apply, uintptr_t b, uintptr_t x, uintptr_t r, uintptr_t p,
               uintptr_t ap, int64_t n, const std::string& dtype, double damping, int64_t max_iter,
               double tol, bool x0_given) {
  if (n < 0) throw std::invalid_argument("cg: n must be >= 0");
  if (max_iter < 0) throw std::invalid_argument("cg: max_iter must be >= 0");
  if (!(damping >= 0.0) || !std::isfinite(damping)) throw std::invalid_argument("cg: damping must be >= 0 and finite");
  if (!(tol >= 0.0)) throw std::invalid_argument("cg: tol must be >= 0");
  if (dtype == "float32")
    return run<float>(apply, reinterpret_cast<const float*>(b), reinterpret_cast<float*>(x),
                      reinterpret_cast<float*>(r), reinterpret_cast<float*>(p), reinterpret_cast<float*>(ap), n,
                      damping, max_iter, tol, x0_given);
  if (dtype == "float64")
    return run<double>(apply, reinterpret_cast<const double*>(b), reinterpret_cast<double*>(x),
                       reinterpret_cast<double*>(r), reinterpret_cast<double*>(p), reinterpret_cast<double*>(ap),
                       n, damping, max_iter, tol, x0_given);
  throw std::invalid_argument("cg: dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

}  // namespace rosa
