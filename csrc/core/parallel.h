// A minimal parallel_for: spawn up to `threads` workers per call (the calling
// thread is worker 0), hand out items through an atomic counter. Kernels are
// batched over many independent tasks, so this simple scheme balances well;
// no OpenMP dependency. Exceptions thrown by fn are re-thrown in the caller.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "simd.h"

namespace kmf {

/// threads <= 0 means std::thread::hardware_concurrency().
inline int hardware_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
}

/// Starting a thread costs tens of microseconds: give each at least this many
/// multiply-adds (about 40 us of kernel time), else use fewer threads.
constexpr double kMinWorkPerThread = 8e6;

/// The thread count worth using for `work` units (multiply-adds) of work.
inline int threads_for_work(int threads, double work) {
    if (threads <= 0) threads = hardware_threads();
    const double cap = work / kMinWorkPerThread;
    return cap < 2.0 ? 1 : (cap < threads ? static_cast<int>(cap) : threads);
}

/// Workers a parallel_for over n items uses (>= 1).
inline int num_workers(int threads, std::int64_t n) {
    if (threads <= 0) threads = hardware_threads();
    return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(threads, n)));
}

/// Calls fn(item, worker) for every item in [0, n), worker in [0, num_workers(threads, n)).
template <typename F>
void parallel_for(std::int64_t n, int threads, F&& fn) {
    const int nw = num_workers(threads, n);
    if (nw <= 1) {
        for (std::int64_t i = 0; i < n; ++i) fn(i, 0);
        return;
    }
    std::atomic<std::int64_t> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&](int worker) {
        try {
            for (;;) {
                const std::int64_t i = next.fetch_add(1, std::memory_order_relaxed);
                if (i >= n) break;
                fn(i, worker);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
            next.store(n);  // stop handing out work
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(nw - 1);
    for (int w = 1; w < nw; ++w) {
        try {
            pool.emplace_back(work, w);
        } catch (...) {  // cannot start more threads: run with what we have
            break;
        }
    }
    work(0);
    for (std::thread& t : pool) t.join();
    if (error) std::rethrow_exception(error);
}

/// A growable, kAlign-aligned scratch buffer owned by one worker.
class Scratch {
public:
    Scratch() = default;
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    Scratch(Scratch&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
    ~Scratch() { release(); }

    /// At least `count` elements of T, aligned; contents unspecified.
    template <typename T>
    T* get(std::size_t count) {
        const std::size_t need = std::max<std::size_t>(count * sizeof(T), kAlign);
        if (need > bytes_) {
            release();
            const std::size_t rounded = (need + kAlign - 1) / kAlign * kAlign;
            p_ = ::operator new(rounded, std::align_val_t(kAlign));  // throws bad_alloc
            bytes_ = rounded;
        }
        return static_cast<T*>(p_);
    }

    /// The current buffer (null before the first get).
    template <typename T>
    T* data() const {
        return static_cast<T*>(p_);
    }

private:
    void release() {
        if (p_) ::operator delete(p_, std::align_val_t(kAlign));
        p_ = nullptr;
        bytes_ = 0;
    }
    void* p_ = nullptr;
    std::size_t bytes_ = 0;
};

}  // namespace kmf
