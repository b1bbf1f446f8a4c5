// The CPU emulator's scheduler (see emu.h): blocks on OS threads, CUDA threads as fibers.
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "emu.h"

namespace cuda_emu {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

Device g_device;
LaunchRecord g_last_launch;
std::string g_error;

// Fibers of one block waiting for each other. Complete when `expected` fibers have arrived;
// waiters see `generation` change.
struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
  const char* what = "";
};

// OS threads (blocks) of a cooperative launch waiting for each other; broken when a block fails,
// so that the others do not wait forever.
struct GridBarrier {
  std::mutex mu;
  std::condition_variable cv;
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
  bool broken = false;

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu);
    const uint64_t gen = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    cv.wait(lock, [&] { return generation != gen || broken; });
  }
  void break_all() {
    std::lock_guard<std::mutex> lock(mu);
    broken = true;
    cv.notify_all();
  }
};

// The operands of one mma.sync of a warp, lane by lane; the result replaces `c`.
struct MmaSlot {
  uint32_t a[kWarp][4], b[kWarp][2];
  float c[kWarp][4];
  bool bf16[kWarp];
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 index;
  int linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;
  uint64_t wait_generation = 0;
};

struct Block {
  dim3 index, dim, grid;
  std::vector<Fiber> fibers;
  Barrier threads, grid_arrivals;
  std::vector<Barrier> warps;
  std::vector<std::array<std::array<float, kWarp>, 2>> shuffle_slots;  // double-buffered by generation
  std::vector<std::array<MmaSlot, 2>> mma_slots;                        // the same for mma.sync
  std::vector<std::array<const char*, 2>> warp_ops;                     // which collective each generation is
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  GridBarrier* grid_barrier = nullptr;
};

thread_local Block* t_block = nullptr;

Block& block() { return *t_block; }

// The calling fiber arrives at `b`; the last arrival runs `on_complete` (with every other fiber
// of the barrier parked) and releases the others.
template <typename F>
void arrive(Barrier& b, F&& on_complete) {
  if (++b.arrived == b.expected) {
    on_complete();
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Block& blk = block();
  Fiber* self = blk.current;
  self->waiting = &b;
  self->wait_generation = b.generation;
  swapcontext(&self->context, &blk.scheduler);
}
void arrive(Barrier& b) {
  arrive(b, [] {});
}

// A fiber that returned no longer counts towards block-wide barriers (as an exited GPU thread).
void leave(Barrier& b) {
  --b.expected;
  if (b.expected > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

void fiber_main() {
  Block& blk = block();
  (*blk.body)();
  blk.current->done = true;
}  // returns to uc_link: the scheduler

// Runs one block to completion. Returns an empty string, or what went wrong.
std::string run_block(Block& blk) {
  const int n = static_cast<int>(blk.dim.x * blk.dim.y * blk.dim.z);
  if (blk.fibers.size() != static_cast<size_t>(n)) blk.fibers = std::vector<Fiber>(n);
  blk.threads = {n, 0, 0, "__syncthreads"};
  blk.grid_arrivals = {n, 0, 0, "grid.sync()"};
  blk.warps.assign(n / kWarp, Barrier{kWarp, 0, 0, "a warp collective"});
  blk.shuffle_slots.assign(n / kWarp, {});
  blk.mma_slots.assign(n / kWarp, {});
  blk.warp_ops.assign(n / kWarp, {});
  t_block = &blk;
  for (int i = 0; i < n; ++i) {
    Fiber& f = blk.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.linear = i;
    f.index = dim3(i % blk.dim.x, (i / blk.dim.x) % blk.dim.y, i / (blk.dim.x * blk.dim.y));
    f.done = false;
    f.waiting = nullptr;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &blk.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  int live = n;
  std::string error;
  const Schedule schedule = g_device.schedule;
  while (live > 0) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      Fiber& f = blk.fibers[schedule == Schedule::highest_first ? n - 1 - k : k];
      if (f.done || (f.waiting != nullptr && f.waiting->generation == f.wait_generation)) continue;
      f.waiting = nullptr;
      blk.current = &f;
      swapcontext(&blk.scheduler, &f.context);
      ran = true;
      if (f.done) {
        --live;
        leave(blk.threads);
        leave(blk.grid_arrivals);
      }
      if (schedule != Schedule::round_robin) break;  // eager: rescan from the first thread in order
    }
    if (!ran) {  // every live fiber waits for one that will never arrive
      const Fiber* w = nullptr;
      for (const Fiber& f : blk.fibers) w = (w == nullptr && !f.done) ? &f : w;
      error = "deadlock in block (" + std::to_string(blk.index.x) + "," + std::to_string(blk.index.y) + "," +
              std::to_string(blk.index.z) + "): " + std::to_string(live) + " threads wait, thread " +
              std::to_string(w->linear) + " at " + w->waiting->what + " (" + std::to_string(w->waiting->arrived) +
              " of " + std::to_string(w->waiting->expected) + " arrived)";
      blk.fibers.clear();  // abandons the parked fibers' stacks
      break;
    }
  }
  t_block = nullptr;
  return error;
}

// The calling lane's seat at a warp collective. Every lane of a warp must reach the same one: a
// lane at a different collective is a kernel bug (on a GPU, undefined behaviour) and aborts.
struct WarpSeat {
  int lane, warp;
  Barrier& barrier;
};
WarpSeat join_warp(const char* op) {
  Block& blk = block();
  const int lane = blk.current->linear % kWarp, warp = blk.current->linear / kWarp;
  Barrier& b = blk.warps[warp];
  const char*& first = blk.warp_ops[warp][b.generation & 1];
  if (b.arrived == 0) {
    first = op;
    b.what = op;  // what a deadlock report names
  } else if (first != op) {
    fprintf(stderr, "cuda_emu: lanes of warp %d meet at different collectives (%s and %s)\n", warp, first, op);
    abort();
  }
  return {lane, warp, b};
}

// One operand value: half `h` of a 32-bit register holding two fp16 or bf16 values.
double mma_value(uint32_t reg, int h, bool bf16) {
  const uint16_t bits = static_cast<uint16_t>(h ? reg >> 16 : reg & 0xFFFFu);
  return bf16 ? fastlora::bf16_to_f32(bits) : fastlora::f16_to_f32(bits);
}

}  // namespace

void configure(const Device& d) { g_device = d; }
const Device& device() { return g_device; }
const char* last_error_message() { return g_error.c_str(); }
const LaunchRecord& last_launch() { return g_last_launch; }

const dim3& thread_idx() { return block().current->index; }
const dim3& block_idx() { return block().index; }
const dim3& block_dim() { return block().dim; }
const dim3& grid_dim() { return block().grid; }

void sync_threads() { arrive(block().threads); }

float shfl_xor(unsigned mask, float value, int lane_mask, int width) {
  if (mask != 0xFFFFFFFFu || width != kWarp || lane_mask < 0 || lane_mask >= kWarp) {
    fprintf(stderr, "cuda_emu: only full-warp __shfl_xor_sync is emulated (mask %x, width %d)\n", mask, width);
    abort();
  }
  const WarpSeat seat = join_warp("__shfl_xor_sync");
  auto& slot = block().shuffle_slots[seat.warp][seat.barrier.generation & 1];
  slot[seat.lane] = value;
  arrive(seat.barrier);
  return slot[seat.lane ^ lane_mask];
}

void mma_m16n8k16(bool bf16, const uint32_t (&a)[4], const uint32_t (&b)[2], float (&d)[4]) {
  const WarpSeat seat = join_warp("mma.sync");
  const int lane = seat.lane, warp = seat.warp;
  MmaSlot& s = block().mma_slots[warp][seat.barrier.generation & 1];
  std::copy(a, a + 4, s.a[lane]);
  std::copy(b, b + 2, s.b[lane]);
  std::copy(d, d + 4, s.c[lane]);
  s.bf16[lane] = bf16;
  arrive(seat.barrier, [&s, warp] {
    // PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type": lane = 4 * group + tig;
    // value i (register i / 2, low half first) of A is A[group + 8 * (i / 2 % 2)][2 * tig + i % 2 + 8 * (i / 4)],
    // of B is B[2 * tig + i % 2 + 8 * (i / 2)][group]; of C and D, C[group + 8 * (i / 2)][2 * tig + i % 2].
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < kWarp; ++l) {
      if (s.bf16[l] != s.bf16[0]) {
        fprintf(stderr, "cuda_emu: lanes of warp %d disagree on the mma's operand type\n", warp);
        abort();
      }
      const int group = l / 4, tig = l % 4;
      for (int i = 0; i < 8; ++i)
        A[group + 8 * (i / 2 % 2)][2 * tig + i % 2 + 8 * (i / 4)] = mma_value(s.a[l][i / 2], i % 2, s.bf16[l]);
      for (int i = 0; i < 4; ++i)
        B[2 * tig + i % 2 + 8 * (i / 2)][group] = mma_value(s.b[l][i / 2], i % 2, s.bf16[l]);
      for (int i = 0; i < 4; ++i) C[group + 8 * (i / 2)][2 * tig + i % 2] = s.c[l][i];
    }
    for (int l = 0; l < kWarp; ++l) {
      const int group = l / 4, tig = l % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = group + 8 * (i / 2), col = 2 * tig + i % 2;
        double sum = C[row][col];  // fp16/bf16 products are exact in double; summed there, then rounded
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        s.c[l][i] = static_cast<float>(sum);
      }
    }
  });
  std::copy(s.c[lane], s.c[lane] + 4, d);
}

void sync_grid() {
  Block& blk = block();
  if (blk.grid_barrier == nullptr) {
    fprintf(stderr, "cuda_emu: this_grid().sync() in a launch that is not cooperative\n");
    abort();
  }
  arrive(blk.grid_arrivals, [&] { blk.grid_barrier->arrive_and_wait(); });
}

cudaError_t run(dim3 grid, dim3 block_dim_, bool cooperative, const std::function<void()>& body) {
  g_error.clear();
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  const int64_t threads = static_cast<int64_t>(block_dim_.x) * block_dim_.y * block_dim_.z;
  g_last_launch = {static_cast<unsigned>(blocks), static_cast<unsigned>(threads), cooperative};
  if (blocks <= 0 || threads <= 0 || threads > 1024 || threads % kWarp != 0) {
    g_error = "launch of " + std::to_string(blocks) + " blocks of " + std::to_string(threads) +
              " threads: the emulator takes 1 to 1024 threads per block, in whole warps";
    return cudaErrorInvalidConfiguration;
  }
  auto index_of = [&](int64_t b) {
    return dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                static_cast<unsigned>(b / (static_cast<int64_t>(grid.x) * grid.y)));
  };
  std::mutex error_mu;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(error_mu);
    if (g_error.empty()) g_error = what;
  };
  GridBarrier grid_barrier;
  grid_barrier.expected = static_cast<int>(blocks);
  std::atomic<int64_t> next{0};
  // A cooperative grid needs all blocks at once; otherwise a pool pulls blocks in order.
  const int64_t workers = cooperative ? blocks : std::min<int64_t>(blocks, std::max(1u, std::thread::hardware_concurrency()));
  auto worker = [&](int64_t first) {
    Block blk;
    blk.dim = block_dim_;
    blk.grid = grid;
    blk.body = &body;
    blk.grid_barrier = cooperative ? &grid_barrier : nullptr;
    for (int64_t b = cooperative ? first : next++; b < blocks; b = cooperative ? blocks : next++) {
      blk.index = index_of(b);
      const std::string error = run_block(blk);
      if (!error.empty()) {
        fail(error);
        grid_barrier.break_all();
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < workers; ++w) pool.emplace_back(worker, w);
  for (std::thread& t : pool) t.join();
  if (grid_barrier.broken && g_error.empty()) g_error = "grid barrier broken";
  return g_error.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace cuda_emu
