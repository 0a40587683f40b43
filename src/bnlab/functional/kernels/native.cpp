// The native glue of the fused kernels: a C++ autograd Function that calls the numba entry
// points (entries.py) by address, so a training step pays no Python between the module and the
// loop beyond the dispatch in bnlab.functional (see native.py, which builds this file on first
// use). The numbers are the loops': this file only allocates outputs, passes pointers and
// wires the backward.
//
// ints (one vector per call): n0, n1, n2, groups, channels, v, blocks, row_blocks,
//   forward address, backward address, running kind, virtual batch size (0: none).
// reals: p, eps, momentum.
#include <torch/extension.h>

#include <sys/mman.h>

#include <cstdint>
#include <vector>

namespace bnlab {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardFn = void (*)(void*, void*, void*, void*, void*, void*, double*, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, double, double, double, int64_t);
using BackwardFn = void (*)(void*, void*, void*, double*, void*, void*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, double, int64_t);
using EvalFn = void (*)(void*, void*, void*, void*, void*, void*, int64_t, int64_t, int64_t,
                        int64_t, double, int64_t);

enum Int { N0, N1, N2, GROUPS, CHANNELS, V, BLOCKS, ROW_BLOCKS, FORWARD, BACKWARD, KIND, VBS, NINTS };
enum Real { P, EPS, MOMENTUM, NREALS };

// The double-backward path (torch-op formulas, in Python); leaked on purpose: a static
// py::object would be released after the interpreter has gone.
py::object* double_backward = nullptr;

constexpr int64_t kHugePage = 2 << 20;

// A new tensor with x's shape and strides; >= 4 MiB outputs are advised to transparent huge
// pages (first-touch faults of fresh pages otherwise cost more than the loop; see _output in
// kernels/__init__.py).
Tensor output_like(const Tensor& x) {
  Tensor out = at::empty_like(x);
  int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  if (bytes >= 2 * kHugePage) {
    auto ptr = reinterpret_cast<uintptr_t>(out.data_ptr());
    uintptr_t start = (ptr + kHugePage - 1) / kHugePage * kHugePage;
    uintptr_t end = (ptr + bytes) / kHugePage * kHugePage;
    if (end > start) {
      madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
    }
  }
  return out;
}

Tensor or_filled(const Tensor& t, int64_t channels, double value, const Tensor& like) {
  return t.defined() ? t.contiguous() : at::full({channels}, value, like.options());
}

void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

Tensor defined_or_empty(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

py::object optional(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

struct TrainNorm : public torch::autograd::Function<TrainNorm> {
  // weight, bias and the running buffers are optional: an absent one is no autograd input, so
  // it has no edge (needs_input_grad counts edges, see backward).
  static variable_list forward(AutogradContext* ctx, Tensor x, std::optional<Tensor> weight_in,
                               std::optional<Tensor> bias_in,
                               std::optional<Tensor> track_mean_in,
                               std::optional<Tensor> track_second_in,
                               const std::vector<int64_t>& ints, const std::vector<double>& reals) {
    const int64_t channels = ints[CHANNELS];
    Tensor weight = defined_or_empty(weight_in);
    Tensor bias = defined_or_empty(bias_in);
    Tensor track_mean = defined_or_empty(track_mean_in);
    Tensor track_second = defined_or_empty(track_second_in);
    Tensor y = output_like(x);
    Tensor stats = at::empty({5, ints[GROUPS], channels}, x.options().dtype(at::kDouble));
    Tensor w = or_filled(weight, channels, 1.0, x);
    Tensor b = or_filled(bias, channels, 0.0, x);
    auto run = reinterpret_cast<ForwardFn>(ints[FORWARD]);
    run(x.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(), ptr(track_mean),
        ptr(track_second), stats.data_ptr<double>(), ints[N0], ints[N1], ints[N2], ints[V],
        ints[BLOCKS], ints[ROW_BLOCKS], reals[P], reals[EPS], reals[MOMENTUM], ints[KIND]);
    ctx->save_for_backward({x, weight, bias});
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["ints"] = ints;
    ctx->saved_data["reals"] = reals;
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    return {y, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& dy_in = grads[0];
    variable_list result(7);
    if (!dy_in.defined()) {
      return result;
    }
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& bias = saved[2];
    auto ints = ctx->saved_data["ints"].toIntVector();
    auto reals = ctx->saved_data["reals"].toDoubleVector();
    bool need_dx = ctx->needs_input_grad(0);
    bool need_w = weight.defined() && ctx->needs_input_grad(1);
    bool need_b = bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: a differentiable backward through the torch-op formulas.
      py::gil_scoped_acquire gil;
      py::tuple grads_out = (*double_backward)(
          x, optional(weight), optional(bias), dy_in, reals[P], reals[EPS],
          ints[VBS] > 0 ? py::cast(ints[VBS]) : py::none(), py::make_tuple(need_dx, need_w, need_b));
      for (int i = 0; i < 3; ++i) {
        if (!grads_out[i].is_none()) {
          result[i] = grads_out[i].cast<Tensor>();
        }
      }
      return result;
    }
    Tensor dy = dy_in.strides() == x.strides() ? dy_in : at::empty_like(x).copy_(dy_in);
    Tensor dx = need_dx ? output_like(x) : at::empty_like(x);
    Tensor w = or_filled(weight, ints[CHANNELS], 1.0, x);
    Tensor dparams = at::empty({2, ints[CHANNELS]}, x.options());
    Tensor stats = ctx->saved_data["stats"].toTensor();
    auto run = reinterpret_cast<BackwardFn>(ints[BACKWARD]);
    run(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), stats.data_ptr<double>(), w.data_ptr(),
        dparams.data_ptr(), ints[N0], ints[N1], ints[N2], ints[V], ints[BLOCKS],
        ints[ROW_BLOCKS], reals[P], need_dx ? 1 : 0);
    if (need_dx) {
      result[0] = dx;
    }
    if (need_w || need_b) {
      auto rows = dparams.unbind(0);
      result[1] = need_w ? rows[0] : Tensor();
      result[2] = need_b ? rows[1] : Tensor();
    }
    return result;
  }
};

// (y, mean (G, C), spread (G, C)): the statistics as float64 views of the (5, G, C) array.
std::vector<Tensor> train(const Tensor& x, const std::optional<Tensor>& weight,
                          const std::optional<Tensor>& bias,
                          const std::optional<Tensor>& track_mean,
                          const std::optional<Tensor>& track_second,
                          const std::vector<int64_t>& ints, const std::vector<double>& reals) {
  TORCH_CHECK(ints.size() == NINTS && reals.size() == NREALS, "bnlab native train: bad plan");
  auto out = TrainNorm::apply(x, weight, bias, track_mean, track_second, ints, reals);
  auto stats = out[1].unbind(0);
  return {out[0], stats[0], stats[1]};
}

// Eval normalization without autograd (the caller checked that nothing needs a gradient).
Tensor eval(const Tensor& x, const Tensor& mean, const Tensor& spread,
            const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
            const std::vector<int64_t>& ints, double eps, bool is_var) {
  const int64_t channels = ints[CHANNELS];
  auto as_x = [&](const Tensor& t) { return t.to(x.scalar_type()).contiguous(); };
  Tensor y = output_like(x);
  Tensor m = as_x(mean);
  Tensor s = as_x(spread);
  Tensor w = weight.has_value() ? as_x(*weight) : at::ones({channels}, x.options());
  Tensor b = bias.has_value() ? as_x(*bias) : at::zeros({channels}, x.options());
  auto run = reinterpret_cast<EvalFn>(ints[FORWARD]);
  run(x.data_ptr(), y.data_ptr(), m.data_ptr(), s.data_ptr(), w.data_ptr(), b.data_ptr(),
      ints[N0], ints[N1], ints[N2], ints[ROW_BLOCKS], eps, is_var ? 1 : 0);
  return y;
}

void set_double_backward(py::object f) {
  if (double_backward == nullptr) {
    double_backward = new py::object();
  }
  *double_backward = std::move(f);
}

}  // namespace bnlab

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train", &bnlab::train, "Training normalization on the fused kernels, with autograd");
  m.def("eval", &bnlab::eval, "Eval normalization on the fused kernels (no autograd)");
  m.def("set_double_backward", &bnlab::set_double_backward);
}
