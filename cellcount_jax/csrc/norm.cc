// A convolution's bias, ReLU and instance norm in two reads of the array each way, as XLA FFI
// calls (CPU):
//
//   forward:  z = max(y + b, 0);  m, v = mean and variance of z over the pixels of each
//             (image, channel);  r = 1 / sqrt(v + eps);  out = (z - m) r scale + beta
//   backward: with xhat = (z - m) r, S1 = sum g, S2 = sum g xhat (per image and channel),
//             dy = [y + b > 0] r scale (g - S1 / P - xhat S2 / P)   (P pixels)
//
// y is (n, pixels, c) float32, channels last; out, g and dy are float32 or bfloat16 (rounded
// to nearest even). The forward returns (m, r) per image and channel for the backward, which
// returns S1, S2 and sum dy per image and channel (the gradients of beta, scale and b summed
// over the batch by the caller). XLA:CPU runs this as 6-10 separate passes over the array,
// with slow float32 -> bfloat16 conversions; here it is two reads each way, a group of images
// at a time so that the second read comes from the cache. Sums are taken over fixed chunks of
// pixels and combined in order, so results do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__)  // the library is used on AVX-512 CPUs only (cc_native_supported)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,fma")
#endif

constexpr int64_t kChunk = 1024;           // pixels per work item
constexpr int64_t kGroupBytes = 8 << 20;   // images whose float32 y fits this are done together

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {
  const uint32_t u = uint32_t{p[i]} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void Store(float* p, int64_t i, float f) { p[i] = f; }
inline void Store(uint16_t* p, int64_t i, float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
  p[i] = static_cast<uint16_t>((u & 0x7fffffff) > 0x7f800000 ? (u >> 16) | 0x40 : rounded);
}

struct Problem {
  int64_t n, pixels, c;
  const float *y, *b, *scale;
  int64_t chunks() const { return (pixels + kChunk - 1) / kChunk; }
  int64_t group() const {
    return std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(1, pixels * c * 4));
  }
  // Runs first(image, chunk) over every chunk of a group of images, then between(image) for
  // each, then second(image, chunk) over the chunks again, group after group.
  template <typename F, typename B, typename S>
  void TwoPasses(ffi::ThreadPool& pool, F first, B between, S second) const {
    for (int64_t i0 = 0; i0 < n; i0 += group()) {
      const int64_t images = std::min(group(), n - i0), k = chunks();
      cellcount::ParallelFor(pool, images * k, [&](int64_t t) { first(i0 + t / k, t % k); });
      for (int64_t i = i0; i < i0 + images; ++i) between(i);
      cellcount::ParallelFor(pool, images * k, [&](int64_t t) { second(i0 + t / k, t % k); });
    }
  }
};

// Per-chunk float sums, combined in chunk order in double.
struct ChunkSums {
  int64_t c, terms;
  std::vector<double> sums;  // (chunks, terms, c)
  ChunkSums(const Problem& p, int terms) : c(p.c), terms(terms), sums(p.chunks() * terms * p.c) {}
  double* at(int64_t chunk) { return sums.data() + chunk * terms * c; }
  void Total(int64_t chunks, double* out) const {  // (terms, c)
    std::fill(out, out + terms * c, 0.0);
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t j = 0; j < terms * c; ++j) out[j] += sums[k * terms * c + j];
  }
};

// One pixel's channels: s1 += z, s2 += z^2, z = max(y + b, 0).
inline void StatSums(int64_t c, const float* __restrict y, const float* __restrict b,
                     float* __restrict s1, float* __restrict s2) {
  for (int64_t j = 0; j < c; ++j) {
    const float z = std::max(y[j] + b[j], 0.f);
    s1[j] += z;
    s2[j] += z * z;
  }
}

// One pixel's channels: out = (max(y + b, 0) - m) a + beta.
template <typename Out>
inline void NormPixel(int64_t c, const float* __restrict y, const float* __restrict b,
                      const float* __restrict m, const float* __restrict a,
                      const float* __restrict beta, Out* __restrict out) {
  for (int64_t j = 0; j < c; ++j) Store(out, j, (std::max(y[j] + b[j], 0.f) - m[j]) * a[j] + beta[j]);
}

template <typename Out>
void Forward(ffi::ThreadPool& pool, const Problem& p, const float* beta, float eps, Out* out,
             float* stats) {
  const int64_t c = p.c, k = p.chunks();
  std::vector<ChunkSums> sums(p.n, ChunkSums(p, 2));
  std::vector<float> m(p.n * c), a(p.n * c);  // mean, r * scale
  auto first = [&](int64_t i, int64_t chunk) {
    std::vector<float> s1(c, 0.f), s2(c, 0.f);
    const int64_t q1 = std::min(p.pixels, (chunk + 1) * kChunk);
    for (int64_t q = chunk * kChunk; q < q1; ++q)
      StatSums(c, p.y + (i * p.pixels + q) * c, p.b, s1.data(), s2.data());
    double* dst = sums[i].at(chunk);
    for (int64_t j = 0; j < c; ++j) dst[j] = s1[j], dst[c + j] = s2[j];
  };
  auto between = [&](int64_t i) {
    std::vector<double> total(2 * c);
    sums[i].Total(k, total.data());
    for (int64_t j = 0; j < c; ++j) {
      const float mean = static_cast<float>(total[j] / p.pixels);
      const float var = std::max(static_cast<float>(total[c + j] / p.pixels) - mean * mean, 0.f);
      const float r = 1.f / std::sqrt(var + eps);
      m[i * c + j] = mean;
      a[i * c + j] = r * p.scale[j];
      stats[(i * 2) * c + j] = mean;
      stats[(i * 2 + 1) * c + j] = r;
    }
  };
  auto second = [&](int64_t i, int64_t chunk) {
    const int64_t q1 = std::min(p.pixels, (chunk + 1) * kChunk);
    for (int64_t q = chunk * kChunk; q < q1; ++q) {
      const int64_t at = (i * p.pixels + q) * c;
      NormPixel(c, p.y + at, p.b, m.data() + i * c, a.data() + i * c, beta, out + at);
    }
  };
  p.TwoPasses(pool, first, between, second);
}

// One pixel's channels: s1 += g, s2 += g xhat.
template <typename G>
inline void GradSums(int64_t c, const float* __restrict y, const float* __restrict b,
                     const float* __restrict m, const float* __restrict r,
                     const G* __restrict g, float* __restrict s1, float* __restrict s2) {
  for (int64_t j = 0; j < c; ++j) {
    const float gv = Load(g, j);
    s1[j] += gv;
    s2[j] += gv * ((std::max(y[j] + b[j], 0.f) - m[j]) * r[j]);
  }
}

// One pixel's channels: dy = [y + b > 0] a (g - c1 - xhat c2), s += dy.
template <typename G, typename Out>
inline void GradPixel(int64_t c, const float* __restrict y, const float* __restrict b,
                      const float* __restrict m, const float* __restrict r,
                      const float* __restrict a, const float* __restrict c1,
                      const float* __restrict c2, const G* __restrict g, Out* __restrict dy,
                      float* __restrict s) {
  for (int64_t j = 0; j < c; ++j) {
    const float x = y[j] + b[j];
    const float xhat = (std::max(x, 0.f) - m[j]) * r[j];
    const float d = x > 0.f ? a[j] * (Load(g, j) - c1[j] - xhat * c2[j]) : 0.f;
    Store(dy, j, d);
    s[j] += d;
  }
}

template <typename G, typename Out>
void Backward(ffi::ThreadPool& pool, const Problem& p, const float* stats, const G* g, Out* dy,
              float* sums_out) {
  const int64_t c = p.c, k = p.chunks();
  std::vector<ChunkSums> s12(p.n, ChunkSums(p, 2)), sdy(p.n, ChunkSums(p, 1));
  // Per image: m, r (stats), r scale, S1 / P, S2 / P.
  std::vector<float> a(p.n * c), c1(p.n * c), c2(p.n * c);
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < c; ++j) a[i * c + j] = stats[(i * 2 + 1) * c + j] * p.scale[j];
  auto first = [&](int64_t i, int64_t chunk) {
    std::vector<float> s1(c, 0.f), s2(c, 0.f);
    const float *m = stats + i * 2 * c, *r = m + c;
    const int64_t q1 = std::min(p.pixels, (chunk + 1) * kChunk);
    for (int64_t q = chunk * kChunk; q < q1; ++q) {
      const int64_t at = (i * p.pixels + q) * c;
      GradSums(c, p.y + at, p.b, m, r, g + at, s1.data(), s2.data());
    }
    double* dst = s12[i].at(chunk);
    for (int64_t j = 0; j < c; ++j) dst[j] = s1[j], dst[c + j] = s2[j];
  };
  auto between = [&](int64_t i) {
    std::vector<double> total(2 * c);
    s12[i].Total(k, total.data());
    for (int64_t j = 0; j < c; ++j) {
      c1[i * c + j] = static_cast<float>(total[j] / p.pixels);
      c2[i * c + j] = static_cast<float>(total[c + j] / p.pixels);
      sums_out[(i * 3) * c + j] = static_cast<float>(total[j]);
      sums_out[(i * 3 + 1) * c + j] = static_cast<float>(total[c + j]);
    }
  };
  auto second = [&](int64_t i, int64_t chunk) {
    std::vector<float> s(c, 0.f);
    const float *m = stats + i * 2 * c, *r = m + c;
    const int64_t q1 = std::min(p.pixels, (chunk + 1) * kChunk);
    for (int64_t q = chunk * kChunk; q < q1; ++q) {
      const int64_t at = (i * p.pixels + q) * c;
      GradPixel(c, p.y + at, p.b, m, r, a.data() + i * c, c1.data() + i * c, c2.data() + i * c,
                g + at, dy + at, s.data());
    }
    double* dst = sdy[i].at(chunk);
    for (int64_t j = 0; j < c; ++j) dst[j] = s[j];
  };
  p.TwoPasses(pool, first, between, second);
  std::vector<double> total(c);
  for (int64_t i = 0; i < p.n; ++i) {
    sdy[i].Total(k, total.data());
    for (int64_t j = 0; j < c; ++j) sums_out[(i * 3 + 2) * c + j] = static_cast<float>(total[j]);
  }
}

#if defined(__x86_64__)
#pragma GCC pop_options
#endif

bool IsF32(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::F32; }
bool IsBf16(const ffi::AnyBuffer& b) { return b.element_type() == ffi::DataType::BF16; }

// y (n, ..., c) with b, scale (c): the problem, or an error naming what does not fit.
ffi::Error Make(const ffi::Buffer<ffi::F32>& y, const ffi::Buffer<ffi::F32>& b,
                const ffi::Buffer<ffi::F32>& scale, const char* what, Problem* p) {
  auto d = y.dimensions();
  if (d.size() < 2) return ffi::Error::InvalidArgument(std::string(what) + ": y must be (n, ..., c)");
  int64_t pixels = 1;
  for (size_t i = 1; i + 1 < d.size(); ++i) pixels *= d[i];
  *p = Problem{d[0], pixels, d[d.size() - 1], y.typed_data(), b.typed_data(), scale.typed_data()};
  if (b.element_count() != p->c || scale.element_count() != p->c)
    return ffi::Error::InvalidArgument(std::string(what) + ": b and scale must have c values");
  if (p->pixels < 1) return ffi::Error::InvalidArgument(std::string(what) + ": no pixels");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> b,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> beta,
                       ffi::Result<ffi::AnyBuffer> out, ffi::ResultBuffer<ffi::F32> stats,
                       float eps) {
  Problem p;
  if (auto e = Make(y, b, scale, "relu norm", &p); e.failure()) return e;
  if (beta.element_count() != p.c || out->element_count() != y.element_count() ||
      stats->element_count() != 2 * p.n * p.c)
    return ffi::Error::InvalidArgument("relu norm: output shapes do not agree");
  if (IsF32(*out))
    Forward(pool, p, beta.typed_data(), eps, out->typed_data<float>(), stats->typed_data());
  else if (IsBf16(*out))
    Forward(pool, p, beta.typed_data(), eps, static_cast<uint16_t*>(out->untyped_data()),
            stats->typed_data());
  else
    return ffi::Error::InvalidArgument("relu norm: out must be float32 or bfloat16");
  return ffi::Error::Success();
}

template <typename G>
ffi::Error BackwardAs(ffi::ThreadPool& pool, const Problem& p, const float* stats, const G* g,
                      ffi::AnyBuffer& dy, float* sums) {
  if (IsF32(dy)) Backward(pool, p, stats, g, dy.typed_data<float>(), sums);
  else if (IsBf16(dy)) Backward(pool, p, stats, g, static_cast<uint16_t*>(dy.untyped_data()), sums);
  else return ffi::Error::InvalidArgument("relu norm grad: dy must be float32 or bfloat16");
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> b,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> stats,
                        ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dy,
                        ffi::ResultBuffer<ffi::F32> sums) {
  Problem p;
  if (auto e = Make(y, b, scale, "relu norm grad", &p); e.failure()) return e;
  if (g.element_count() != y.element_count() || dy->element_count() != y.element_count() ||
      stats.element_count() != 2 * p.n * p.c || sums->element_count() != 3 * p.n * p.c)
    return ffi::Error::InvalidArgument("relu norm grad: operand shapes do not agree");
  if (IsF32(g)) return BackwardAs(pool, p, stats.typed_data(), g.typed_data<float>(), *dy,
                                  sums->typed_data());
  if (IsBf16(g)) return BackwardAs(pool, p, stats.typed_data(),
                                   static_cast<const uint16_t*>(g.untyped_data()), *dy,
                                   sums->typed_data());
  return ffi::Error::InvalidArgument("relu norm grad: g must be float32 or bfloat16");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcReluNorm, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CcReluNormGrad, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
