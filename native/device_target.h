// device_target.h — the gate and stripes between a strata device's engine
// (JavaScript, main thread) and the I/O workers that serve its requests
// (they plan in WASM, assembly/plan.ts, from the device's *view record*).
// JavaScript publishes the view and guards every change of it, and every
// engine-side request, with a gate: while JS holds the gate as a writer no
// worker request runs (they fall back to the slow path), and JS waits for
// the requests in flight to finish before it proceeds. JS readers only keep
// worker *writers* out. Worker requests exclude each other per 4 KiB stripe,
// so a read never sees half of a concurrent write (H1); stripes are only
// try-locked (a worker holds them across asynchronous I/O on its ring), and
// a busy stripe makes the request wait a few turns, then go the slow path.
// No planning here: this is synchronisation shared between threads.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace strata {

class DeviceTarget {
 public:
  DeviceTarget(uint8_t* heap, uint64_t size, uint32_t blockSize);
  ~DeviceTarget();

  uint64_t size() const { return size_; }

  // The gate and stripes of one request (an I/O worker plans it in WASM):
  // acquire() returns the view record to plan
  // from, or 0 (the request goes the slow path; nothing is held); release()
  // ends it, with how long it took (ns) for the latency histogram.
  // With final false, a busy stripe returns kBusy (nothing held or counted:
  // the caller tries again soon) instead of 0.
  static constexpr uint32_t kBusy = 1;
  uint32_t acquire(bool write, uint64_t off, uint32_t len, bool final = true);
  void release(bool write, uint64_t off, uint32_t len, bool ok, uint64_t ns);
  /** Ends an acquired request the planner could not place (it goes the slow path). */
  void unplanned(bool write, uint64_t off, uint32_t len);

  // The gate (JS side). enter() returns true when no native request of the
  // conflicting kind is in flight any more; otherwise poll drained().
  bool enter(bool writer);
  bool drained(bool writer) const;
  void exit(bool writer);
  /**
   * The device's view record (heap offset; 0: none), the one the WASM
   * planner reads (layout: assembly/layout.ts, VIEW). Only while JS holds
   * the gate as a writer (no native request in flight).
   */
  void setView(uint32_t view) { view_ = view; }

  /** The engine's side of the stripes (try only; block-aligned; ranges over 64 MiB take them all). */
  bool lockRange(uint64_t off, uint64_t len, bool excl);
  void unlockRange(uint64_t off, uint64_t len);

  // slowPlans = slowGate (the engine held the gate) + slowBusy (a stripe was
  // held) + requests the tables cannot place (cold, copy-on-write, ...).
  std::atomic<uint64_t> fastReads{0}, fastWrites{0}, slowPlans{0}, slowGate{0}, slowBusy{0};
  std::atomic<uint64_t> readBytes{0}, writeBytes{0};
  // Service time of worker requests (acquire() to release(), so it includes
  // the I/O), per op: counts per bucket (upper bounds in kLatBoundsNs,
  // the last one unbounded) and the sum. Two clock reads and two relaxed
  // adds per request: cheap next to the I/O itself.
  static constexpr int kLatBuckets = 16;
  static const uint64_t kLatBoundsNs[kLatBuckets - 1];
  std::atomic<uint64_t> lat[2][kLatBuckets] = {};
  std::atomic<uint64_t> latSumNs[2] = {};

 private:
  void count(bool write, uint64_t len, bool ok, uint64_t ns);
  bool lockStripes(uint64_t off, uint32_t len, bool excl);
  void unlockStripes(uint64_t off, uint32_t len);
  void stripeSpan(uint64_t off, uint32_t len, uint64_t& first, uint64_t& count) const;

  uint8_t* heap_;
  uint64_t size_;
  uint32_t bs_;
  uint32_t view_ = 0;
  std::atomic<int32_t> jsWriters_{0}, jsReaders_{0}, natReaders_{0}, natWriters_{0};
  static constexpr uint64_t kStripes = 16384;  // 64 KiB of counters per device
  static constexpr int kStripeShift = 12;      // 4 KiB
  std::unique_ptr<std::atomic<int32_t>[]> stripes_;
};

}  // namespace strata
