// ParallelFor over XLA's intra-op thread pool, for the FFI kernels of this package.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace cellcount {

// Runs fn(i) for every i in [0, count), on the calling thread and on up to
// pool.num_threads() - 1 helpers, and returns when all are done. Helpers that start late (the
// pool busy with other work) find nothing left and return at once; the caller never waits for
// a helper that has not started, so this cannot deadlock.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count,
                        std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int> active{0};
    int64_t count;
    std::function<void(int64_t)> fn;
  };
  auto s = std::make_shared<State>();
  s->count = count;
  s->fn = std::move(fn);
  auto work = [](State& s) {
    s.active.fetch_add(1);
    for (int64_t i; (i = s.next.fetch_add(1)) < s.count;) s.fn(i);
    s.active.fetch_sub(1);
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()) - 1,
                                            count - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([s, work] { work(*s); });
  work(*s);
  while (s->active.load() > 0) std::this_thread::yield();
}

}  // namespace cellcount
