// The native glue of the fused kernels: a C++ autograd node that calls the numba entry
// points (entries.py) by address, so a training step pays no Python between the module and the
// loop beyond the dispatch in bnlab.functional (see native.py, which builds this file on first
// use). The numbers are the loops': this file only allocates outputs, passes pointers and
// wires the backward.
//
// ints (one vector per call): n0, n1, n2, groups, channels, v, blocks, row_blocks,
//   forward address, backward address, running kind, virtual batch size (0: none),
//   noise count (0: no noise, 4: reals carry the noise configuration), noise key (int64).
// reals: p (negative: lp's un-centred form), eps, momentum, then the noise configuration
//   n_mu, n_sigma, r_mu, r_sigma (present, and read, only with noise).
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/CPUAllocator.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <mutex>
#include <typeinfo>
#include <utility>
#include <vector>

namespace bnlab {

using torch::Tensor;
using torch::autograd::variable_list;

using ForwardFn = void (*)(void*, void*, void*, void*, void*, void*, double*, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, double, double, double, int64_t,
                           const double*, int64_t, int64_t, void*, int64_t);
using BackwardFn = void (*)(void*, void*, void*, double*, void*, void*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, int64_t, double, int64_t, void*, int64_t);
using EvalFn = void (*)(void*, void*, void*, void*, void*, void*, int64_t, int64_t, int64_t,
                        int64_t, double, int64_t);

enum Int {
  N0, N1, N2, GROUPS, CHANNELS, V, BLOCKS, ROW_BLOCKS, FORWARD, BACKWARD, KIND, VBS, NOISE, KEY,
  NINTS
};
enum Real { P, EPS, MOMENTUM, NOISE_CONF, NREALS = NOISE_CONF };
constexpr int64_t kNoiseConf = 4;

// The double-backward path (torch-op formulas, in Python); leaked on purpose: a static
// py::object would be released after the interpreter has gone.
py::object* double_backward = nullptr;

constexpr int64_t kHugePage = 2 << 20;

void advise_huge_pages(void* data, int64_t bytes) {
  auto ptr = reinterpret_cast<uintptr_t>(data);
  uintptr_t start = (ptr + kHugePage - 1) / kHugePage * kHugePage;
  uintptr_t end = (ptr + bytes) / kHugePage * kHugePage;
  if (end > start) {
    madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
}

// Freed large outputs, kept for the next output of the same size. torch's CPU allocator hands
// every large block back to the OS on free, so each new output is fresh memory the kernel must
// zero on first touch: for (128, 64, 56, 56) float32 (102 MB) that is about 6 ms of a 34 ms
// forward+backward, two such tensors a step. A training loop frees and re-asks the same sizes
// every step, so a block freed here is reused as is (the CUDA caching allocator's idea, here
// for outputs of >= 4 MiB only, and bounded: the least recently freed blocks are released
// first once the cache would hold more than its limit). Leaked on purpose: tensors may be
// freed after static destructors have run.
class OutputCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->first == bytes) {
        void* data = it->second;
        held_ -= bytes;
        blocks_.erase(std::next(it).base());
        return data;
      }
    }
    return nullptr;
  }

  void give(void* data, size_t bytes) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        release.push_back(data);
      } else {
        while (held_ + bytes > limit_) {
          release.push_back(blocks_.front().second);
          held_ -= blocks_.front().first;
          blocks_.erase(blocks_.begin());
        }
        blocks_.emplace_back(bytes, data);
        held_ += bytes;
      }
    }
    for (void* block : release) {
      std::free(block);
    }
  }

  // Sets the limit (0: cache nothing) and releases what is over it; returns the bytes held.
  size_t set_limit(size_t limit) {
    std::vector<void*> release;
    size_t held;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit;
      while (held_ > limit_) {
        release.push_back(blocks_.front().second);
        held_ -= blocks_.front().first;
        blocks_.erase(blocks_.begin());
      }
      held = held_;
    }
    for (void* block : release) {
      std::free(block);
    }
    return held;
  }

  std::pair<size_t, size_t> state() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {held_, limit_};
  }

  // A forked child inherits the blocks (copy-on-write) and a mutex that another thread of the
  // parent may have held at the fork: pthread_atfork takes it around the fork.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
  std::vector<std::pair<size_t, void*>> blocks_;  // oldest first
  size_t held_ = 0;
  size_t limit_ = size_t{1} << 30;
};

OutputCache* output_cache() {
  static OutputCache* cache = [] {
    auto* c = new OutputCache();
    pthread_atfork([] { output_cache()->lock(); }, [] { output_cache()->unlock(); },
                   [] { output_cache()->unlock(); });
    return c;
  }();
  return cache;
}

struct CachedBlock {
  void* data;
  size_t bytes;
};

void release_block(void* context) {
  auto* block = static_cast<CachedBlock*>(context);
  output_cache()->give(block->data, block->bytes);
  delete block;
}

// A new tensor with x's shape and strides (dense: x is contiguous or dense channels-last).
// Outputs of >= 4 MiB come from the output cache, or are allocated on huge-page boundaries and
// advised to transparent huge pages (first-touch faults of fresh 4 KiB pages otherwise cost
// more than the loop; see _output in kernels/__init__.py); their storage goes back to the
// cache when freed.
Tensor output_like(const Tensor& x) {
  const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  if (bytes < 2 * kHugePage) {
    return at::empty_like(x);
  }
  OutputCache* cache = output_cache();
  void* data = cache->take(static_cast<size_t>(bytes));
  if (data == nullptr) {
    data = std::aligned_alloc(kHugePage, (bytes + kHugePage - 1) / kHugePage * kHugePage);
    TORCH_CHECK(data != nullptr, "bnlab: could not allocate ", bytes, " bytes for an output");
    advise_huge_pages(data, bytes);
  }
  // A resizable storage like torch's own outputs: growing it copies into a block from torch's
  // CPU allocator and hands this one back to the cache.
  auto* block = new CachedBlock{data, static_cast<size_t>(bytes)};
  c10::DataPtr data_ptr(data, block, &release_block, x.device());
  auto storage = c10::make_intrusive<c10::StorageImpl>(
      c10::StorageImpl::use_byte_size_t(), bytes, std::move(data_ptr), c10::GetCPUAllocator(),
      /*resizable=*/true);
  return at::empty({0}, x.options()).set_(c10::Storage(std::move(storage)), 0, x.sizes(),
                                          x.strides());
}

Tensor or_filled(const Tensor& t, int64_t channels, double value, const Tensor& like) {
  return t.defined() ? t.contiguous() : at::full({channels}, value, like.options());
}

void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

Tensor defined_or_empty(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

py::object tensor_or_none(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

// The loops read raw CPU pointers: a parameter elsewhere is a user error, said in torch's words.
void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || t.device().is_cpu(), "bnlab: expected ", name,
              " on the CPU like the input, got it on ", t.device());
}

// The backward node of a training normalization: a plain autograd Node (no custom Function
// machinery, its state in members), like the nodes torch generates for its own operators.
struct TrainNormBackward : public torch::autograd::Node {
  using Node::Node;

  torch::autograd::SavedVariable x_, weight_, bias_, kept_;
  Tensor stats_;
  std::vector<int64_t> ints_;
  std::vector<double> reals_;
  bool has_weight_ = false;
  bool has_bias_ = false;

  std::string name() const override { return "bnlab::TrainNormBackward"; }

  void release_variables() override {
    x_.reset_data();
    weight_.reset_data();
    bias_.reset_data();
    kept_.reset_data();
    stats_.reset();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list result(3);
    const Tensor& dy_in = grads[0];
    if (!dy_in.defined()) {
      return result;
    }
    Tensor x = x_.unpack();
    Tensor weight = has_weight_ ? weight_.unpack() : Tensor();
    Tensor bias = has_bias_ ? bias_.unpack() : Tensor();
    bool need_dx = task_should_compute_output(0);
    bool need_w = has_weight_ && task_should_compute_output(1);
    bool need_b = has_bias_ && task_should_compute_output(2);
    if (at::GradMode::is_enabled()) {
      // create_graph=True: a differentiable backward through the torch-op formulas.
      py::gil_scoped_acquire gil;
      py::object noise = py::none();
      if (ints_[NOISE] > 0) {
        noise = py::make_tuple(reals_[NOISE_CONF], reals_[NOISE_CONF + 1],
                               reals_[NOISE_CONF + 2], reals_[NOISE_CONF + 3], ints_[KEY]);
      }
      py::tuple grads_out = (*double_backward)(
          x, tensor_or_none(weight), tensor_or_none(bias), dy_in, reals_[P], reals_[EPS],
          ints_[VBS] > 0 ? py::cast(ints_[VBS]) : py::none(), noise,
          py::make_tuple(need_dx, need_w, need_b));
      for (int i = 0; i < 3; ++i) {
        if (!grads_out[i].is_none()) {
          result[i] = grads_out[i].cast<Tensor>();
        }
      }
      return result;
    }
    Tensor dy = dy_in.strides() == x.strides() ? dy_in : at::empty_like(x).copy_(dy_in);
    Tensor dx = need_dx ? output_like(x) : at::empty_like(x);
    Tensor w = or_filled(weight, ints_[CHANNELS], 1.0, x);
    Tensor dparams = at::empty({2, ints_[CHANNELS]}, x.options());
    Tensor kept = ints_[NOISE] > 0 ? kept_.unpack() : Tensor();
    auto run = reinterpret_cast<BackwardFn>(ints_[BACKWARD]);
    run(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), stats_.data_ptr<double>(), w.data_ptr(),
        dparams.data_ptr(), ints_[N0], ints_[N1], ints_[N2], ints_[V], ints_[BLOCKS],
        ints_[ROW_BLOCKS], reals_[P], need_dx ? 1 : 0, ptr(kept), kept.defined() ? 1 : 0);
    if (need_dx) {
      result[0] = dx;
    }
    if (need_w) {
      result[1] = dparams.select(0, 0);
    }
    if (need_b) {
      result[2] = dparams.select(0, 1);
    }
    return result;
  }
};

// Training normalization: y, or (y, mean (G, C), spread (G, C)) with ``with_stats`` (float64
// views of the loop's (5, G, C) statistics). When a gradient is wanted, y's grad_fn is a
// TrainNormBackward that saves x, weight, bias (autograd's saved tensors) and the statistics;
// with noise also the multipliers s the forward kept (x's shape), which the backward reads.
py::object train(const Tensor& x, const std::optional<Tensor>& weight_in,
                 const std::optional<Tensor>& bias_in, const std::optional<Tensor>& track_mean,
                 const std::optional<Tensor>& track_second, const std::vector<int64_t>& ints,
                 const std::vector<double>& reals, bool with_stats) {
  TORCH_CHECK(ints.size() == NINTS && (ints[NOISE] == 0 || ints[NOISE] == kNoiseConf) &&
                  reals.size() == static_cast<size_t>(NREALS + ints[NOISE]),
              "bnlab native train: bad plan");
  const int64_t channels = ints[CHANNELS];
  Tensor weight = defined_or_empty(weight_in);
  Tensor bias = defined_or_empty(bias_in);
  check_cpu(weight, "weight");
  check_cpu(bias, "bias");
  Tensor y = output_like(x);
  Tensor stats = at::empty({5, ints[GROUPS], channels}, x.options().dtype(at::kDouble));
  Tensor w = or_filled(weight, channels, 1.0, x);
  Tensor b = or_filled(bias, channels, 0.0, x);
  const bool wants_grad = torch::autograd::compute_requires_grad(x, weight, bias);
  Tensor kept = wants_grad && ints[NOISE] > 0 ? output_like(x) : Tensor();
  auto run = reinterpret_cast<ForwardFn>(ints[FORWARD]);
  run(x.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(),
      ptr(defined_or_empty(track_mean)), ptr(defined_or_empty(track_second)),
      stats.data_ptr<double>(), ints[N0], ints[N1], ints[N2], ints[V], ints[BLOCKS],
      ints[ROW_BLOCKS], reals[P], reals[EPS], reals[MOMENTUM], ints[KIND],
      reals.data() + NOISE_CONF, ints[NOISE], ints[KEY], ptr(kept), kept.defined() ? 1 : 0);
  if (wants_grad) {
    auto node = c10::make_intrusive<TrainNormBackward>(
        torch::autograd::collect_next_edges(x, weight, bias));
    node->x_ = torch::autograd::SavedVariable(x, false);
    node->has_weight_ = weight.defined();
    node->has_bias_ = bias.defined();
    node->weight_ = torch::autograd::SavedVariable(weight, false);
    node->bias_ = torch::autograd::SavedVariable(bias, false);
    node->kept_ = torch::autograd::SavedVariable(kept, false);
    node->stats_ = stats;
    node->ints_ = ints;
    node->reals_ = reals;
    torch::autograd::set_history(y, node);
  }
  if (!with_stats) {
    return py::cast(y);
  }
  return py::make_tuple(y, stats.select(0, 0), stats.select(0, 1));
}

// Eval normalization without autograd (the caller checked that nothing needs a gradient).
Tensor eval(const Tensor& x, const Tensor& mean, const Tensor& spread,
            const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
            const std::vector<int64_t>& ints, double eps, bool is_var) {
  const int64_t channels = ints[CHANNELS];
  auto as_x = [&](const Tensor& t) {
    return t.scalar_type() == x.scalar_type() && t.device() == x.device() && t.is_contiguous()
               ? t
               : t.to(x.options()).contiguous();
  };
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

// One noise key from a CPU generator (the default one when none is given), the value
// ``torch.empty(1, dtype=torch.int64).random_(generator=g).item()`` draws: random64() mod 2^63
// under the generator's lock. It spares a noisy layer the tensor call per step.
int64_t draw_key(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return static_cast<int64_t>(gen->random64() %
                              (static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) + 1));
}

// The output cache's limit in bytes (set when given), and the bytes it holds.
std::pair<size_t, size_t> output_cache_state(const std::optional<int64_t>& limit) {
  if (limit.has_value()) {
    TORCH_CHECK(*limit >= 0, "bnlab: the output cache limit must be >= 0 bytes, got ", *limit);
    output_cache()->set_limit(static_cast<size_t>(*limit));
  }
  return output_cache()->state();
}

// num_batches_tracked += 1 for a plain CPU int64 counter (the torch call from Python cost 1.5 to
// 3 us a step, a tenth of a small layer's step), as add_(1) does it: the version counter moves.
// Anything else (inference tensors, other devices or dtypes, wrapped or Python-subclass tensors
// as under torch.func or fake tensors) goes through add_ itself.
// Whether the glue may write a module's int64 buffer of ``numel`` values in place itself: a
// plain contiguous CPU int64 tensor (no inference tensor, no autograd, no Python or wrapper
// subclass).
bool plain_int64_buffer(const Tensor& t, int64_t numel) {
  return t.is_cpu() && t.scalar_type() == at::kLong && t.numel() == numel && t.is_contiguous() &&
         !t.is_inference() && !t.requires_grad() && !t.key_set().has(c10::DispatchKey::Python) &&
         typeid(*t.unsafeGetTensorImpl()) == typeid(c10::TensorImpl);
}

void count_batch(Tensor& counter) {
  if (plain_int64_buffer(counter, 1)) {
    *counter.data_ptr<int64_t>() += 1;
    counter.unsafeGetTensorImpl()->bump_version();
    return;
  }
  counter.add_(1);
}

// lowbias32 (C. Wellons), keyed, on uint32: noise.hash32 for a counter and key words below 2^32.
uint32_t hash32(uint32_t counter, uint32_t k0, uint32_t k1) {
  uint32_t x = counter ^ k0;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x + k1;
}

// A noisy layer's next step key from its buffers, the base key (2,) and the step counter: the
// packed noise.step_key(base, step) (low word first), with the counter moved on as add_(1)
// moves it (version counter included), in 0.23 us: the Python calls (tolist, int, add_ and two
// hashes on Python ints) cost about 5 us a step. Returns -1, touching nothing, unless both are
// plain_int64_buffer and the key words and the step are non-negative with the words below
// 2^32; the caller then takes the Python way.
int64_t next_noise_key(Tensor& base, Tensor& steps) {
  if (!plain_int64_buffer(base, 2) || !plain_int64_buffer(steps, 1)) {
    return -1;
  }
  const int64_t* words = base.data_ptr<int64_t>();
  int64_t* step = steps.data_ptr<int64_t>();
  constexpr int64_t kWord = int64_t{1} << 32;
  if (words[0] < 0 || words[0] >= kWord || words[1] < 0 || words[1] >= kWord || *step < 0 ||
      *step > std::numeric_limits<int64_t>::max() / 2 - 1) {
    return -1;
  }
  const auto k0 = static_cast<uint32_t>(words[0]);
  const auto k1 = static_cast<uint32_t>(words[1]);
  const auto counter = static_cast<uint32_t>(static_cast<uint64_t>(*step) * 2);
  const uint32_t low = hash32(counter, k0, k1);
  const uint32_t high = hash32(counter + 1, k0, k1) & 0x7FFFFFFFu;
  *step += 1;
  steps.unsafeGetTensorImpl()->bump_version();
  return static_cast<int64_t>(low) | (static_cast<int64_t>(high) << 32);
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
  m.def("count_batch", &bnlab::count_batch, "counter += 1, as counter.add_(1)");
  m.def("next_noise_key", &bnlab::next_noise_key,
        "A noisy layer's packed step key from its buffers, the step counter moved on; -1: none");
  m.def("output_like", &bnlab::output_like, "An output with x's shape and strides");
  m.def("output_cache", &bnlab::output_cache_state,
        "(bytes held, limit) of the cache of freed large outputs; sets the limit when given",
        py::arg("limit") = py::none());
  m.def("draw_key", &bnlab::draw_key, "A noise key from a CPU generator (as int64 random_)");
}
