// A CPU emulator of the CUDA features the sampling kernels use, so that the real kernel
// sources (csrc/sampling_kernel.cuh, csrc/sampling_cluster.cuh) compile with g++ and run
// where there is no GPU. Included before them (emu_sample.cpp); emulator.py rewrites
// their `__shared__` declarations into emu::shared / emu::dyn_shared calls (every
// block needs its own copy, which no macro can give). See README.md.
//
// Every CUDA thread is a fiber; one OS thread runs them all, one cluster (C blocks of
// `threads` threads) at a time. A fiber gives way at every barrier (warp intrinsics,
// __syncthreads, cluster barriers), DSMEM mapping and atomic, and the next fiber is
// drawn at random, so remote accesses interleave with the other blocks' work. Shared
// memory starts as random bytes and is poisoned when its block exits.
//
// Errors end the process with a message (exit status 3): a deadlock (with where every
// thread waits), a barrier used after one of its threads exited or a thread exiting
// while others wait at a barrier it belongs to (the kernels promise that every thread
// passes every barrier), a DSMEM access before the first cluster barrier or to a block
// that has exited, a partial warp mask, more shared memory than an sm_90 block has.
#pragma once

#if !defined(__x86_64__)
#error "emu.h: the fiber switch is written for x86-64 (System V ABI)"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <random>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- CUDA keywords
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __CUDA_ARCH__ 900  // compile the sm_90 paths (the cluster kernel's body)

struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline EmuDim3 threadIdx, blockIdx;  // the running fiber's, set at every switch

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  fputs("emu: ", stderr);
  vfprintf(stderr, fmt, args);
  fputc('\n', stderr);
  va_end(args);
  std::_Exit(3);
}

constexpr size_t kMaxSharedBytes = 227 * 1024;  // per block on sm_90 (static + dynamic)

struct Fiber;

// A barrier of `expected` threads: a warp (for the warp intrinsics), a block or a cluster.
// The kernels promise that every thread passes every barrier, so once a member has
// exited the barrier must not be used again (CUDA would count the exited threads as
// arrived; a kernel that relies on it is flagged).
struct Barrier {
  const char* what = "";
  int expected = 0, arrived = 0;
  uint64_t generation = 0;   // completed phases
  bool member_exited = false;
  std::vector<Fiber*> waiters;
};

struct Warp {
  Barrier bar;
  uint64_t slot[2][32];  // lane values of a warp intrinsic, by barrier generation parity
};

struct Block {
  int rank = 0, live = 0;
  bool exited = false;
  Barrier bar;
  std::vector<Warp> warps;
  int sync_or = 0;  // __syncthreads_or accumulator
  // static __shared__ variables, one allocation per declaration (keyed by emu::shared's tag)
  struct Alloc {
    const void* tag;
    size_t size;
    std::unique_ptr<unsigned char[]> bytes;
  };
  std::vector<Alloc> statics;
  size_t static_bytes = 0;
  std::vector<unsigned char> dynamic;  // extern __shared__ (every declaration aliases it)
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  int tid = 0;         // threadIdx.x
  int block_x = 0;     // blockIdx.x
  Block* block = nullptr;
  bool done = false;
  const Barrier* waiting_at = nullptr;
  bool cluster_arrived = false;  // barrier_arrive without its barrier_wait yet
  uint64_t cluster_phase = 0;    // the phase it arrived at
  int cluster_waits = 0;         // cluster barriers completed (DSMEM needs one)
};

// Fiber stacks, reused across runs: guard page below each, tops staggered by a cache
// line per fiber so that the hot top frames do not all fall into the same cache sets.
class StackPool {
 public:
  static constexpr size_t kStackBytes = 64 * 1024;

  void* top(size_t i) {
    while (i >= stacks_.size()) grow();
    const auto stagger = static_cast<uintptr_t>((i % 64) * 64);
    return reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(stacks_[i]) + kStackBytes - stagger);
  }

 private:
  void grow() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), count = 1024, each = kStackBytes + page;
    auto* base = static_cast<unsigned char*>(
        mmap(nullptr, count * each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base == MAP_FAILED) fail("cannot map %zu fiber stacks", count);
    for (size_t j = 0; j < count; ++j) {
      if (mprotect(base + j * each, page, PROT_NONE) != 0) fail("cannot protect a stack guard page");
      stacks_.push_back(base + j * each + page);
    }
  }
  std::vector<unsigned char*> stacks_;
};

}  // namespace emu

// Saves the callee-saved registers on the current stack, stores the stack pointer in
// *save_sp, switches to load_sp and restores that fiber's registers.
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");

namespace emu {

// Runs one cluster to completion. Fibers made ready go to their warp's ready list; a
// round takes some of the lists (by the schedule policy), shuffles them and runs them in
// that order, each fiber until it gives way. Plain loads and stores between two switch
// points run without interruption: races show as orders of those stretches.
//
// Policies, drawn per run, for blocks (clusters only) and, within each block, for warps:
//   fair      every ready thread runs every round;
//   drift     blocks: half of the rounds run one random block only; warps: each round
//             runs each warp with probability 1/2 (they drift apart);
//   priority  only the first block / warp in a random order that has a ready thread
//             runs: it runs ahead until a barrier stops it (the harshest order for a
//             missing barrier).
class Scheduler {
 public:
  Scheduler(int blocks, int threads, int first_block_x, size_t dynamic_bytes, uint64_t seed,
            const std::function<void()>& body)
      : body_(body), rng_(seed), blocks_(blocks), warps_per_block_(threads / 32),
        ready_(static_cast<size_t>(blocks) * (threads / 32)), ready_in_block_(blocks) {
    cluster_.what = "the cluster barrier";
    cluster_.expected = blocks * threads;
    for (int r = 0; r < blocks; ++r) {
      Block& b = blocks_[r];
      b.rank = r;
      b.live = threads;
      b.bar.what = "__syncthreads";
      b.bar.expected = threads;
      b.warps.resize(threads / 32);
      for (Warp& w : b.warps) {
        w.bar.what = "a warp intrinsic";
        w.bar.expected = 32;
      }
      b.dynamic.resize(dynamic_bytes);
      randomize(b.dynamic.data(), b.dynamic.size());
    }
    fibers_.resize(static_cast<size_t>(blocks) * threads);
    for (size_t i = 0; i < fibers_.size(); ++i) {
      Fiber& f = fibers_[i];
      f.block = &blocks_[i / threads];
      f.tid = static_cast<int>(i % threads);
      f.block_x = first_block_x + f.block->rank;
      // a fresh stack that "returns" into start() with (rsp + 8) % 16 == 0, as after a call
      auto** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stacks().top(i)) & ~uintptr_t{15}) - 8);
      *--sp = reinterpret_cast<void*>(&Scheduler::start);
      for (int reg = 0; reg < 6; ++reg) *--sp = nullptr;  // the callee-saved registers emu_switch pops
      f.sp = sp;
      make_ready(&f);
    }
    live_ = static_cast<int>(fibers_.size());
    block_policy_ = blocks > 1 ? static_cast<Policy>(rng_() % 3) : Policy::kFair;
    warp_policy_ = static_cast<Policy>(rng_() % 3);
    for (int r = 0; r < blocks; ++r) block_order_.push_back(r);
    for (int w = 0; w < warps_per_block_; ++w) warp_order_.push_back(w);
    std::shuffle(block_order_.begin(), block_order_.end(), rng_);
    std::shuffle(warp_order_.begin(), warp_order_.end(), rng_);
  }

  void run() {
    current_ = this;
    Fiber* first = next();
    enter(first);
    emu_switch(&main_sp_, first->sp);
    current_ = nullptr;
  }

  static Scheduler& get() { return *current_; }
  Fiber& fiber() { return *running_; }
  Block& block() { return *running_->block; }
  Block& block(int rank) { return blocks_[rank]; }
  int cluster_size() const { return static_cast<int>(blocks_.size()); }
  Barrier& cluster_barrier() { return cluster_; }

  void randomize(unsigned char* p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(rng_());
  }

  // The running fiber gives way and stays ready.
  void yield() {
    make_ready(running_);
    switch_to_next();
  }

  void arrive_and_wait(Barrier& b) {
    const uint64_t phase = arrive(b);
    wait(b, phase);
  }

  // Arrives at b; returns the phase to wait for.
  uint64_t arrive(Barrier& b) {
    if (b.member_exited)
      fail("block %d thread %d reaches %s after a thread of it exited", block().rank, running_->tid, b.what);
    const uint64_t phase = b.generation;
    if (++b.arrived == b.expected) {
      b.arrived = 0;
      ++b.generation;
      for (Fiber* f : b.waiters) {
        f->waiting_at = nullptr;
        make_ready(f);
      }
      b.waiters.clear();
    }
    return phase;
  }

  void wait(Barrier& b, uint64_t phase) {
    if (b.generation != phase) {  // complete: give way all the same (a barrier is a switch point)
      yield();
      return;
    }
    running_->waiting_at = &b;
    b.waiters.push_back(running_);
    switch_to_next();
  }

 private:
  static StackPool& stacks() {
    static StackPool pool;
    return pool;
  }

  // Where every fiber begins: the kernel body, then the thread's exit.
  static void start() {
    Scheduler& s = get();
    s.body_();
    s.exit_running();
  }

  void exit_running() {
    Fiber& f = *running_;
    Block& b = *f.block;
    leave(b.bar);
    leave(b.warps[f.tid / 32].bar);
    leave(cluster_);
    if (--b.live == 0) {
      b.exited = true;
      for (auto& a : b.statics) std::memset(a.bytes.get(), 0xA5, a.size);
      std::fill(b.dynamic.begin(), b.dynamic.end(), 0xA5);
    }
    f.done = true;
    --live_;
    switch_to_next();
    fail("an exited thread was resumed");
  }

  void leave(Barrier& b) {
    if (b.arrived > 0)
      fail("block %d thread %d exits while %d threads wait at %s", block().rank, running_->tid, b.arrived, b.what);
    b.member_exited = true;
  }

  enum class Policy { kFair, kDrift, kPriority };

  void make_ready(Fiber* f) {
    ready_[static_cast<size_t>(f->block->rank) * warps_per_block_ + f->tid / 32].push_back(f);
    ++ready_in_block_[f->block->rank];
  }

  void enter(Fiber* f) {
    running_ = f;
    threadIdx.x = static_cast<unsigned>(f->tid);
    blockIdx.x = static_cast<unsigned>(f->block_x);
  }

  void switch_to_next() {
    Fiber* from = running_;
    Fiber* to = next();
    if (to == from) return;
    if (to == nullptr) {  // every thread has exited
      emu_switch(&from->sp, main_sp_);
      return;
    }
    enter(to);
    emu_switch(&from->sp, to->sp);
  }

  Fiber* next() {
    if (pos_ == round_.size()) new_round();
    return pos_ < round_.size() ? round_[pos_++] : nullptr;
  }

  void new_round() {
    round_.clear();
    pos_ = 0;
    int only = -1;  // the one block to run this round, or -1 for every block
    if (block_policy_ == Policy::kDrift && (rng_() & 1)) {
      const int r = static_cast<int>(rng_() % blocks_.size());
      if (ready_in_block_[r] > 0) only = r;
    } else if (block_policy_ == Policy::kPriority) {
      for (int r : block_order_)
        if (ready_in_block_[r] > 0) { only = r; break; }
    }
    for (int r = 0; r < cluster_size(); ++r)
      if ((only < 0 || r == only) && ready_in_block_[r] > 0) take_warps(r);
    std::shuffle(round_.begin(), round_.end(), rng_);
    if (round_.empty() && live_ > 0) report_deadlock();
  }

  // Moves the ready fibers of block r's warps chosen by the warp policy into the round.
  void take_warps(int r) {
    auto* lists = &ready_[static_cast<size_t>(r) * warps_per_block_];
    auto take = [&](int w) {
      round_.insert(round_.end(), lists[w].begin(), lists[w].end());
      ready_in_block_[r] -= static_cast<int>(lists[w].size());
      lists[w].clear();
    };
    const size_t before = round_.size();
    if (warp_policy_ == Policy::kPriority) {
      for (int w : warp_order_)
        if (!lists[w].empty()) { take(w); return; }
    }
    if (warp_policy_ == Policy::kDrift)
      for (int w = 0; w < warps_per_block_; ++w)
        if (!lists[w].empty() && (rng_() & 1)) take(w);
    if (round_.size() == before)  // fair, or no warp drawn
      for (int w = 0; w < warps_per_block_; ++w) take(w);
  }

  [[noreturn]] void report_deadlock() {
    fprintf(stderr, "emu: deadlock, no thread can run:\n");
    for (const Block& b : blocks_) {
      std::vector<std::pair<const Barrier*, int>> counts;
      for (const Fiber& f : fibers_) {
        if (f.block != &b || f.done) continue;
        auto it = std::find_if(counts.begin(), counts.end(), [&](auto& c) { return c.first == f.waiting_at; });
        if (it == counts.end()) counts.emplace_back(f.waiting_at, 1);
        else ++it->second;
      }
      for (auto& [bar, n] : counts)
        fprintf(stderr, "  block %d: %d threads wait at %s\n", b.rank, n, bar ? bar->what : "?");
    }
    fail("deadlock");
  }

  inline static Scheduler* current_ = nullptr;
  const std::function<void()>& body_;
  std::mt19937_64 rng_;
  std::vector<Block> blocks_;
  std::vector<Fiber> fibers_;
  Barrier cluster_;
  int warps_per_block_;
  std::vector<std::vector<Fiber*>> ready_;  // by warp: rank * warps_per_block_ + warp
  std::vector<int> ready_in_block_;         // by rank
  std::vector<Fiber*> round_;
  size_t pos_ = 0;
  int live_ = 0;
  Policy block_policy_ = Policy::kFair, warp_policy_ = Policy::kFair;
  std::vector<int> block_order_, warp_order_;  // for the priority policies
  Fiber* running_ = nullptr;
  void* main_sp_ = nullptr;
};

// Runs one cluster of `blocks` blocks x `threads` threads: blockIdx.x = first_block_x + rank.
inline void run_cluster(int blocks, int threads, int first_block_x, size_t dynamic_shared_bytes, uint64_t seed,
                        const std::function<void()>& body) {
  if (threads % 32 != 0) fail("threads per block must be a multiple of 32, got %d", threads);
  if (dynamic_shared_bytes > kMaxSharedBytes)
    fail("%zu bytes of dynamic shared memory, over the %zu of an sm_90 block", dynamic_shared_bytes, kMaxSharedBytes);
  Scheduler scheduler(blocks, threads, first_block_x, dynamic_shared_bytes, seed, body);
  scheduler.run();
}

inline Block& block() { return Scheduler::get().block(); }
inline void yield() { Scheduler::get().yield(); }

// A static __shared__ declaration, rewritten as emu::shared<T, unique id>(): the running
// block's instance, allocated (random bytes) by the first thread that reaches it.
template <class T, int Id>
T& shared() {
  static const char tag = 0;
  Block& b = block();
  for (auto& a : b.statics)
    if (a.tag == &tag) return *reinterpret_cast<T*>(a.bytes.get());
  b.static_bytes += sizeof(T);
  if (b.static_bytes + b.dynamic.size() > kMaxSharedBytes)
    fail("block uses %zu bytes of shared memory, over the %zu of an sm_90 block", b.static_bytes + b.dynamic.size(),
         kMaxSharedBytes);
  static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__);
  b.statics.push_back({&tag, sizeof(T), std::make_unique<unsigned char[]>(sizeof(T))});
  auto& a = b.statics.back();
  Scheduler::get().randomize(a.bytes.get(), a.size);
  return *reinterpret_cast<T*>(a.bytes.get());
}

// `extern __shared__ T name[]`: the running block's dynamic shared memory.
template <class T>
T* dyn_shared() {
  return reinterpret_cast<T*>(block().dynamic.data());
}

// Where an address lies in the cluster's shared memory.
struct SharedAddress {
  Block* block = nullptr;     // nullptr: not shared memory of this cluster
  const void* tag = nullptr;  // the static variable's tag (see shared()), nullptr for dynamic
  size_t offset = 0;
};

inline SharedAddress locate(const void* p) {
  Scheduler& s = Scheduler::get();
  const auto* c = static_cast<const unsigned char*>(p);
  for (int r = 0; r < s.cluster_size(); ++r) {
    Block& b = s.block(r);
    for (auto& a : b.statics)
      if (c >= a.bytes.get() && c < a.bytes.get() + a.size) return {&b, a.tag, static_cast<size_t>(c - a.bytes.get())};
    if (c >= b.dynamic.data() && c < b.dynamic.data() + b.dynamic.size())
      return {&b, nullptr, static_cast<size_t>(c - b.dynamic.data())};
  }
  return {};
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline void check_full_mask(unsigned mask, const char* fn) {
  if (mask != 0xffffffffu) fail("%s with mask %#x: only full-warp masks are emulated", fn, mask);
}

// Every lane publishes v; after the warp's barrier each lane reads lane src_lane(lane)'s
// value (its own if that is < 0). Slots alternate by barrier generation, so a lane that
// runs ahead into the next intrinsic cannot overwrite values another lane has yet to read.
template <class T, class SrcLane>
T warp_exchange(unsigned mask, T v, SrcLane src_lane, const char* fn) {
  check_full_mask(mask, fn);
  Warp& w = block().warps[threadIdx.x / 32];
  const int lane = static_cast<int>(threadIdx.x % 32);
  uint64_t* slot = w.slot[w.bar.generation & 1];
  slot[lane] = to_bits(v);
  Scheduler::get().arrive_and_wait(w.bar);
  const int src = src_lane(lane);
  return src < 0 ? v : from_bits<T>(slot[src]);
}

}  // namespace emu

// ---------------------------------------------------------------- CUDA built-ins
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 v) { return emu::from_bits<float>(uint64_t{v.bits} << 16); }
inline float __half2float(__half v) { return static_cast<float>(emu::from_bits<_Float16>(v.bits)); }

template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  return static_cast<T>(a) < static_cast<T>(b) ? static_cast<T>(a) : static_cast<T>(b);
}
inline uint32_t __float_as_uint(float f) { return emu::from_bits<uint32_t>(emu::to_bits(f)); }
inline float __int_as_float(int i) { return emu::from_bits<float>(emu::to_bits(i)); }
// round to nearest even, as the default rounding mode does
inline unsigned long long __float2ull_rn(float x) {
  return static_cast<unsigned long long>(std::nearbyint(static_cast<double>(x)));
}
template <class T>
inline T __ldg(const T* p) { return *p; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
[[noreturn]] inline void __trap() { emu::fail("__trap() in block %u thread %u", blockIdx.x, threadIdx.x); }

// Shared memory atomics give way first, so that other threads (and other blocks, through
// DSMEM) interleave with them; an atomic on the memory of an exited block is an error.
template <class T>
inline T atomicAdd(T* p, T v) {
  emu::yield();
  if (const emu::Block* owner = emu::locate(p).block; owner && owner->exited)
    emu::fail("block %d: atomicAdd on the shared memory of exited block %d", emu::block().rank, owner->rank);
  const T old = *p;
  *p = old + v;
  return old;
}

inline void __syncthreads() { emu::Scheduler::get().arrive_and_wait(emu::block().bar); }

inline int __syncthreads_or(int pred) {
  emu::Block& b = emu::block();
  if (pred) b.sync_or = 1;
  __syncthreads();
  const int any = b.sync_or;
  __syncthreads();  // everyone has read it
  if (threadIdx.x == 0) b.sync_or = 0;
  __syncthreads();  // reset before the next call sets it
  return any;
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  return emu::warp_exchange(mask, v, [=](int) { return src & 31; }, "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return emu::warp_exchange(mask, v, [=](int lane) { return (lane ^ lane_mask) & 31; }, "__shfl_xor_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  const int d = static_cast<int>(delta);
  return emu::warp_exchange(mask, v, [=](int lane) { return lane >= d ? lane - d : -1; }, "__shfl_up_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu::check_full_mask(mask, "__ballot_sync");
  emu::Warp& w = emu::block().warps[threadIdx.x / 32];
  uint64_t* slot = w.slot[w.bar.generation & 1];
  slot[threadIdx.x % 32] = pred ? 1 : 0;
  emu::Scheduler::get().arrive_and_wait(w.bar);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= static_cast<unsigned>(slot[lane]) << lane;
  return bits;
}

// ---------------------------------------------------------------- cooperative groups (clusters)
namespace cooperative_groups {
struct cluster_group {
  static void sync() {
    barrier_arrive();
    barrier_wait();
  }
  static void barrier_arrive() {
    emu::Scheduler& s = emu::Scheduler::get();
    emu::Fiber& f = s.fiber();
    if (f.cluster_arrived)
      emu::fail("block %d thread %d: barrier_arrive twice without barrier_wait", s.block().rank, f.tid);
    f.cluster_phase = s.arrive(s.cluster_barrier());
    f.cluster_arrived = true;
  }
  static void barrier_wait() {
    emu::Scheduler& s = emu::Scheduler::get();
    emu::Fiber& f = s.fiber();
    if (!f.cluster_arrived) emu::fail("block %d thread %d: barrier_wait without barrier_arrive", s.block().rank, f.tid);
    f.cluster_arrived = false;
    s.wait(s.cluster_barrier(), f.cluster_phase);
    ++f.cluster_waits;
  }
  static unsigned block_rank() { return static_cast<unsigned>(emu::block().rank); }

  // p (this block's shared memory) in block `rank` of the cluster.
  template <class T>
  static T* map_shared_rank(T* p, int rank) {
    emu::yield();
    emu::Scheduler& s = emu::Scheduler::get();
    const int me = s.block().rank;
    if (s.fiber().cluster_waits == 0)
      emu::fail("block %d thread %d: DSMEM access before the first cluster barrier", me, s.fiber().tid);
    if (rank < 0 || rank >= s.cluster_size()) emu::fail("block %d: map_shared_rank to rank %d", me, rank);
    const emu::SharedAddress at = emu::locate(p);
    if (at.block != &s.block()) emu::fail("block %d: map_shared_rank of an address outside its shared memory", me);
    emu::Block& target = s.block(rank);
    if (target.exited) emu::fail("block %d: DSMEM access to exited block %d", me, rank);
    if (at.tag == nullptr) return reinterpret_cast<T*>(target.dynamic.data() + at.offset);
    for (auto& a : target.statics)
      if (a.tag == at.tag) return reinterpret_cast<T*>(a.bytes.get() + at.offset);
    emu::fail("block %d: DSMEM access to a __shared__ variable block %d has not reached", me, rank);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
