// Stride-1 2D/3D convolution and its kernel gradient, channels last, as XLA FFI calls (CPU).
//
//   conv:        y[n, z, y, x, co] = sum_{t, ci} in[n, z + tz - pz, y + ty - py, x + tx - px, ci]
//                                               * k[tz, ty, tx, ci, co]
//   kernel grad: dk[tz, ty, tx, ci, co] = sum_{n, z, y, x} in[n, z + tz - pz, y + ty - py,
//                                                             x + tx - px, ci] * g[n, z, y, x, co]
//
// over the input positions inside the array (zero padding); 2D is the case of one z plane.
// XLA:CPU computes the kernel gradient as a convolution whose "kernel" is the image-sized
// output gradient, at a fraction of the forward convolution's speed, and has no fast 3D
// convolution. Both are register-blocked loops here, reading the operands in their natural
// channels-last layout (no im2col, no transposes): the kernel gradient keeps a block of
// (input, output) channel accumulators in registers while a chunk of output rows streams
// through, for each tap; the convolution keeps a block of (output pixels, output channels)
// while the taps and input channels stream through. Chunks of rows are shared out over XLA's
// intra-op thread pool; for the kernel gradient each worker sums into its own copy of dk and
// the copies are added at the end.
//
// The vector code is AVX-512 (`cc_native_supported` tells whether this CPU has it); the Python
// side falls back to XLA's formulation elsewhere.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  int64_t n, d, h, w, ci;       // input
  int64_t dz, dy, dx, co;       // output gradient (spatial sizes of the convolution output)
  int64_t kz, ky, kx, pz, py, px;
  const float* in;
  const float* g;
};

struct ConvProblem {
  int64_t n, d, h, w, ci;       // input
  int64_t dz, dy, dx, co;       // output
  int64_t kz, ky, kx, pz, py, px;
  const float* in;
  const float* k;               // (kz, ky, kx, ci, co)
};

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define CC_HAVE_KERNEL 1

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

// One register block: MR input channels x NR*16 output channels, over output rows [r0, r1).
template <int MR, int NR>
__attribute__((always_inline)) inline void Block(const Problem& p, int64_t r0, int64_t r1,
                                                 int64_t tz, int64_t ty, int64_t tx, int64_t c0,
                                                 int64_t o0, float* dk_tap) {
  v16 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      acc[i][j] = *reinterpret_cast<const v16u*>(dk_tap + (c0 + i) * p.co + o0 + 16 * j);
  const int64_t lo = std::max<int64_t>(0, p.px - tx);
  const int64_t hi = std::min<int64_t>(p.dx, p.w + p.px - tx);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t yo = r % p.dy, zo = (r / p.dy) % p.dz, b = r / (p.dy * p.dz);
    const int64_t zi = zo + tz - p.pz, yi = yo + ty - p.py;
    if (zi < 0 || zi >= p.d || yi < 0 || yi >= p.h || lo >= hi) continue;
    const float* xr = p.in + (((b * p.d + zi) * p.h + yi) * p.w + lo + tx - p.px) * p.ci + c0;
    const float* gr = p.g + (r * p.dx + lo) * p.co + o0;
    for (int64_t x = lo; x < hi; ++x, xr += p.ci, gr += p.co) {
      v16 gv[NR];
      for (int j = 0; j < NR; ++j) gv[j] = *reinterpret_cast<const v16u*>(gr + 16 * j);
      for (int i = 0; i < MR; ++i) {
        const float s = xr[i];
        for (int j = 0; j < NR; ++j) acc[i][j] += s * gv[j];
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      *reinterpret_cast<v16u*>(dk_tap + (c0 + i) * p.co + o0 + 16 * j) = acc[i][j];
}

// Block<M, NR> for a remainder of m <= M input channels.
template <int NR, int M>
__attribute__((always_inline)) inline void BlockTail(int m, const Problem& p, int64_t r0,
                                                     int64_t r1, int64_t tz, int64_t ty,
                                                     int64_t tx, int64_t c0, int64_t o0,
                                                     float* dk_tap) {
  if constexpr (M > 0) {
    if (m == M) return Block<M, NR>(p, r0, r1, tz, ty, tx, c0, o0, dk_tap);
    BlockTail<NR, M - 1>(m, p, r0, r1, tz, ty, tx, c0, o0, dk_tap);
  }
}

// All taps and channel blocks of output rows [r0, r1), accumulated into dk.
template <int MR, int NR>
void Rows(const Problem& p, int64_t r0, int64_t r1, float* dk) {
  for (int64_t tz = 0; tz < p.kz; ++tz)
    for (int64_t ty = 0; ty < p.ky; ++ty)
      for (int64_t tx = 0; tx < p.kx; ++tx) {
        float* dk_tap = dk + ((tz * p.ky + ty) * p.kx + tx) * p.ci * p.co;
        for (int64_t o0 = 0; o0 < p.co; o0 += 16 * NR) {
          int64_t c0 = 0;
          for (; c0 + MR <= p.ci; c0 += MR) Block<MR, NR>(p, r0, r1, tz, ty, tx, c0, o0, dk_tap);
          if (c0 < p.ci) BlockTail<NR, MR - 1>(p.ci - c0, p, r0, r1, tz, ty, tx, c0, o0, dk_tap);
        }
      }
}

void RowsDispatch(const Problem& p, int64_t r0, int64_t r1, float* dk) {
  // 32 vector registers: MR * NR accumulators + NR gradient vectors + a broadcast.
  if (p.co % 64 == 0) return Rows<6, 4>(p, r0, r1, dk);
  if (p.co % 32 == 0) return Rows<12, 2>(p, r0, r1, dk);
  return Rows<24, 1>(p, r0, r1, dk);
}


// Forward: MR consecutive output pixels of one row x NR*16 output channels; every tap of the
// MR pixels reads inside the row (interior pixels).
template <int MR, int NR>
__attribute__((always_inline)) inline void FwdBlock(const ConvProblem& p, int64_t r, int64_t x0,
                                                    int64_t o0, float* y) {
  v16 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = v16{};
  const int64_t yo = r % p.dy, zo = (r / p.dy) % p.dz, b = r / (p.dy * p.dz);
  for (int64_t tz = 0; tz < p.kz; ++tz) {
    const int64_t zi = zo + tz - p.pz;
    if (zi < 0 || zi >= p.d) continue;
    for (int64_t ty = 0; ty < p.ky; ++ty) {
      const int64_t yi = yo + ty - p.py;
      if (yi < 0 || yi >= p.h) continue;
      const float* xr = p.in + ((b * p.d + zi) * p.h + yi) * p.w * p.ci;
      for (int64_t tx = 0; tx < p.kx; ++tx) {
        const float* xp = xr + (x0 + tx - p.px) * p.ci;
        const float* kp = p.k + ((tz * p.ky + ty) * p.kx + tx) * p.ci * p.co + o0;
        for (int64_t c = 0; c < p.ci; ++c, kp += p.co) {
          v16 kv[NR];
          for (int j = 0; j < NR; ++j) kv[j] = *reinterpret_cast<const v16u*>(kp + 16 * j);
          for (int i = 0; i < MR; ++i) {
            const float s = xp[i * p.ci + c];
            for (int j = 0; j < NR; ++j) acc[i][j] += s * kv[j];
          }
        }
      }
    }
  }
  float* yp = y + (r * p.dx + x0) * p.co + o0;
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) *reinterpret_cast<v16u*>(yp + i * p.co + 16 * j) = acc[i][j];
}

// One output pixel near the row's ends, where some taps fall outside the input.
template <int NR>
inline void FwdEdge(const ConvProblem& p, int64_t r, int64_t xo, int64_t o0, float* y) {
  v16 acc[NR];
  for (int j = 0; j < NR; ++j) acc[j] = v16{};
  const int64_t yo = r % p.dy, zo = (r / p.dy) % p.dz, b = r / (p.dy * p.dz);
  for (int64_t tz = 0; tz < p.kz; ++tz) {
    const int64_t zi = zo + tz - p.pz;
    if (zi < 0 || zi >= p.d) continue;
    for (int64_t ty = 0; ty < p.ky; ++ty) {
      const int64_t yi = yo + ty - p.py;
      if (yi < 0 || yi >= p.h) continue;
      for (int64_t tx = 0; tx < p.kx; ++tx) {
        const int64_t xi = xo + tx - p.px;
        if (xi < 0 || xi >= p.w) continue;
        const float* xp = p.in + (((b * p.d + zi) * p.h + yi) * p.w + xi) * p.ci;
        const float* kp = p.k + ((tz * p.ky + ty) * p.kx + tx) * p.ci * p.co + o0;
        for (int64_t c = 0; c < p.ci; ++c, kp += p.co)
          for (int j = 0; j < NR; ++j) acc[j] += xp[c] * *reinterpret_cast<const v16u*>(kp + 16 * j);
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    *reinterpret_cast<v16u*>(y + (r * p.dx + xo) * p.co + o0 + 16 * j) = acc[j];
}

template <int NR, int M>
__attribute__((always_inline)) inline void FwdTail(int m, const ConvProblem& p, int64_t r,
                                                   int64_t x0, int64_t o0, float* y) {
  if constexpr (M > 0) {
    if (m == M) return FwdBlock<M, NR>(p, r, x0, o0, y);
    FwdTail<NR, M - 1>(m, p, r, x0, o0, y);
  }
}

template <int MR, int NR>
void FwdRows(const ConvProblem& p, int64_t r0, int64_t r1, float* y) {
  // Interior output pixels: xo - px >= 0 and xo - px + kx - 1 < w.
  const int64_t lo = std::min(p.px, p.dx);
  const int64_t hi = std::max(lo, std::min(p.dx, p.w - p.kx + 1 + p.px));
  for (int64_t o0 = 0; o0 < p.co; o0 += 16 * NR)
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t x = 0; x < lo; ++x) FwdEdge<NR>(p, r, x, o0, y);
      int64_t x = lo;
      for (; x + MR <= hi; x += MR) FwdBlock<MR, NR>(p, r, x, o0, y);
      if (x < hi) FwdTail<NR, MR - 1>(hi - x, p, r, x, o0, y);
      for (x = hi; x < p.dx; ++x) FwdEdge<NR>(p, r, x, o0, y);
    }
}

void FwdDispatch(const ConvProblem& p, int64_t r0, int64_t r1, float* y) {
  if (p.co % 64 == 0) return FwdRows<6, 4>(p, r0, r1, y);
  if (p.co % 32 == 0) return FwdRows<12, 2>(p, r0, r1, y);
  return FwdRows<24, 1>(p, r0, r1, y);
}

void AddInto(float* dst, const float* src, int64_t size) {
  for (int64_t i = 0; i < size; ++i) dst[i] += src[i];
}

#pragma GCC pop_options
#endif  // __x86_64__

// The rows are split into a fixed number of parts, each summed in row order into its own
// buffer (part 0: the result), and the parts are added in order: the result does not depend
// on which thread took which part, so training runs are reproducible.
ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> in,
                          ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk,
                          int64_t kz, int64_t ky, int64_t kx, int64_t pz, int64_t py,
                          int64_t px) {
#if CC_HAVE_KERNEL
  auto xd = in.dimensions();
  auto gd = g.dimensions();
  if (xd.size() != 5 || gd.size() != 5 || xd[0] != gd[0])
    return ffi::Error::InvalidArgument("conv kernel grad: expects (n, z, y, x, c) operands");
  if (gd[4] % 16 != 0)
    return ffi::Error::InvalidArgument("conv kernel grad: output channels must be a multiple of 16");
  const Problem p{xd[0], xd[1], xd[2], xd[3], xd[4], gd[1], gd[2], gd[3], gd[4],
                  kz, ky, kx, pz, py, px, in.typed_data(), g.typed_data()};
  const int64_t dk_size = kz * ky * kx * xd[4] * gd[4];
  const int64_t rows = gd[0] * gd[1] * gd[2];
  // Chunks of ~512 output pixels: the rows they read stay in L2 across taps and channel blocks.
  const int64_t rows_per_chunk = std::max<int64_t>(1, (512 + gd[3] - 1) / gd[3]);
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(workers, rows / rows_per_chunk));
  float* out = dk->typed_data();
  std::vector<std::unique_ptr<float[]>> storage(parts);
  std::vector<float*> part_dk(parts, out);
  for (int64_t i = 1; i < parts; ++i) {
    storage[i].reset(new float[dk_size]);
    part_dk[i] = storage[i].get();
  }
  cellcount::ParallelFor(pool, parts, [&](int64_t part) {
    std::memset(part_dk[part], 0, dk_size * sizeof(float));
    const int64_t r_end = rows * (part + 1) / parts;
    for (int64_t r0 = rows * part / parts; r0 < r_end; r0 += rows_per_chunk)
      RowsDispatch(p, r0, std::min(r0 + rows_per_chunk, r_end), part_dk[part]);
  });
  for (int64_t i = 1; i < parts; ++i) AddInto(out, part_dk[i], dk_size);
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("conv kernel grad: built without the x86-64 kernel");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcConvKernelGrad, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kz")
                                  .Attr<int64_t>("ky")
                                  .Attr<int64_t>("kx")
                                  .Attr<int64_t>("pz")
                                  .Attr<int64_t>("py")
                                  .Attr<int64_t>("px"));


ffi::Error ConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> in, ffi::Buffer<ffi::F32> k,
                    ffi::ResultBuffer<ffi::F32> y, int64_t pz, int64_t py, int64_t px) {
#if CC_HAVE_KERNEL
  auto xd = in.dimensions();
  auto kd = k.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 5 || kd.size() != 5 || yd.size() != 5 || kd[3] != xd[4] || yd[4] != kd[4])
    return ffi::Error::InvalidArgument("conv: expects (n, z, y, x, c) x (z, y, x, in, out)");
  if (yd[4] % 16 != 0)
    return ffi::Error::InvalidArgument("conv: output channels must be a multiple of 16");
  const ConvProblem p{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4],
                      kd[0], kd[1], kd[2], pz, py, px, in.typed_data(), k.typed_data()};
  float* out = y->typed_data();
  const int64_t rows = yd[0] * yd[1] * yd[2];
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows_per_chunk = std::max<int64_t>(
      1, std::min<int64_t>((512 + yd[3] - 1) / yd[3], rows / (8 * workers)));
  cellcount::ParallelFor(pool, (rows + rows_per_chunk - 1) / rows_per_chunk, [&](int64_t c) {
    const int64_t r0 = c * rows_per_chunk;
    FwdDispatch(p, r0, std::min(r0 + rows_per_chunk, rows), out);
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("conv: built without the x86-64 kernel");
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pz")
                                  .Attr<int64_t>("py")
                                  .Attr<int64_t>("px"));

// The jaxlib whose FFI headers the library was compiled against (setup.py defines it): the
// Python side loads the library only under that jaxlib.
#ifndef CELLCOUNT_JAXLIB_VERSION
#define CELLCOUNT_JAXLIB_VERSION "unknown"
#endif
extern "C" const char* cc_jaxlib_version() { return CELLCOUNT_JAXLIB_VERSION; }

extern "C" int cc_native_supported() {
#if CC_HAVE_KERNEL
  __builtin_cpu_init();
  // avx512bw: the bfloat16 loads and stores of norm.cc.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 1 : 0;
#else
  return 0;
#endif
}
