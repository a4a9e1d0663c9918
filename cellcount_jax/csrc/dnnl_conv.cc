// bfloat16 stride-1 2D/3D convolutions and their kernel gradient on the CPU's bf16 units
// (AMX tiles, AVX512-BF16), through oneDNN, as XLA FFI calls:
//
//   conv:        y[n, z, y, x, co] = sum_{t, ci} in[n, z + tz - pz, y + ty - py, x + tx - px, ci]
//                                               * k[tz, ty, tx, ci, co]  (bf16 -> float32 or bf16)
//   kernel grad: dk[tz, ty, tx, ci, co] = sum_{n, z, y, x} in[n, z + tz - pz, ...] * g[n, z, y,
//                                                                   x, co]     (bf16 -> float32)
//
// zero outside the input; float32 accumulation. Operands stay in their channels-last layout
// (oneDNN's NHWC / NDHWC kernels); only the small kernel is reordered. 2D is the case of one
// z plane and is run as a 2D primitive. The input gradient of a convolution is a convolution
// (of the output gradient with the flipped, transposed kernel), so it is `conv` too.
// Primitives are created once per shape and kept; each call brings its own scratchpads (its
// thread's, kept between calls), so concurrent calls from XLA's threads are safe. oneDNN
// picks its kernels from the CPU's features at run time; `cc_dnnl_bf16_isa` says which bf16 units it will use (the Python side
// uses this library only where there are some).
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Dims = memory::dims;
using Tag = memory::format_tag;
using Type = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution problem: input (n, d, h, w, ci), kernel (kd, kh, kw, ci, co), output
// (n, od, oh, ow, co) of type `out`, low paddings; the high ones follow from the sizes.
struct Shape {
  int64_t n, d, h, w, ci, kd, kh, kw, co, od, oh, ow, pd, ph, pw;
  Type out = Type::f32;
  bool two_d() const { return d == 1 && kd == 1 && od == 1 && pd == 0; }
  auto key() const {
    return std::make_tuple(n, d, h, w, ci, kd, kh, kw, co, od, oh, ow, pd, ph, pw,
                           static_cast<int>(out));
  }
  Dims src() const { return two_d() ? Dims{n, ci, h, w} : Dims{n, ci, d, h, w}; }
  Dims dst() const { return two_d() ? Dims{n, co, oh, ow} : Dims{n, co, od, oh, ow}; }
  Dims weights() const { return two_d() ? Dims{co, ci, kh, kw} : Dims{co, ci, kd, kh, kw}; }
  Dims strides() const { return two_d() ? Dims{1, 1} : Dims{1, 1, 1}; }
  Dims pad_lo() const { return two_d() ? Dims{ph, pw} : Dims{pd, ph, pw}; }
  Dims pad_hi() const {  // out = in + lo + hi - k + 1
    Dims hi{od - d - pd + kd - 1, oh - h - ph + kh - 1, ow - w - pw + kw - 1};
    return two_d() ? Dims{hi[1], hi[2]} : hi;
  }
  Tag act() const { return two_d() ? Tag::nhwc : Tag::ndhwc; }
  Tag ker() const { return two_d() ? Tag::hwio : Tag::dhwio; }
  memory::desc md(const Dims& dims, Type type, Tag tag) const { return {dims, type, tag}; }
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Shape& s, Type dst) {
  return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          s.md(s.src(), Type::bf16, s.act()), s.md(s.weights(), Type::bf16, Tag::any),
          s.md(s.dst(), dst, s.act()), s.strides(), s.pad_lo(), s.pad_hi(), UserScratchpad()};
}

struct Forward {
  dnnl::convolution_forward conv;
  dnnl::reorder to_weights;  // the user's (d)hwio kernel -> the primitive's layout
  memory::desc weights, scratch, reorder_scratch;
  explicit Forward(const Shape& s) {
    auto pd = ForwardDesc(s, s.out);
    auto rpd = dnnl::reorder::primitive_desc(Engine(), s.md(s.weights(), Type::bf16, s.ker()),
                                             Engine(), pd.weights_desc(), UserScratchpad());
    conv = dnnl::convolution_forward(pd);
    to_weights = dnnl::reorder(rpd);
    weights = pd.weights_desc();
    scratch = pd.scratchpad_desc();
    reorder_scratch = rpd.scratchpad_desc();
  }
};

struct KernelGrad {
  dnnl::convolution_backward_weights conv;
  dnnl::reorder to_user;  // the primitive's float32 kernel gradient -> (d)hwio
  memory::desc grad, scratch, reorder_scratch;
  explicit KernelGrad(const Shape& s) {
    auto hint = ForwardDesc(s, Type::bf16);
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, s.md(s.src(), Type::bf16, s.act()),
        s.md(s.weights(), Type::f32, Tag::any), s.md(s.dst(), Type::bf16, s.act()),
        s.strides(), s.pad_lo(), s.pad_hi(), hint, UserScratchpad());
    auto rpd = dnnl::reorder::primitive_desc(Engine(), pd.diff_weights_desc(), Engine(),
                                             s.md(s.weights(), Type::f32, s.ker()),
                                             UserScratchpad());
    conv = dnnl::convolution_backward_weights(pd);
    to_user = dnnl::reorder(rpd);
    grad = pd.diff_weights_desc();
    scratch = pd.scratchpad_desc();
    reorder_scratch = rpd.scratchpad_desc();
  }
};

template <typename P>
const P& Cached(const Shape& s) {
  static std::mutex mutex;
  static std::map<decltype(s.key()), std::unique_ptr<P>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& p = cache[s.key()];
  if (!p) p = std::make_unique<P>(s);
  return *p;
}

// Memory for a memory desc, 64-byte aligned (as oneDNN's kernels expect) and not cleared (the
// primitives write before they read): one of a thread's `kSlots` buffers, kept and grown as
// needed, so that a call does not map and fault in its scratchpads afresh (XLA runs a call on
// one of its threads; no two calls on a thread overlap).
constexpr int kSlots = 3;
memory ThreadBuffer(int slot, const memory::desc& md) {
  thread_local std::unique_ptr<uint8_t[]> bytes[kSlots];
  thread_local size_t sizes[kSlots] = {};
  const size_t need = md.get_size() + 64;
  if (sizes[slot] < need) {
    bytes[slot].reset();
    bytes[slot].reset(new uint8_t[need]);
    sizes[slot] = need;
  }
  auto at = reinterpret_cast<uintptr_t>(bytes[slot].get());
  return memory(md, Engine(), bytes[slot].get() + (-at & 63));
}

template <typename T>
memory Wrap(const Shape& s, const Dims& dims, Type type, Tag tag, T* data) {
  return memory(s.md(dims, type, tag), Engine(), const_cast<void*>(static_cast<const void*>(data)));
}

// Operands that agree: the output size follows from the input, kernel and paddings with
// non-negative high paddings, and nothing is empty.
ffi::Error Check(const Shape& s, int64_t in_channels, int64_t batch, const char* what) {
  const auto hi = s.pad_hi();
  const bool fits = std::all_of(hi.begin(), hi.end(), [](int64_t v) { return v >= 0; }) &&
                    s.pd >= 0 && s.ph >= 0 && s.pw >= 0;
  if (in_channels != s.ci || batch != s.n || !fits)
    return ffi::Error::InvalidArgument(std::string(what) + ": operand shapes do not agree");
  if (s.n < 1 || s.ci < 1 || s.co < 1 || s.od < 1 || s.oh < 1 || s.ow < 1)
    return ffi::Error::InvalidArgument(std::string(what) + ": empty operands");
  return ffi::Error::Success();
}

template <typename Buf>
bool FiveD(const Buf& b) { return b.dimensions().size() == 5; }

ffi::Error ConvImpl(ffi::Buffer<ffi::BF16> in, ffi::Buffer<ffi::BF16> k,
                    ffi::Result<ffi::AnyBuffer> y, int64_t pz, int64_t py, int64_t px) {
  if (!FiveD(in) || !FiveD(k) || !FiveD(*y))
    return ffi::Error::InvalidArgument("dnnl conv: expects (n, z, y, x, c) x (z, y, x, in, out)");
  const auto y_type = y->element_type();
  if (y_type != ffi::DataType::F32 && y_type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("dnnl conv: the result must be float32 or bfloat16");
  auto xd = in.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  Shape s{xd[0], xd[1], xd[2], xd[3], xd[4], kd[0], kd[1], kd[2], kd[4],
          yd[1], yd[2], yd[3], pz, py, px,
          y_type == ffi::DataType::F32 ? Type::f32 : Type::bf16};
  if (auto e = Check(s, kd[3], yd[0], "dnnl conv"); e.failure()) return e;
  try {
    const Forward& f = Cached<Forward>(s);
    dnnl::stream stream(Engine());
    memory weights = ThreadBuffer(0, f.weights), scratch = ThreadBuffer(1, f.scratch);
    memory user_k = Wrap(s, s.weights(), Type::bf16, s.ker(), k.typed_data());
    f.to_weights.execute(stream, {{DNNL_ARG_FROM, user_k}, {DNNL_ARG_TO, weights},
                                  {DNNL_ARG_SCRATCHPAD, ThreadBuffer(2, f.reorder_scratch)}});
    f.conv.execute(stream, {{DNNL_ARG_SRC, Wrap(s, s.src(), Type::bf16, s.act(), in.typed_data())},
                            {DNNL_ARG_WEIGHTS, weights},
                            {DNNL_ARG_DST, Wrap(s, s.dst(), s.out, s.act(), y->untyped_data())},
                            {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  } catch (const std::exception& e) {  // oneDNN's errors, or out of memory
    return ffi::Error::Internal(std::string("dnnl conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::Buffer<ffi::BF16> in, ffi::Buffer<ffi::BF16> g,
                          ffi::ResultBuffer<ffi::F32> dk, int64_t pz, int64_t py, int64_t px) {
  if (!FiveD(in) || !FiveD(g) || !FiveD(*dk))
    return ffi::Error::InvalidArgument("dnnl kernel grad: expects (n, z, y, x, c) operands");
  auto xd = in.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  Shape s{xd[0], xd[1], xd[2], xd[3], xd[4], kd[0], kd[1], kd[2], gd[4],
          gd[1], gd[2], gd[3], pz, py, px};
  if (auto e = Check(s, kd[3], gd[0], "dnnl kernel grad"); e.failure()) return e;
  try {
    const KernelGrad& b = Cached<KernelGrad>(s);
    dnnl::stream stream(Engine());
    memory grad = ThreadBuffer(0, b.grad);
    b.conv.execute(stream, {{DNNL_ARG_SRC, Wrap(s, s.src(), Type::bf16, s.act(), in.typed_data())},
                            {DNNL_ARG_DIFF_DST,
                             Wrap(s, s.dst(), Type::bf16, s.act(), g.typed_data())},
                            {DNNL_ARG_DIFF_WEIGHTS, grad},
                            {DNNL_ARG_SCRATCHPAD, ThreadBuffer(1, b.scratch)}});
    memory user = Wrap(s, s.weights(), Type::f32, s.ker(), dk->typed_data());
    b.to_user.execute(stream, {{DNNL_ARG_FROM, grad}, {DNNL_ARG_TO, user},
                               {DNNL_ARG_SCRATCHPAD, ThreadBuffer(2, b.reorder_scratch)}});
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("dnnl kernel grad: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcDnnlConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pz")
                                  .Attr<int64_t>("py")
                                  .Attr<int64_t>("px"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcDnnlConvKernelGrad, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pz")
                                  .Attr<int64_t>("py")
                                  .Attr<int64_t>("px"));

#ifndef CELLCOUNT_JAXLIB_VERSION
#define CELLCOUNT_JAXLIB_VERSION "unknown"
#endif
extern "C" const char* cc_jaxlib_version() { return CELLCOUNT_JAXLIB_VERSION; }

// The bf16 units oneDNN will use on this CPU: 2 AMX (AMX-BF16 tiles), 1 AVX512-BF16, 0 none
// (then this library is not used).
extern "C" int cc_dnnl_bf16_isa() {
  // The ISA values are bit sets, each containing the ones below it.
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto has = [isa](dnnl::cpu_isa want) {
    return (isa & static_cast<unsigned>(want)) == static_cast<unsigned>(want);
  };
  if (has(dnnl::cpu_isa::avx512_core_amx)) return 2;
  if (has(dnnl::cpu_isa::avx512_core_bf16)) return 1;
  return 0;
}
