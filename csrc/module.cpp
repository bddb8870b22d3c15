// rosa_ext._C: a plain pybind11 module (no libtorch ABI). Functions take raw
// pointers (tensor.data_ptr()), sizes, a dtype name and a CUDA stream handle,
// so one build works with any torch version. See rosa_ext/_cg_compiled.py.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "cg_cpu.h"
#ifdef ROSA_WITH_CUDA
#include "cg_cuda.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "rosa-ext compiled part: conjugate gradient on the CPU (C++) and CUDA (device-side scalars)";
#ifndef ROSA_VERSION
#define ROSA_VERSION "unknown"
#endif
  m.attr("__version__") = ROSA_VERSION;
  py::register_exception<rosa::NonFiniteError>(m, "NonFiniteError", PyExc_FloatingPointError);

  m.def("has_cuda", []() {
#ifdef ROSA_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True if the CUDA kernels were compiled into this build.");

  m.def("cg_cpu",
        [](const std::function<void()>& apply, uintptr_t b, uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t ap,
           int64_t n, const std::string& dtype, double damping, int64_t max_iter, double tol, bool x0_given) {
          rosa::CgStats s = rosa::cg_cpu(apply, b, x, r, p, ap, n, dtype, damping, max_iter, tol, x0_given);
          // a C++ tuple: converted to Python after the call guard re-acquired the GIL
          return std::make_tuple(s.iterations, s.residual, s.breakdown);
        },
        py::arg("apply"), py::arg("b"), py::arg("x"), py::arg("r"), py::arg("p"), py::arg("ap"), py::arg("n"),
        py::arg("dtype"), py::arg("damping"), py::arg("max_iter"), py::arg("tol"), py::arg("x0_given"),
        // The vector work runs without the GIL; pybind11's std::function wrapper
        // re-acquires it around each apply() and rethrows a Python exception from it.
        py::call_guard<py::gil_scoped_release>(),
        "CG on caller-owned n-vectors; apply() must write A p into ap. Returns (iterations, residual, breakdown).");

#ifdef ROSA_WITH_CUDA
  m.def("cg_cuda_init", &rosa::cg_cuda_init, py::arg("b"), py::arg("x"), py::arg("r"), py::arg("p"), py::arg("ap"),
        py::arg("state"), py::arg("n"), py::arg("dtype"), py::arg("damping"), py::arg("tol"), py::arg("x0_given"),
        py::arg("device"), py::arg("stream"),
        "Launch the CG set-up on `stream` of CUDA device `device` (state: float64[CG_STATE_SIZE]); no sync.");
  m.def("cg_cuda_step", &rosa::cg_cuda_step, py::arg("x"), py::arg("r"), py::arg("p"), py::arg("ap"),
        py::arg("state"), py::arg("n"), py::arg("dtype"), py::arg("damping"), py::arg("device"), py::arg("stream"),
        "Launch one CG iteration on `stream` after ap = A p was written there; no host sync.");
  m.attr("CG_STATE_SIZE") = static_cast<int>(rosa::kStateSize);
  m.attr("cuda_architectures") = ROSA_CUDA_ARCHS;
#endif
}
