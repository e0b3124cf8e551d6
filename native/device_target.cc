// device_target.cc — see device_target.h; docs/architecture.md describes the gate.
#include "device_target.h"

#include <napi.h>

#include <string.h>
#include <time.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <unordered_map>

#include "napi_util.h"

namespace strata {

const uint64_t DeviceTarget::kLatBoundsNs[kLatBuckets - 1] = {
    10000,    25000,    50000,     100000,    250000,    500000,     1000000,   2500000,
    5000000,  10000000, 25000000,  50000000,  100000000, 1000000000, 10000000000ull};

DeviceTarget::DeviceTarget(uint8_t* heap, uint64_t size, uint32_t blockSize)
    : heap_(heap), size_(size), bs_(blockSize), stripes_(new std::atomic<int32_t>[kStripes]()) {}

DeviceTarget::~DeviceTarget() = default;

// Dekker-style handshake with seq_cst on both sides: a native request
// announces itself, then checks the JS counters; JS announces itself, then
// checks the native counters. At least one of them sees the other.
bool DeviceTarget::enter(bool writer) {
  (writer ? jsWriters_ : jsReaders_).fetch_add(1);
  return drained(writer);
}

bool DeviceTarget::drained(bool writer) const {
  return natWriters_.load() == 0 && (!writer || natReaders_.load() == 0);
}

void DeviceTarget::exit(bool writer) { (writer ? jsWriters_ : jsReaders_).fetch_sub(1); }

uint32_t DeviceTarget::acquire(bool w, uint64_t off, uint32_t len, bool final) {
  if (len == 0 || off > size_ || len > size_ - off) return 0;
  std::atomic<int32_t>& mine = w ? natWriters_ : natReaders_;
  mine.fetch_add(1);
  const uint32_t view = view_;
  if (jsWriters_.load() != 0 || (w && jsReaders_.load() != 0) || !view) {
    mine.fetch_sub(1);
    slowPlans.fetch_add(1, std::memory_order_relaxed);
    slowGate.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  if (!lockStripes(off, len, w)) {
    mine.fetch_sub(1);
    if (!final) return kBusy;
    slowPlans.fetch_add(1, std::memory_order_relaxed);
    slowBusy.fetch_add(1, std::memory_order_relaxed);
    return 0;
  }
  return view;
}

void DeviceTarget::release(bool w, uint64_t off, uint32_t len, bool ok, uint64_t ns) {
  count(w, len, ok, ns);
  unlockStripes(off, len);
  (w ? natWriters_ : natReaders_).fetch_sub(1);
}

void DeviceTarget::count(bool w, uint64_t len, bool ok, uint64_t dt) {
  if (!ok) return;
  (w ? fastWrites : fastReads).fetch_add(1, std::memory_order_relaxed);
  (w ? writeBytes : readBytes).fetch_add(len, std::memory_order_relaxed);
  int i = 0;
  while (i < kLatBuckets - 1 && dt > kLatBoundsNs[i]) i++;
  lat[w][i].fetch_add(1, std::memory_order_relaxed);
  latSumNs[w].fetch_add(dt, std::memory_order_relaxed);
}

void DeviceTarget::unplanned(bool w, uint64_t off, uint32_t len) {
  unlockStripes(off, len);
  (w ? natWriters_ : natReaders_).fetch_sub(1);
  slowPlans.fetch_add(1, std::memory_order_relaxed);
}

// Stripes are only ever *tried*: a frontend may hold a plan across
// asynchronous I/O (ublk queues submit to io_uring and finish when they reap
// the completion on the same thread), so blocking here on a stripe that
// thread itself holds would deadlock it. A request that meets a busy stripe
// takes the slow path instead, so stripes are small (4 KiB) and many: with
// 64 KiB x 256 stripes a quarter of 4 KiB random writes at depth 64 met a
// busy stripe by chance (bench:ublk) and went the slow path. Indexes wrap
// around kStripes: each is taken once; a request covering them all takes all
// of them. A stripe is a count: > 0 readers, -1 one writer.
namespace {
bool TryStripe(std::atomic<int32_t>& s, bool excl) {
  int32_t v = s.load(std::memory_order_relaxed);
  if (excl) return v == 0 && s.compare_exchange_strong(v, -1, std::memory_order_acquire);
  while (v >= 0)
    if (s.compare_exchange_weak(v, v + 1, std::memory_order_acquire)) return true;
  return false;
}
void DropStripe(std::atomic<int32_t>& s) {
  // Held by us: -1 means we are its writer, otherwise one of its readers.
  if (s.load(std::memory_order_relaxed) == -1) s.store(0, std::memory_order_release);
  else s.fetch_sub(1, std::memory_order_release);
}
}  // namespace

void DeviceTarget::stripeSpan(uint64_t off, uint32_t len, uint64_t& first, uint64_t& count) const {
  const uint64_t s0 = off >> kStripeShift, s1 = (off + len - 1) >> kStripeShift;
  if (s1 - s0 + 1 >= kStripes) first = 0, count = kStripes;
  else first = s0, count = s1 - s0 + 1;
}

bool DeviceTarget::lockStripes(uint64_t off, uint32_t len, bool excl) {
  uint64_t first, count;
  stripeSpan(off, len, first, count);
  for (uint64_t k = 0; k < count; k++) {
    if (!TryStripe(stripes_[(first + k) % kStripes], excl)) {
      for (uint64_t j = 0; j < k; j++) DropStripe(stripes_[(first + j) % kStripes]);
      return false;
    }
  }
  return true;
}

void DeviceTarget::unlockStripes(uint64_t off, uint32_t len) {
  uint64_t first, count;
  stripeSpan(off, len, first, count);
  for (uint64_t k = 0; k < count; k++) DropStripe(stripes_[(first + k) % kStripes]);
}

// The engine's own requests take the stripes of their blocks too, so a
// native request meets only the engine requests on its own range. The span
// is widened to whole blocks and capped at one turn of the stripes.
namespace {
void BlockSpan(uint64_t off, uint64_t len, uint32_t bs, uint64_t cap, uint64_t& a, uint32_t& n) {
  a = off / bs * bs;
  n = static_cast<uint32_t>(std::min<uint64_t>((off + len + bs - 1) / bs * bs - a, cap));
}
}  // namespace

bool DeviceTarget::lockRange(uint64_t off, uint64_t len, bool excl) {
  if (len == 0) return true;
  uint64_t a;
  uint32_t n;
  BlockSpan(off, len, bs_, kStripes << kStripeShift, a, n);
  return lockStripes(a, n, excl);
}

void DeviceTarget::unlockRange(uint64_t off, uint64_t len) {
  if (len == 0) return;
  uint64_t a;
  uint32_t n;
  BlockSpan(off, len, bs_, kStripes << kStripeShift, a, n);
  unlockStripes(a, n);
}

// ------------------------------------------------------------------ JS

namespace {

class DeviceTargetJs : public Napi::ObjectWrap<DeviceTargetJs> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "DeviceTarget",
                       {InstanceMethod<&DeviceTargetJs::Enter>("enter"),
                        InstanceMethod<&DeviceTargetJs::Drained>("drained"),
                        InstanceMethod<&DeviceTargetJs::Exit>("exit"),
                        InstanceMethod<&DeviceTargetJs::SetView>("setView"),
                        InstanceMethod<&DeviceTargetJs::LockRange>("lockRange"),
                        InstanceMethod<&DeviceTargetJs::UnlockRange>("unlockRange"),
                        InstanceMethod<&DeviceTargetJs::Stats>("stats"),
                        InstanceMethod<&DeviceTargetJs::Share>("share"),
                        InstanceMethod<&DeviceTargetJs::Acquire>("acquire"),
                        InstanceMethod<&DeviceTargetJs::Release>("release"),
                        InstanceMethod<&DeviceTargetJs::Close>("close")});
  }

  ~DeviceTargetJs() override {
    if (!key_) return;
    std::lock_guard<std::mutex> g(registryMu_);
    registry_.erase(key_);
  }

  // new DeviceTarget(heap: SharedArrayBuffer, size: number, blockSize: number),
  // or new DeviceTarget(key) in another thread: the target share() named.
  explicit DeviceTargetJs(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceTargetJs>(info) {
    Napi::Env env = info.Env();
    if (info.Length() == 1) {
      const uint64_t key = ArgUint(info, 0, "key", UINT32_MAX);
      {
        std::lock_guard<std::mutex> g(registryMu_);
        auto it = registry_.find(static_cast<uint32_t>(key));
        if (it != registry_.end()) t_ = it->second.lock();
      }
      if (!t_) Fail(env, ENOENT, "no shared device target " + std::to_string(key) + " (its device is gone)");
      return;
    }
    Bytes heap = GetBytes(env, info[0], "heap");
    if (heap.arrayBuffer) Fail(env, EINVAL, "heap must be the engine's shared WebAssembly memory");
    const uint64_t size = ArgUint(info, 1, "size", 1ull << 53);
    const uint64_t bs = ArgUint(info, 2, "blockSize", 1u << 20);
    if (bs < 512 || (bs & (bs - 1))) Fail(env, EINVAL, "blockSize must be a power of two >= 512");
    heapRef_ = Napi::Persistent(info[0]);
    t_ = std::make_shared<DeviceTarget>(heap.data, size, static_cast<uint32_t>(bs));
  }

 private:
  Napi::Value Enter(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), t_->enter(info[0].ToBoolean()));
  }
  Napi::Value Drained(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), t_->drained(info[0].ToBoolean()));
  }
  void Exit(const Napi::CallbackInfo& info) { t_->exit(info[0].ToBoolean()); }

  // setView(viewRecord: heap offset of the device's VIEW record, or 0 / null for none)
  void SetView(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!t_->drained(true)) Fail(env, EBUSY, "setView needs the gate held as a writer with natives drained");
    if (info[0].IsNull() || info[0].IsUndefined()) { t_->setView(0); return; }
    t_->setView(static_cast<uint32_t>(ArgUint(info, 0, "view", UINT32_MAX)));
  }

  // lockRange(offset, length, exclusive): false when a native request holds part of it.
  Napi::Value LockRange(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const uint64_t off = ArgUint(info, 0, "offset", 1ull << 53), len = ArgUint(info, 1, "length", 1ull << 53);
    return Napi::Boolean::New(env, t_->lockRange(off, len, info[2].ToBoolean()));
  }

  void UnlockRange(const Napi::CallbackInfo& info) {
    t_->unlockRange(ArgUint(info, 0, "offset", 1ull << 53), ArgUint(info, 1, "length", 1ull << 53));
  }

  // share(): a key another thread passes to new DeviceTarget(key) to reach
  // this target. The registry holds it weakly: the key dies with the target.
  Napi::Value Share(const Napi::CallbackInfo& info) {
    std::lock_guard<std::mutex> g(registryMu_);
    if (!key_) {
      key_ = ++nextKey_;
      registry_[key_] = t_;
    }
    return Napi::Number::New(info.Env(), key_);
  }

  // acquire(write, offset, length, final): the view record to plan from,
  // 0 (slow path), or 1 when another request holds the stripes and final is
  // false (nothing held or counted: the caller tries again soon).
  Napi::Value Acquire(const Napi::CallbackInfo& info) {
    Target();
    const uint32_t v = t_->acquire(info[0].ToBoolean(), static_cast<uint64_t>(info[1].As<Napi::Number>().DoubleValue()),
                                   info[2].As<Napi::Number>().Uint32Value(), info[3].ToBoolean());
    return Napi::Number::New(info.Env(), v);
  }

  // release(write, offset, length, outcome, elapsedNs): ends an acquired
  // request; outcome 1 done, 0 its I/O failed, -1 the planner sent it slow.
  void Release(const Napi::CallbackInfo& info) {
    Target();
    const bool w = info[0].ToBoolean();
    const uint64_t off = static_cast<uint64_t>(info[1].As<Napi::Number>().DoubleValue());
    const uint32_t len = info[2].As<Napi::Number>().Uint32Value();
    const int outcome = info[3].As<Napi::Number>().Int32Value();
    if (outcome < 0) t_->unplanned(w, off, len);
    else t_->release(w, off, len, outcome > 0, static_cast<uint64_t>(info[4].As<Napi::Number>().DoubleValue()));
  }

  // close(): this object lets go of the target (a worker's connection ended).
  void Close(const Napi::CallbackInfo&) { t_.reset(); }

  DeviceTarget* Target() {
    if (!t_) Fail(Env(), EBADF, "device target closed");
    return t_.get();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("fastReads", double(t_->fastReads.load()));
    o.Set("fastWrites", double(t_->fastWrites.load()));
    o.Set("slowPlans", double(t_->slowPlans.load()));
    o.Set("slowGate", double(t_->slowGate.load()));
    o.Set("slowBusy", double(t_->slowBusy.load()));
    o.Set("readBytes", double(t_->readBytes.load()));
    o.Set("writeBytes", double(t_->writeBytes.load()));
    // latency: {boundsNs, read: {counts, sumNs}, write: {counts, sumNs}}
    Napi::Object lat = Napi::Object::New(env);
    Napi::Array bounds = Napi::Array::New(env, DeviceTarget::kLatBuckets - 1);
    for (int i = 0; i < DeviceTarget::kLatBuckets - 1; i++) bounds.Set(i, double(DeviceTarget::kLatBoundsNs[i]));
    lat.Set("boundsNs", bounds);
    for (int w = 0; w < 2; w++) {
      Napi::Object side = Napi::Object::New(env);
      Napi::Array counts = Napi::Array::New(env, DeviceTarget::kLatBuckets);
      for (int i = 0; i < DeviceTarget::kLatBuckets; i++) counts.Set(i, double(t_->lat[w][i].load()));
      side.Set("counts", counts);
      side.Set("sumNs", double(t_->latSumNs[w].load()));
      lat.Set(w ? "write" : "read", side);
    }
    o.Set("latency", lat);
    return o;
  }

  Napi::Reference<Napi::Value> heapRef_;
  std::shared_ptr<DeviceTarget> t_;
  uint32_t key_ = 0;
  static std::mutex registryMu_;
  static std::unordered_map<uint32_t, std::weak_ptr<DeviceTarget>> registry_;
  static uint32_t nextKey_;
};

std::mutex DeviceTargetJs::registryMu_;
std::unordered_map<uint32_t, std::weak_ptr<DeviceTarget>> DeviceTargetJs::registry_;
uint32_t DeviceTargetJs::nextKey_ = 0;

}  // namespace

void InitDeviceTarget(Napi::Env env, Napi::Object exports) {
  exports.Set("DeviceTarget", DeviceTargetJs::Init(env));
}

}  // namespace strata
