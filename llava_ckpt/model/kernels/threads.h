// The kernels' one way of splitting work over threads: [0, n) in ranges of `grain` items, handed out one at a
// time over `threads` threads (the first the calling thread). Each thread runs f(take) once, and f calls
// take(start, stop) for its next range until it returns false, so a thread's own buffers live across its ranges.
// Handed out rather than cut into equal shares: on 2 cores a share's thread lost time to other threads
// (MindSpore's spinning pool, the kernel's), and the other waited for it at the join. Which thread computes a
// range varies from call to call, so each must compute it the same way: the kernels are built with
// -ffp-contract=off (kernels/__init__.py says why).
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

template <class F>
void on_threads(int64_t n, int64_t grain, int threads, F f) {
  std::atomic<int64_t> next{0};
  auto take = [&](int64_t &start, int64_t &stop) {
    start = next.fetch_add(grain);
    stop = start + grain < n ? start + grain : n;
    return start < n;
  };
  auto work = [&]() { f(take); };
  int64_t ranges = (n + grain - 1) / grain, parts = ranges < threads ? ranges : threads;
  std::vector<std::thread> others;
  for (int64_t i = 1; i < parts; i++) others.emplace_back(work);
  work();
  for (auto &t : others) t.join();
}
