// icecache._core: the Python binding of libicecache_client (client/include/icecache/client.h).
//
// Thin on purpose (CONVENTIONS.md 20): every call goes straight to the C++ API. What this file
// adds is only what a binding must: tensors are taken through DLPack (numpy arrays, PyTorch
// tensors on the CPU or a CUDA device, anything with __dlpack__) without a copy, after their
// shape, dtype, layout and device are checked against the sequence's geometry (the C++ API
// takes raw pointers and cannot); a non-OK absl::Status becomes the icecache.errors exception
// of its code; the GIL is released while the client works.
//
// Optional parts of the C++ API (SequenceOptions::selection and drift_threshold, the async
// selection counters) are bound when the header has them, detected at compile time, so this
// file builds against the API before and after they land.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "icecache/attachment.h"
#include "icecache/client.h"
#if __has_include("common/paths.h")  // in the project's tree (not in an installed one)
#include "common/paths.h"
#define ICECACHE_PY_HAVE_PATHS 1
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace icecache::python {
namespace {

// ------------------------------------------------------------------------------ statuses
// A non-OK status on its way to Python (translated by the translator registered below).
struct StatusError {
  absl::Status status;
};

void Check(const absl::Status& status) {
  if (!status.ok()) throw StatusError{status};
}

template <typename T>
T Value(absl::StatusOr<T>&& value) {
  if (!value.ok()) throw StatusError{value.status()};
  return *std::move(value);
}

// Raises icecache.errors.error_from_status(code, message): the exception class of the code,
// with .code and .message.
void TranslateStatusError(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const StatusError& e) {
    nb::object errors = nb::module_::import_("icecache.errors");
    nb::object exc = errors.attr("error_from_status")(static_cast<int>(e.status.code()),
                                                      std::string(e.status.message()));
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  }
}

[[noreturn]] void InvalidArgument(const std::string& message) {
  throw StatusError{absl::InvalidArgumentError(message)};
}

// A request timeout in seconds: finite and positive (a day at most), else InvalidArgumentError
// (infinity overflowed the deadline and made every request time out at once).
void CheckTimeout(double seconds) {
  if (!(seconds > 0) || seconds > 86400) {
    InvalidArgument("timeout must be in (0, 86400] seconds, got " + std::to_string(seconds));
  }
}

// ------------------------------------------------------------------------------- tensors
// A tensor argument as the C++ API needs it: a DLTensor view (nanobind's dlpack::dltensor has
// DLPack's layout). Two ways in, neither copies:
//   - the DLPack C exchange API (`type(t).__dlpack_c_exchange_api__`, DLPack 1.2+; PyTorch has
//     it): the producer fills a DLTensor in C, no Python call, no allocation; tens of
//     nanoseconds against microseconds for a __dlpack__() call, which matters on a per-layer,
//     per-token call;
//   - otherwise nanobind's ndarray import (__dlpack__ or the buffer protocol: numpy and every
//     other DLPack producer), which also refuses read-only arrays for `out`.
// The view is valid while the Python object lives (the call holds it).
namespace dlx {  // the DLPack exchange API's C structs (dlpack.h, DLPack 1.2+)
struct Version {
  uint32_t major, minor;
};
struct Header {
  Version version;
  Header* prev_api;
};
struct Api {
  Header header;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, nb::dlpack::dltensor* out);
  void* current_work_stream;
};

// The exchange API of `type`, or null (cached per type; types live as long as the process in
// practice, and a stale entry could only be reused by a type at the same address).
const Api* ExchangeApi(PyTypeObject* type) {
  static PyTypeObject* cached_type = nullptr;
  static const Api* cached_api = nullptr;
  if (type == cached_type) return cached_api;
  const Api* api = nullptr;
  PyObject* capsule =
      PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), "__dlpack_c_exchange_api__");
  if (capsule == nullptr) {
    PyErr_Clear();
  } else {
    auto* a = static_cast<const Api*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
    if (a == nullptr) PyErr_Clear();
    if (a != nullptr && a->header.version.major == 1 && a->header.version.minor >= 2 &&
        a->dltensor_from_py_object_no_sync != nullptr) {
      api = a;
    }
    Py_DECREF(capsule);
  }
  cached_type = type;
  cached_api = api;
  return api;
}
}  // namespace dlx

struct TensorArg {
  nb::dlpack::dltensor view{};
  int64_t shape[8];
  int64_t strides[8];
  std::optional<nb::ndarray<nb::ro>> in;  // the fallback import, kept for the call
  std::optional<nb::ndarray<>> out;
};

// Fills `arg` from `obj`; `writable`: the library writes it. INVALID_ARGUMENT when `obj` is no
// tensor (or a read-only one where `writable`).
void Import(nb::handle obj, const char* name, bool writable, TensorArg* arg) {
  if (const dlx::Api* api = dlx::ExchangeApi(Py_TYPE(obj.ptr()))) {
    // The exchange takes a tensor that requires grad, which __dlpack__ refuses: written in
    // place behind autograd's back, it would carry gradients of what it held before.
    if (writable && nb::hasattr(obj, "requires_grad") &&
        PyObject_IsTrue(obj.attr("requires_grad").ptr()) == 1) {
      InvalidArgument(std::string(name) +
                      ": a tensor that requires grad is not written in place (detach it)");
    }
    if (api->dltensor_from_py_object_no_sync(obj.ptr(), &arg->view) == 0) return;
    PyErr_Clear();  // not a tensor it exports: the fallback below says why
  }
  auto fill = [&](const auto& a) {
    const size_t n = std::min<size_t>(a.ndim(), 8);
    arg->view.data = const_cast<void*>(static_cast<const void*>(a.data()));
    arg->view.device.device_type = a.device_type();
    arg->view.device.device_id = a.device_id();
    arg->view.ndim = static_cast<int32_t>(n);
    arg->view.dtype = a.dtype();
    arg->view.byte_offset = 0;  // data() includes it
    for (size_t i = 0; i < n; ++i) {
      arg->shape[i] = a.shape(i);
      arg->strides[i] = a.stride(i);
    }
    arg->view.shape = arg->shape;
    arg->view.strides = arg->strides;
  };
  try {
    if (writable) {
      fill(arg->out.emplace(nb::cast<nb::ndarray<>>(obj, /*convert=*/false)));
    } else {
      fill(arg->in.emplace(nb::cast<nb::ndarray<nb::ro>>(obj, /*convert=*/false)));
    }
  } catch (const std::exception&) {
    PyErr_Clear();
    InvalidArgument(std::string(name) + ": expected a " + (writable ? "writable " : "") +
                    "tensor (numpy array, torch.Tensor, anything with __dlpack__)");
  }
}

std::string ShapeString(size_t ndim, const int64_t* shape) {
  std::string s = "(";
  for (size_t i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (ndim == 1 ? ",)" : ")");
}

// The data pointer of tensor `obj` after checking it against what the sequence expects:
// `shape` exactly (-1: any extent), C-contiguous (no copy is ever made, so `out` is written
// where the caller looks), 16-bit elements of the geometry's dtype (float16 / bfloat16, or
// their raw bits as uint16 / int16, since numpy has no bfloat16), and memory of the client's
// mode (host memory in CPU mode; the client's CUDA device in CUDA mode). INVALID_ARGUMENT
// otherwise. `arg` holds what keeps the view valid.
void* TensorData(nb::handle obj, const char* name, std::initializer_list<int64_t> shape,
                 DType dtype, ExecutionMode mode, int device, bool writable, TensorArg* arg) {
  Import(obj, name, writable, arg);
  const nb::dlpack::dltensor& a = arg->view;
  const std::vector<int64_t> want(shape);
  bool shape_ok = static_cast<size_t>(a.ndim) == want.size();
  for (size_t i = 0; shape_ok && i < want.size(); ++i) {
    shape_ok = want[i] < 0 ? a.shape[i] > 0 : a.shape[i] == want[i];
  }
  if (!shape_ok) {
    std::vector<int64_t> got(a.shape, a.shape + a.ndim);
    InvalidArgument(std::string(name) + ": shape " + ShapeString(got.size(), got.data()) +
                    ", expected " + ShapeString(want.size(), want.data()));
  }
  if (a.strides != nullptr) {
    int64_t expected_stride = 1;
    for (int32_t i = a.ndim; i-- > 0;) {
      if (a.shape[i] != 1 && a.strides[i] != expected_stride) {
        InvalidArgument(std::string(name) +
                        ": not C-contiguous (no copy is made; pass .contiguous() / "
                        "np.ascontiguousarray)");
      }
      expected_stride *= a.shape[i];
    }
  }
  const nb::dlpack::dtype t = a.dtype;
  const bool raw16 = t.bits == 16 && t.lanes == 1 &&
                     (t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt) ||
                      t.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int));
  const uint8_t want_code = static_cast<uint8_t>(
      dtype == DType::kBF16 ? nb::dlpack::dtype_code::Bfloat : nb::dlpack::dtype_code::Float);
  if (!raw16 && !(t.code == want_code && t.bits == 16 && t.lanes == 1)) {
    InvalidArgument(std::string(name) + ": dtype must be " +
                    (dtype == DType::kBF16 ? "bfloat16" : "float16") +
                    " (the sequence's), or its raw bits as uint16");
  }
  const int32_t dev = a.device.device_type;
  if (mode == ExecutionMode::kCuda) {
    if (dev != nb::device::cuda::value && dev != nb::device::cuda_managed::value) {
      InvalidArgument(std::string(name) + ": the client is in CUDA mode; pass a CUDA tensor");
    }
    if (a.device.device_id != device) {
      InvalidArgument(std::string(name) + ": on CUDA device " + std::to_string(a.device.device_id) +
                      ", the client uses device " + std::to_string(device));
    }
  } else if (dev != nb::device::cpu::value && dev != nb::device::cuda_host::value) {
    InvalidArgument(std::string(name) + ": the client is in CPU mode; pass host memory");
  }
  return static_cast<uint8_t*>(a.data) + a.byte_offset;
}

// A stream argument: None (the default stream), an integer handle (cudaStream_t), or an object
// with a `cuda_stream` integer attribute (torch.cuda.Stream). Ignored in CPU mode.
void* StreamHandle(const nb::handle& stream) {
  if (stream.is_none()) return nullptr;
  nb::handle h = stream;
  nb::object attr;
  if (nb::hasattr(stream, "cuda_stream")) {
    attr = stream.attr("cuda_stream");
    h = attr;
  }
  uintptr_t value = 0;
  if (!nb::try_cast<uintptr_t>(h, value)) {
    InvalidArgument(
        "stream: expected None, an integer cudaStream_t or an object with .cuda_stream");
  }
  return reinterpret_cast<void*>(value);
}

// ------------------------------------------------------------------------------ wrappers
// What a Python Sequence needs of its Client besides the C++ object: the mode and device its
// tensors must match. The C++ Sequence is owned here; keep_alive ties its life to the Client.
bool Finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

struct PySequence {
  PySequence(std::unique_ptr<Sequence> s, ExecutionMode m, int d)
      : sequence(std::move(s)), mode(m), device(d) {}
  PySequence(const PySequence&) = delete;
  PySequence& operator=(const PySequence&) = delete;
  // The C++ Sequence's destructor drops it in the daemon (a round trip, which a daemon that is
  // gone can stretch to the reconnect timeout): without the GIL, so that other Python threads
  // go on meanwhile (not while the interpreter is finalizing: then it keeps the GIL).
  ~PySequence() {
    if (sequence != nullptr && PyGILState_Check() && !Finalizing()) {
      nb::gil_scoped_release release;
      sequence.reset();
    }
  }

  std::unique_ptr<Sequence> sequence;
  ExecutionMode mode;
  int device;
  // A call that runs the C++ Sequence holds it (InUse): a Sequence serves one thread at a
  // time, and a second thread's call (a drop() during a decode, say) must get an error, not
  // run against a sequence being changed or freed under the first.
  std::atomic<bool> busy{false};

  Sequence& get() {
    // After drop() the C++ Sequence still exists (calls get FAILED_PRECONDITION from it).
    return *sequence;
  }
};

// Holds a sequence for the calling thread; FailedPreconditionError when another thread holds it.
class InUse {
 public:
  explicit InUse(PySequence& s) : s_(&s) {
    if (s.busy.exchange(true, std::memory_order_acquire)) {
      s_ = nullptr;
      throw StatusError{absl::FailedPreconditionError(
          "the sequence is in use by another thread (a Sequence serves one thread at a time)")};
    }
  }
  InUse(InUse&& other) noexcept : s_(std::exchange(other.s_, nullptr)) {}
  InUse(const InUse&) = delete;
  InUse& operator=(const InUse&) = delete;
  ~InUse() {
    if (s_ != nullptr) s_->busy.store(false, std::memory_order_release);
  }

 private:
  PySequence* s_;
};

struct PyClient {
  std::unique_ptr<Client> client;
  int device = 0;
};

// SequenceOptions::selection / drift_threshold and the async counters exist only in newer
// headers; these concepts switch their bindings on.
template <typename O>
concept HasSelectionMode = requires(O o) {
  o.selection;
  o.drift_threshold;
};
template <typename C>
concept HasAsyncCounters = requires(C c) {
  c.prefetched_selects;
  c.drift_fallback_heads;
};
template <typename B>
concept HasAsyncBreakdown = requires(B b) {
  b.select_wait_us;
  b.prefetched;
  b.drift_fallback_heads;
};

SequenceOptions MakeOptions(uint32_t num_layers, uint32_t num_q_heads, uint32_t num_kv_heads,
                            uint32_t head_dim, DType dtype, uint64_t max_tokens,
                            std::optional<uint32_t> page_size,
                            std::optional<uint32_t> budget_tokens,
                            std::optional<uint32_t> sink_tokens,
                            std::optional<uint32_t> window_tokens,
                            std::optional<uint32_t> full_kv_layers, std::string label,
                            float scale) {
  SequenceOptions o;
  o.num_layers = num_layers;
  o.num_q_heads = num_q_heads;
  o.num_kv_heads = num_kv_heads;
  o.head_dim = head_dim;
  o.dtype = dtype;
  o.max_tokens = max_tokens;
  o.page_size = page_size;
  o.budget_tokens = budget_tokens;
  o.sink_tokens = sink_tokens;
  o.window_tokens = window_tokens;
  o.full_kv_layers = full_kv_layers;
  o.label = std::move(label);
  o.scale = scale;
  return o;
}

std::unique_ptr<PySequence> Create(PyClient& c, const SequenceOptions& o) {
  std::unique_ptr<Sequence> s;
  {
    nb::gil_scoped_release release;
    absl::StatusOr<std::unique_ptr<Sequence>> created = c.client->CreateSequence(o);
    if (!created.ok()) {
      nb::gil_scoped_acquire acquire;
      Check(created.status());
    }
    s = *std::move(created);
  }
  return std::make_unique<PySequence>(std::move(s), c.client->mode(), c.device);
}

constexpr const char* kCreateDoc =
    "Registers a sequence of this geometry with the daemon (icecache.v1.SequenceGeometry).\n\n"
    "Unset optionals take the daemon's defaults (8-token pages, 256-token budget, 2 sink and\n"
    "2 window pages, 2 full-KV layers); scale 0 means 1/sqrt(head_dim).\n"
    "Raises InvalidArgumentError (the message names the field) or ResourceExhaustedError\n"
    "(memory limit).";

template <typename O = SequenceOptions>
void BindCreateSequence(nb::class_<PyClient>& cls) {
  if constexpr (HasSelectionMode<O>) {
    using Mode = decltype(O::selection);
    cls.def(
        "create_sequence",
        [](PyClient& c, uint32_t num_layers, uint32_t num_q_heads, uint32_t num_kv_heads,
           uint32_t head_dim, uint64_t max_tokens, DType dtype, std::optional<uint32_t> page_size,
           std::optional<uint32_t> budget_tokens, std::optional<uint32_t> sink_tokens,
           std::optional<uint32_t> window_tokens, std::optional<uint32_t> full_kv_layers,
           std::string label, float scale, std::optional<Mode> selection,
           std::optional<float> drift_threshold, std::optional<std::string> tail_estimate) {
          O o = MakeOptions(num_layers, num_q_heads, num_kv_heads, head_dim, dtype, max_tokens,
                            page_size, budget_tokens, sink_tokens, window_tokens, full_kv_layers,
                            std::move(label), scale);
          if (selection) o.selection = *selection;
          if (drift_threshold) o.drift_threshold = *drift_threshold;
          if (tail_estimate) {
            if (*tail_estimate == "none") {
              o.tail_estimate = TailEstimate::kNone;
            } else if (*tail_estimate == "mean") {
              o.tail_estimate = TailEstimate::kMean;
            } else if (*tail_estimate == "mean-var") {
              o.tail_estimate = TailEstimate::kMeanVariance;
            } else {
              Check(absl::InvalidArgumentError(
                  "tail_estimate must be \"none\", \"mean\" or \"mean-var\", got \"" +
                  *tail_estimate + "\""));
            }
          }
          return Create(c, o);
        },
        "num_layers"_a, "num_q_heads"_a, "num_kv_heads"_a, "head_dim"_a, "max_tokens"_a,
        nb::kw_only(), "dtype"_a = DType::kBF16, "page_size"_a = nb::none(),
        "budget_tokens"_a = nb::none(), "sink_tokens"_a = nb::none(),
        "window_tokens"_a = nb::none(), "full_kv_layers"_a = nb::none(), "label"_a = "",
        "scale"_a = 0.0f, "selection"_a = nb::none(), "drift_threshold"_a = nb::none(),
        "tail_estimate"_a = nb::none(), nb::keep_alive<0, 1>(),
        (std::string(kCreateDoc) +
         "\nselection: SelectionMode.SYNC (search on every decode) or ASYNC (one step ahead,\n"
         "drifted KV heads searched again when their query's cosine falls below\n"
         "drift_threshold); None keeps the C++ defaults.\n"
         "tail_estimate: \"none\", \"mean\" or \"mean-var\" (how the unselected pages are\n"
         "estimated); None: the daemon's default (mean-var).")
            .c_str());
  } else {
    cls.def(
        "create_sequence",
        [](PyClient& c, uint32_t num_layers, uint32_t num_q_heads, uint32_t num_kv_heads,
           uint32_t head_dim, uint64_t max_tokens, DType dtype, std::optional<uint32_t> page_size,
           std::optional<uint32_t> budget_tokens, std::optional<uint32_t> sink_tokens,
           std::optional<uint32_t> window_tokens, std::optional<uint32_t> full_kv_layers,
           std::string label, float scale) {
          return Create(c, MakeOptions(num_layers, num_q_heads, num_kv_heads, head_dim, dtype,
                                       max_tokens, page_size, budget_tokens, sink_tokens,
                                       window_tokens, full_kv_layers, std::move(label), scale));
        },
        "num_layers"_a, "num_q_heads"_a, "num_kv_heads"_a, "head_dim"_a, "max_tokens"_a,
        nb::kw_only(), "dtype"_a = DType::kBF16, "page_size"_a = nb::none(),
        "budget_tokens"_a = nb::none(), "sink_tokens"_a = nb::none(),
        "window_tokens"_a = nb::none(), "full_kv_layers"_a = nb::none(), "label"_a = "",
        "scale"_a = 0.0f, nb::keep_alive<0, 1>(), kCreateDoc);
  }
}

template <typename O = SequenceOptions>
void BindSelectionMode(nb::module_& m) {
  if constexpr (HasSelectionMode<O>) {
    using Mode = decltype(O::selection);
    nb::enum_<Mode>(m, "SelectionMode",
                    "How a decode step of an offloaded layer gets its pages (C++ SelectionMode).")
        .value("SYNC", Mode::kSync, "Each decode sends its query and waits for the search.")
        .value("ASYNC", Mode::kAsync,
               "One step ahead; drifted KV heads fall back to a synchronous search.");
    m.attr("HAS_SELECTION_MODE") = true;
  } else {
    m.attr("HAS_SELECTION_MODE") = false;
  }
}

template <typename C = ClientCounters>
void BindCounters(nb::module_& m) {
  auto cls = nb::class_<C>(m, "ClientCounters",
                           "Counters of one client (all its sequences), as the daemon exports "
                           "them.")
                 .def_ro("cache_hits", &C::cache_hits)
                 .def_ro("cache_misses", &C::cache_misses)
                 .def_ro("fetched_bytes", &C::fetched_bytes)
                 .def_ro("fetch_nanoseconds", &C::fetch_nanoseconds)
                 .def_ro("decode_steps", &C::decode_steps)
                 .def_prop_ro("hit_rate", &C::hit_rate,
                              "Selected pages already resident / selected pages (0 when none).");
  if constexpr (HasAsyncCounters<C>) {
    cls.def_ro("prefetched_selects", &C::prefetched_selects,
               "Offloaded layer steps served by a one-step-ahead select.");
    cls.def_ro("drift_fallback_heads", &C::drift_fallback_heads,
               "KV heads searched again because their query moved.");
  }
}

// Client::DecodeBatch (continuous batching: one layer's step for a batch of sequences) is
// bound where the header has it.
template <typename C>
concept HasDecodeBatch = requires(C& c, uint32_t layer, const std::vector<Sequence*>& batch,
                                  const void* in, void* out, void* stream,
                                  std::vector<absl::Status>* statuses) {
  c.DecodeBatch(layer, batch, in, in, in, out, stream, statuses);
};

// The exception of a failed DecodeBatch, carrying every sequence's own result as
// `.statuses` (None for the ones that went through).
[[noreturn]] void RaiseBatch(const absl::Status& status,
                             const std::vector<absl::Status>& statuses) {
  nb::object errors = nb::module_::import_("icecache.errors");
  nb::object exc = errors.attr("error_from_status")(static_cast<int>(status.code()),
                                                    std::string(status.message()));
  nb::list each;
  for (const absl::Status& s : statuses) {
    if (s.ok()) {
      each.append(nb::none());
    } else {
      each.append(
          errors.attr("error_from_status")(static_cast<int>(s.code()), std::string(s.message())));
    }
  }
  exc.attr("statuses") = each;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw nb::python_error();
}

template <typename C = Client>
void BindDecodeBatch(nb::class_<PyClient>& cls, nb::module_& m) {
  if constexpr (HasDecodeBatch<C>) {
    m.attr("HAS_DECODE_BATCH") = true;
    cls.def(
        "decode_batch",
        [](PyClient& c, uint32_t layer, nb::sequence sequences, nb::handle q, nb::handle k_new,
           nb::handle v_new, nb::handle out, nb::handle stream) {
          // The Python objects are held for the whole call (the list may change, and drop
          // its last reference to one, in another thread while the GIL is released), and
          // each sequence is held against other threads' calls.
          std::vector<nb::object> keep;
          for (nb::handle item : sequences) keep.push_back(nb::borrow(item));
          if (keep.empty()) InvalidArgument("decode_batch: an empty batch");
          std::vector<Sequence*> batch;
          std::vector<PySequence*> py;
          for (const nb::object& item : keep) {
            if (item.is_none()) InvalidArgument("decode_batch: None in the batch");
            PySequence* s = nullptr;
            if (!nb::try_cast<PySequence*>(item, s) || s == nullptr) {
              InvalidArgument("decode_batch: the batch holds something other than a Sequence");
            }
            if (std::find(py.begin(), py.end(), s) != py.end()) {
              InvalidArgument("decode_batch: a sequence is twice in the batch");
            }
            py.push_back(s);
            batch.push_back(s->sequence.get());
          }
          std::vector<InUse> held;
          held.reserve(py.size());
          for (PySequence* s : py) held.emplace_back(*s);
          // The shapes of the batch's first sequence; the library checks that all match.
          const ResolvedGeometry& g = batch[0]->geometry();
          const int64_t n = static_cast<int64_t>(batch.size());
          const int64_t hq = g.num_q_heads, hk = g.num_kv_heads, d = g.head_dim;
          const ExecutionMode mode = c.client->mode();
          TensorArg qa, ka, va, oa;
          const void* qp = TensorData(q, "q", {n, hq, d}, g.dtype, mode, c.device, false, &qa);
          const void* kp =
              TensorData(k_new, "k_new", {n, hk, d}, g.dtype, mode, c.device, false, &ka);
          const void* vp =
              TensorData(v_new, "v_new", {n, hk, d}, g.dtype, mode, c.device, false, &va);
          void* op = TensorData(out, "out", {n, hq, d}, g.dtype, mode, c.device, true, &oa);
          void* st = StreamHandle(stream);
          std::vector<absl::Status> statuses;
          absl::Status status;
          {
            nb::gil_scoped_release release;
            C& client = *c.client;  // C: a dependent name, so the call is checked when bound
            status = client.DecodeBatch(layer, batch, qp, kp, vp, op, st, &statuses);
          }
          if (!status.ok()) RaiseBatch(status, statuses);
        },
        "layer"_a, "sequences"_a, "q"_a, "k_new"_a, "v_new"_a, "out"_a, "stream"_a = nb::none(),
        "One decode step of `layer` for a batch of this client's sequences (continuous\n"
        "batching: any of them, in the engine's order, of different lengths): one select\n"
        "request, one gather and one attention launch for the batch (C++ Client::DecodeBatch).\n"
        "q, out: [batch, num_q_heads, head_dim]; k_new, v_new: [batch, num_kv_heads,\n"
        "head_dim]; out written in place. The sequences share heads, head_dim, dtype, page size\n"
        "and scale. A sequence that fails does not stop the others (its rows are zeros): the\n"
        "call then raises the first one's error, naming it, with `.statuses` listing every\n"
        "sequence's (None where it went through). InvalidArgumentError (nothing done) for an\n"
        "empty batch, a sequence twice or of another client, or sequences that do not match.");
  } else {
    m.attr("HAS_DECODE_BATCH") = false;
  }
}

template <typename B = DecodeBreakdown>
void BindBreakdown(nb::module_& m) {
  auto cls =
      nb::class_<B>(m, "DecodeBreakdown",
                    "What the last decode call of a sequence did; times in microseconds.")
          .def_ro("layer", &B::layer)
          .def_ro("full_kv", &B::full_kv)
          .def_ro("attended_tokens", &B::attended_tokens,
                  "Summed over KV heads: sink + window + valid page tokens.")
          .def_ro("selected_pages", &B::selected_pages, "Over all KV heads.")
          .def_ro("hits", &B::hits)
          .def_ro("misses", &B::misses)
          .def_ro("wait_us", &B::wait_us, "Waiting for this layer's pending prefill or append.")
          .def_ro("select_us", &B::select_us)
          .def_ro("fetch_us", &B::fetch_us)
          .def_ro("attention_us", &B::attention_us)
          .def_ro("total_us", &B::total_us);
  if constexpr (HasAsyncBreakdown<B>) {
    cls.def_ro("select_wait_us", &B::select_wait_us,
               "Time the decode waited for the daemon's pages on its critical path.");
    cls.def_ro("prefetched", &B::prefetched, "The step used pages selected one step ahead.");
    cls.def_ro("drift_fallback_heads", &B::drift_fallback_heads);
  }
}

// [count][head_dim] uint16 rows (the dtype's bits) as a numpy array that owns them.
nb::ndarray<nb::numpy, uint16_t> RowsArray(std::vector<uint16_t> rows, uint32_t count,
                                           uint32_t head_dim) {
  auto* owned = new std::vector<uint16_t>(std::move(rows));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<uint16_t>*>(p); });
  return nb::ndarray<nb::numpy, uint16_t>(owned->data(), {count, head_dim}, owner);
}

}  // namespace
}  // namespace icecache::python

NB_MODULE(_core, m) {
  using namespace icecache;
  using namespace icecache::python;
  m.doc() =
      "The IceCache client library (libicecache_client) for Python: attach to icecached, create\n"
      "sequences, prefill and decode with tensors passed through DLPack without copies.";
  nb::register_exception_translator(TranslateStatusError);

  nb::enum_<ExecutionMode>(m, "ExecutionMode", "Where the client runs its data and kernels.")
      .value("AUTO", ExecutionMode::kAuto, "CUDA when a device is usable, else CPU.")
      .value("CPU", ExecutionMode::kCpu, "Host memory and the kernels' CPU references.")
      .value("CUDA", ExecutionMode::kCuda, "Device memory and the CUDA kernels.");
  nb::enum_<DType>(m, "DType", "Element type of the stored K and V rows.")
      .value("BF16", DType::kBF16)
      .value("FP16", DType::kFP16);
  BindSelectionMode(m);
  BindCounters(m);
  BindBreakdown(m);

  nb::class_<ResolvedGeometry>(m, "Geometry",
                               "The geometry the daemon resolved (defaults applied).")
      .def_ro("num_layers", &ResolvedGeometry::num_layers)
      .def_ro("num_q_heads", &ResolvedGeometry::num_q_heads)
      .def_ro("num_kv_heads", &ResolvedGeometry::num_kv_heads)
      .def_ro("head_dim", &ResolvedGeometry::head_dim)
      .def_ro("dtype", &ResolvedGeometry::dtype)
      .def_ro("max_tokens", &ResolvedGeometry::max_tokens)
      .def_ro("page_size", &ResolvedGeometry::page_size)
      .def_ro("budget_tokens", &ResolvedGeometry::budget_tokens)
      .def_ro("sink_tokens", &ResolvedGeometry::sink_tokens)
      .def_ro("window_tokens", &ResolvedGeometry::window_tokens)
      .def_ro("full_kv_layers", &ResolvedGeometry::full_kv_layers)
      .def_prop_ro("selected_pages", &ResolvedGeometry::selected_pages,
                   "Pages selected per KV head and step.");

  auto client = nb::class_<PyClient>(
      m, "Client",
      "An attachment to icecached (C++ icecache::Client). Create with Client.attach(). "
      "Thread-safe; its sequences keep it alive.");
  client
      .def_static(
          "attach",
          [](const std::string& socket, ExecutionMode mode, int device, uint32_t cpu_threads,
             double cache_factor, bool profile, double timeout) {
            CheckTimeout(timeout);
            ClientOptions o;
            o.socket = socket;
            o.mode = mode;
            o.device = device;
            o.cpu_threads = cpu_threads;
            o.cache_factor = cache_factor;
            o.profile = profile;
            o.timeout = absl::Seconds(timeout);
            absl::StatusOr<std::unique_ptr<Client>> c;
            {
              nb::gil_scoped_release release;
              c = Client::Attach(o);
            }
            auto py = std::make_unique<PyClient>();
            py->client = Value(std::move(c));
            py->device = device;
            return py;
          },
          "socket"_a = "", nb::kw_only(), "mode"_a = ExecutionMode::kAuto, "device"_a = 0,
          "cpu_threads"_a = 0, "cache_factor"_a = 2.0, "profile"_a = false, "timeout"_a = 60.0,
          "Attaches to the daemon at `socket` (empty: the default path).\n\n"
          "mode: ExecutionMode (AUTO picks CUDA when a device is usable); device: CUDA device;\n"
          "cpu_threads: CPU mode's pool (0 = every core); cache_factor: page-cache slots per\n"
          "(layer, KV head) as a multiple of the selected pages; profile: time each decode's\n"
          "phases separately (synchronizes); timeout: seconds per daemon request.\n"
          "Raises UnavailableError (no daemon), PermissionDeniedError, FailedPreconditionError\n"
          "(CUDA asked for without a usable device).")
      .def_prop_ro(
          "mode", [](const PyClient& c) { return c.client->mode(); }, "The mode in force.")
      .def_prop_ro(
          "device", [](const PyClient& c) { return c.device; }, "CUDA device (CUDA mode).")
      .def_prop_ro(
          "token",
          [](PyClient& c) {
            // A recovery in another thread holds the attachment for as long as it takes.
            nb::gil_scoped_release release;
            return std::string(c.client->attachment().token());
          },
          "The attachment's token: the icecache-client-token metadata of gRPC calls that see "
          "this client's sequences (icecache.operator).")
      .def(
          "counters",
          [](const PyClient& c) {
            nb::gil_scoped_release release;  // as token: a recovery may hold the transport
            return c.client->counters();
          },
          "Hits, misses, fetched bytes and time, decode steps of all this client's sequences.");
  BindCreateSequence(client);

  nb::class_<Attachment>(m, "OperatorAttachment",
                         "An operator attachment (C++ icecache::Attachment with as_operator): its "
                         "token sees and drops every client's sequences over gRPC. Granted to the "
                         "daemon's --operator-uids.")
      .def_static(
          "attach",
          [](const std::string& socket, double timeout) {
            CheckTimeout(timeout);
            Attachment::Options o;
            o.socket = socket;
            o.as_operator = true;
            o.timeout = absl::Seconds(timeout);
            absl::StatusOr<std::unique_ptr<Attachment>> a;
            {
              nb::gil_scoped_release release;
              a = Attachment::Attach(o);
            }
            return Value(std::move(a));
          },
          "socket"_a = "", "timeout"_a = 5.0,
          "Attaches to the daemon at `socket` (empty: the default) as an operator. Raises "
          "UnavailableError, PermissionDeniedError.")
      .def_prop_ro("token", &Attachment::token, "The icecache-client-token metadata value.")
      .def_prop_ro("client_id", &Attachment::client_id);
#ifdef ICECACHE_PY_HAVE_PATHS
  m.def(
      "default_socket_path", [] { return DefaultSocketPath(); },
      "The daemon's default control socket ($ICECACHE_SOCKET, /run/icecache/icecached.sock as "
      "root, else under $XDG_RUNTIME_DIR or /tmp), as icecached and the CLI resolve it.");
#endif

  nb::class_<PySequence>(m, "Sequence", nb::is_weak_referenceable(),
                         "One sequence's KV cache in icecached (C++ icecache::Sequence). Used by "
                         "one thread at a time: prefill, decode, drop and last_attended from a "
                         "second thread while one runs raise FailedPreconditionError.")
      .def_prop_ro(
          "handle", [](PySequence& s) { return s.get().handle(); }, "The daemon's handle.")
      .def_prop_ro(
          "geometry", [](PySequence& s) { return s.get().geometry(); },
          "The resolved geometry (every default applied).")
      .def(
          "prefill",
          [](PySequence& s, uint32_t layer, nb::handle k, nb::handle v, nb::handle stream) {
            InUse held(s);
            const ResolvedGeometry& g = s.get().geometry();
            const int64_t hk = g.num_kv_heads, d = g.head_dim;
            TensorArg ka, va;
            const void* kp = TensorData(k, "k", {-1, hk, d}, g.dtype, s.mode, s.device, false, &ka);
            const void* vp = TensorData(v, "v", {ka.view.shape[0], hk, d}, g.dtype, s.mode,
                                        s.device, false, &va);
            const int64_t tokens = ka.view.shape[0];
            void* st = StreamHandle(stream);
            absl::Status status;
            {
              nb::gil_scoped_release release;
              status = s.get().Prefill(layer, kp, vp, static_cast<uint32_t>(tokens), st);
            }
            Check(status);
          },
          "layer"_a, "k"_a, "v"_a, "stream"_a = nb::none(),
          "The prompt's K and V of `layer`: [tokens, num_kv_heads, head_dim] each (token-major,\n"
          "as engines produce them), positions 0..tokens-1, dtype of the geometry. Every layer\n"
          "gets the same number of tokens, once. The daemon builds the layer's index in the\n"
          "background; the layer's first decode waits for it.\n"
          "Raises InvalidArgumentError, FailedPreconditionError (layer prefilled already),\n"
          "ResourceExhaustedError (past max_tokens or the memory limit).")
      .def(
          "decode",
          [](PySequence& s, uint32_t layer, nb::handle q, nb::handle k_new, nb::handle v_new,
             nb::handle out, nb::handle stream) {
            InUse held(s);
            const ResolvedGeometry& g = s.get().geometry();
            const int64_t hq = g.num_q_heads, hk = g.num_kv_heads, d = g.head_dim;
            TensorArg qa, ka, va, oa;
            const void* qp = TensorData(q, "q", {hq, d}, g.dtype, s.mode, s.device, false, &qa);
            const void* kp =
                TensorData(k_new, "k_new", {hk, d}, g.dtype, s.mode, s.device, false, &ka);
            const void* vp =
                TensorData(v_new, "v_new", {hk, d}, g.dtype, s.mode, s.device, false, &va);
            void* op = TensorData(out, "out", {hq, d}, g.dtype, s.mode, s.device, true, &oa);
            void* st = StreamHandle(stream);
            absl::Status status;
            {
              nb::gil_scoped_release release;
              status = s.get().Decode(layer, qp, kp, vp, op, st);
            }
            Check(status);
          },
          "layer"_a, "q"_a, "k_new"_a, "v_new"_a, "out"_a, "stream"_a = nb::none(),
          "One decode step of `layer`: appends the new token's K/V (k_new, v_new:\n"
          "[num_kv_heads, head_dim]), selects the pages matching q ([num_q_heads, head_dim]),\n"
          "fetches the missed ones and writes the attention of every query head to out\n"
          "([num_q_heads, head_dim], written in place). Every layer of a step is decoded before\n"
          "the next step's layers. CUDA mode: CUDA tensors, work enqueued on `stream` (None,\n"
          "an int cudaStream_t, or a torch.cuda.Stream).\n"
          "Raises FailedPreconditionError (layer not prefilled, out of step, or dropped).")
      .def(
          "drop",
          [](PySequence& s) {
            InUse held(s);
            absl::Status status;
            {
              nb::gil_scoped_release release;
              status = s.get().Drop();
            }
            Check(status);
          },
          "Frees the sequence in the daemon and the client. Later calls raise "
          "FailedPreconditionError, as a drop() while another thread's call runs on the "
          "sequence does (nothing dropped).")
      .def(
          "tokens", [](PySequence& s, uint32_t layer) { return s.get().tokens(layer); }, "layer"_a,
          "Tokens of `layer` so far (prompt + decoded).")
      .def_prop_ro(
          "kv_device_bytes", [](PySequence& s) { return s.get().kv_device_bytes(); },
          "K/V bytes kept in the mode's memory (device memory in CUDA mode).")
      .def(
          "last_decode", [](PySequence& s) { return s.get().last_decode(); },
          "What the last decode call did (DecodeBreakdown).")
      .def(
          "last_attended",
          [](PySequence& s, uint32_t layer, uint32_t head) {
            InUse held(s);
            Sequence::AttendedRows rows = Value(s.get().LastAttended(layer, head));
            const uint32_t d = s.get().geometry().head_dim;
            return nb::make_tuple(RowsArray(std::move(rows.k), rows.count, d),
                                  RowsArray(std::move(rows.v), rows.count, d));
          },
          "layer"_a, "head"_a,
          "The K and V rows ([count, head_dim] uint16 bits of the dtype) the last decode of\n"
          "`layer` attended for KV head `head`, in attention order: for tests and debugging.")
      .def("__enter__", [](nb::handle self) { return nb::borrow(self); })
      .def(
          "__exit__",
          [](PySequence& s, nb::handle, nb::handle, nb::handle) {
            InUse held(s);
            // Dropping twice is FAILED_PRECONDITION; leaving a with-block after drop() is fine.
            nb::gil_scoped_release release;
            (void)s.get().Drop();
          },
          "exc_type"_a.none(), "exc"_a.none(), "tb"_a.none());
  BindDecodeBatch(client, m);
}
