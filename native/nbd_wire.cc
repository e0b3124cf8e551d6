// nbd_wire.cc — the NBD transmission phase of one connection on a native
// thread. JavaScript negotiates (handshake, options) and then hands the
// socket over. The thread reads requests in batches, serves every READ and
// WRITE its Target can plan with plain pread/pwrite straight between the
// cache/overlay files and its socket buffers, and answers a whole batch with
// one send. Everything else (cold data, partial-block copy-on-write, FLUSH,
// TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS, FUA, errors) goes to JavaScript
// (the slow path), whose complete replies come back through reply() and are
// queued whole, so replies never interleave. Memory is bounded: the thread
// stops reading while too many slow requests or reply bytes are pending.
// A READ whose data is not in the page cache (RWF_NOWAIT says so) goes to a
// small pool of reader threads, so one read waiting for the disk does not
// stall every other request of the connection.
#include <napi.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "napi_util.h"
#include "target_js.h"

namespace strata {
namespace {

constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleMagic = 0x67446698;
constexpr uint32_t kStructuredMagic = 0x668e33ef;
constexpr size_t kReqLen = 28;
enum : uint16_t { CMD_READ = 0, CMD_WRITE = 1, CMD_DISC = 2 };
constexpr uint16_t kFlagDF = 4;
constexpr uint16_t kReplyDone = 1, kTypeOffsetData = 1, kTypeError = 32769;
constexpr uint32_t kEIO = 5;

inline uint16_t Be16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
inline uint32_t Be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
inline uint64_t Be64(const uint8_t* p) { return uint64_t(Be32(p)) << 32 | Be32(p + 4); }
inline void Put16(uint8_t* p, uint16_t v) { p[0] = v >> 8; p[1] = uint8_t(v); }
inline void Put32(uint8_t* p, uint32_t v) { p[0] = v >> 24; p[1] = uint8_t(v >> 16); p[2] = uint8_t(v >> 8); p[3] = uint8_t(v); }
inline void Put64(uint8_t* p, uint64_t v) { Put32(p, uint32_t(v >> 32)); Put32(p + 4, uint32_t(v)); }

// A growable byte buffer that does not zero what it grows into.
// Mapped straight from the kernel (mremap to grow, munmap to free): malloc
// would keep a freed 64 MiB reply buffer resident for the next one, and a
// connection whose client stopped reading would cost its peak for good.
struct ByteBuf {
  uint8_t* p = nullptr;
  size_t len = 0, cap = 0;
  ~ByteBuf() { if (p) munmap(p, cap); }
  uint8_t* grow(size_t n) {
    if (len + n > cap) {
      size_t c = cap ? cap : 64 * 1024;
      while (c < len + n) c *= 2;
      void* q = p ? mremap(p, cap, c, MREMAP_MAYMOVE) : mmap(nullptr, c, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (q == MAP_FAILED) throw std::bad_alloc();
      p = static_cast<uint8_t*>(q);
      cap = c;
    }
    uint8_t* at = p + len;
    len += n;
    return at;
  }
  void append(const void* d, size_t n) { memcpy(grow(n), d, n); }
  /** Gives a large buffer back to the allocator (its pages stay resident otherwise). */
  void trim(size_t keep) {
    if (len == 0 && cap > keep) { munmap(p, cap); p = nullptr; cap = 0; }
  }
};

// Buffers above this are freed once empty, so a connection's memory follows
// what it holds now, not the most it ever held.
constexpr size_t kKeepBuf = 4u << 20;

struct SlowReq {
  uint16_t type, flags;
  uint8_t cookie[8];
  uint64_t offset;
  uint32_t length;
  std::vector<uint8_t> payload;
};

// A WRITE handed to the connection's writer thread, so reads keep flowing
// while the filesystem allocates overlay blocks.
struct WriteJob {
  uint16_t flags;
  uint8_t cookie[8];
  uint64_t offset;
  uint32_t length;
  std::vector<uint8_t> payload;
};

// A READ planned on the connection thread whose data must come from the
// disk: a reader thread performs it, finishes the plan and queues the reply.
struct ReadJob {
  uint8_t cookie[8];
  uint64_t offset;
  uint32_t length;
  Plan plan;
};

// Reader threads per connection, started as page-cache misses queue up: as
// many as nbdkit's default thread pool, since while the disk is slow the
// rate at which cold reads come back is the number in flight.
constexpr size_t kMaxReaders = 16;

struct Opts {
  bool structured = false, readOnly = false;
  uint64_t size = 0;
  uint32_t minBlock = 512, maxPayload = 32u << 20;
  uint32_t maxInflight = 128;
  uint64_t maxInflightBytes = 64ull << 20, maxQueued = 64ull << 20;
};

class Wire : public Napi::ObjectWrap<Wire> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NbdWire",
                       {InstanceMethod<&Wire::Take>("take"), InstanceMethod<&Wire::Reply>("reply"),
                        InstanceMethod<&Wire::Shutdown>("shutdown"), InstanceMethod<&Wire::Destroy>("destroy"),
                        InstanceMethod<&Wire::Stats>("stats")});
  }

  // new NbdWire(fd, target | null, opts, initial: Buffer, onEvent(kind, message))
  explicit Wire(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Wire>(info) {
    Napi::Env env = info.Env();
    const int fd = static_cast<int>(ArgUint(info, 0, "fd", INT32_MAX));
    if (!info[1].IsNull() && !info[1].IsUndefined()) {
      target_ = TargetFromJs(info[1]);
      targetRef_ = Napi::Persistent(info[1]);
    }
    Napi::Object o = info[2].As<Napi::Object>();
    auto num = [&](const char* k, double dflt) {
      Napi::Value v = o.Get(k);
      return v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : dflt;
    };
    opts_.structured = o.Get("structured").ToBoolean();
    opts_.readOnly = o.Get("readOnly").ToBoolean();
    opts_.size = static_cast<uint64_t>(num("size", 0));
    opts_.minBlock = static_cast<uint32_t>(num("minBlock", 512));
    opts_.maxPayload = static_cast<uint32_t>(num("maxPayload", 32 << 20));
    opts_.maxInflight = static_cast<uint32_t>(num("maxInflight", 128));
    opts_.maxInflightBytes = static_cast<uint64_t>(num("maxInflightBytes", 64 << 20));
    opts_.maxQueued = static_cast<uint64_t>(num("maxQueuedReplyBytes", 64 << 20));
    // errno -> NBD error, as src/nbd/protocol.ts maps it (the rule lives there only).
    Napi::Value errs = o.Get("nbdErrors");
    if (errs.IsTypedArray() && errs.As<Napi::TypedArray>().TypedArrayType() == napi_uint32_array) {
      Napi::Uint32Array a = errs.As<Napi::Uint32Array>();
      nbdErr_.assign(a.Data(), a.Data() + a.ElementLength());
    }
    if (opts_.minBlock == 0) Fail(env, EINVAL, "minBlock must be >= 1");
    Bytes init = GetBytes(env, info[3], "initial");
    in_.append(init.data, init.len);
    if (!info[4].IsFunction()) Fail(env, EINVAL, "onEvent must be a function");

    // The JS socket keeps its own descriptor (and closes it); we own a dup.
    fd_ = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (fd_ < 0) Fail(env, errno, "dup socket");
    int fl = fcntl(fd_, F_GETFL);
    fcntl(fd_, F_SETFL, fl | O_NONBLOCK);
    efd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd_ < 0) { int e = errno; close(fd_); Fail(env, e, "eventfd"); }
    tsfn_ = Napi::ThreadSafeFunction::New(env, info[4].As<Napi::Function>(), "strata-nbd-wire", 0, 1);
    self_ = Napi::Persistent(info.This().As<Napi::Object>());  // alive until the thread is done
    th_ = std::thread([this] { Run(); });
  }

  ~Wire() override {
    if (th_.joinable()) th_.join();
    if (efd_ >= 0) close(efd_);
  }

 private:
  // ------------------------------------------------------------ JS side

  // Slow requests waiting for JS: [{type, flags, cookie, offset, length, payload}]
  Napi::Value Take(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<SlowReq> got;
    {
      std::lock_guard<std::mutex> g(mu_);
      got.swap(toJs_);
    }
    Napi::Array out = Napi::Array::New(env, got.size());
    for (size_t i = 0; i < got.size(); i++) {
      SlowReq& r = got[i];
      Napi::Object o = Napi::Object::New(env);
      o.Set("type", r.type);
      o.Set("flags", r.flags);
      o.Set("cookie", Napi::Buffer<uint8_t>::Copy(env, r.cookie, 8));
      o.Set("offset", static_cast<double>(r.offset));
      o.Set("length", static_cast<double>(r.length));
      if (r.type == CMD_WRITE) o.Set("payload", Napi::Buffer<uint8_t>::Copy(env, r.payload.data(), r.payload.size()));
      else o.Set("payload", env.Null());
      out.Set(i, o);
    }
    return out;
  }

  // reply(bytes: Buffer[] | Buffer | null, doneCount, doneBytes): complete
  // replies of slow requests (queued whole, copied here, so the caller may
  // reuse the buffers at once), and how many slow requests finished.
  void Reply(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<Bytes> parts;
    if (info[0].IsArray()) {
      Napi::Array a = info[0].As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); i++) parts.push_back(GetBytes(env, a.Get(i), "bytes"));
    } else if (!info[0].IsNull() && !info[0].IsUndefined()) parts.push_back(GetBytes(env, info[0], "bytes"));
    const uint64_t n = ArgUint(info, 1, "doneCount", UINT32_MAX);
    const uint64_t bytes = ArgUint(info, 2, "doneBytes", 1ull << 53);
    {
      std::lock_guard<std::mutex> g(mu_);
      for (const Bytes& b : parts) if (b.len) fromJs_.append(b.data, b.len);
      doneN_ += n;
      doneBytes_ += bytes;
    }
    Wake();
  }

  /** Stop reading; finish slow requests; send every reply; then close. */
  void Shutdown(const Napi::CallbackInfo&) { shutdown_.store(true); Wake(); }

  /** Close now; replies not yet sent are dropped. */
  void Destroy(const Napi::CallbackInfo&) {
    destroy_.store(true);
    std::lock_guard<std::mutex> g(mu_);
    if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
    Wake();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("fast", double(fast_.load()));
    o.Set("coldReads", double(cold_.load()));
    o.Set("slow", double(slow_.load()));
    o.Set("pendingSlow", double(pending_.load()));
    o.Set("phase", double(phase_.load()));
    o.Set("unsentBytes", double(unsent_.load(std::memory_order_relaxed)));
    return o;
  }

  // From the JS thread (reply, shutdown, destroy) or this wire's own
  // threads; efd_ is closed on the JS thread once those have ended.
  void Wake() {
    if (efd_ < 0) return;
    uint64_t one = 1;
    ssize_t r = write(efd_, &one, 8);
    (void)r;
  }

  // Events to JS: "requests" (call take()) and, once, "closed" (reason).
  void Emit(const char* kind, std::string msg) {
    auto* data = new std::pair<std::string, std::string>(kind, std::move(msg));
    napi_status st = tsfn_.BlockingCall(data, [](Napi::Env env, Napi::Function cb, std::pair<std::string, std::string>* d) {
      std::pair<std::string, std::string> e = std::move(*d);
      delete d;
      if (env != nullptr && cb != nullptr) cb.Call({Napi::String::New(env, e.first), Napi::String::New(env, e.second)});
    });
    if (st != napi_ok) delete data;
  }

  // ------------------------------------------------------- the thread

  void Run() {
    std::thread writer([this] { WriterLoop(); });
    std::string reason = Loop();
    {
      std::lock_guard<std::mutex> g(wmu_);
      wstop_ = true;
    }
    wcv_.notify_all();
    writer.join();
    {
      std::lock_guard<std::mutex> g(rmu_);
      rstop_ = true;
    }
    rcv_.notify_all();
    for (std::thread& t : readers_) t.join();
    {
      std::lock_guard<std::mutex> g(mu_);
      close(fd_);
      fd_ = -1;
    }
    Emit("closed", reason);
    // The JS side drops its reference when it sees "closed"; the persistent
    // self reference is released on the JS thread. So is the target, at once
    // rather than when this object is collected: this thread no longer uses
    // it, and a target may hold files open (a FileTarget's dup).
    auto* self = this;
    tsfn_.BlockingCall([self](Napi::Env, Napi::Function) {
      self->target_.reset();
      self->targetRef_.Reset();
      self->self_.Reset();
      // Not left to the destructor: a closed wire waits for garbage
      // collection, and connection churn would pile up descriptors until then.
      if (self->efd_ >= 0) { close(self->efd_); self->efd_ = -1; }
    });
    tsfn_.Release();
  }

  // Replies of requests in flight join the unsent ones when they finish, so
  // both count against the unsent bound: a client that stops reading holds
  // at most maxQueued (plus one request), not maxQueued + maxInflightBytes.
  bool Paused() const {
    const uint64_t inflight = slowBytes_ + offBytes_;
    return slowN_ + offN_ >= opts_.maxInflight || inflight >= opts_.maxInflightBytes ||
           out_.len - sent_ + inflight > opts_.maxQueued;
  }

  std::string Loop() {
    bool reading = true, peerGone = false;
    std::string why;
    for (;;) {
      if (reading && !Paused()) {
        std::string bad = Process(reading);
        if (!bad.empty()) { why = bad; peerGone = true; reading = false; }
      }
      if (!peerGone && !Flush()) { peerGone = true; why = why.empty() ? "send failed" : why; }
      if (destroy_.load()) return why.empty() ? "destroyed" : why;
      if (shutdown_.load()) reading = false;
      if (!reading || peerGone) {
        const bool idle = slowN_ == 0 && offN_ == 0;
        if (peerGone && idle) return why;
        if (!peerGone && idle && sent_ == out_.len) {
          shutdown(fd_, SHUT_WR);
          return why.empty() ? "disconnected" : why;
        }
      }
      pending_.store(slowN_, std::memory_order_relaxed);
      unsent_.store(out_.len - sent_, std::memory_order_relaxed);
      phase_.store(peerGone ? 2 : reading ? 0 : 1, std::memory_order_relaxed);
      pollfd p[2] = {{efd_, POLLIN, 0}, {fd_, 0, 0}};
      if (!peerGone) {
        if (reading && !Paused()) p[1].events |= POLLIN;
        if (sent_ < out_.len) p[1].events |= POLLOUT;
      }
      int n = poll(p, p[1].events ? 2 : 1, -1);
      if (n < 0 && errno != EINTR) return std::string("poll: ") + strerror(errno);
      if (p[0].revents & POLLIN) {
        TakeReplies();
        if (wokeJs_) { wokeJs_ = false; Emit("requests", ""); }
      }
      if (p[1].revents & (POLLERR | POLLHUP)) {
        if (!(p[1].revents & POLLIN)) { peerGone = true; reading = false; why = why.empty() ? "client went away" : why; }
      }
      if (p[1].revents & POLLIN) {
        if (!Recv()) { peerGone = true; reading = false; why = why.empty() ? "client went away" : why; }
      }
    }
  }

  void TakeReplies() {
    uint64_t v;
    ssize_t r = read(efd_, &v, 8);
    (void)r;
    std::lock_guard<std::mutex> g(mu_);
    if (fromJs_.len) {
      out_.append(fromJs_.p, fromJs_.len);
      fromJs_.len = 0;
      fromJs_.trim(kKeepBuf);
    }
    slowN_ -= doneN_;
    slowBytes_ -= doneBytes_;
    doneN_ = doneBytes_ = 0;
    offN_ -= offDone_;
    offBytes_ -= offDoneBytes_;
    offDone_ = offDoneBytes_ = 0;
    // Writes the writer could not plan become slow requests for JS.
    bool woke = false;
    for (WriteJob& j : wSlow_) {
      offN_--;
      offBytes_ -= j.length;
      SlowReq r{CMD_WRITE, j.flags, {}, j.offset, j.length, std::move(j.payload)};
      memcpy(r.cookie, j.cookie, 8);
      slowN_++;
      slowBytes_ += j.length;
      slow_.fetch_add(1, std::memory_order_relaxed);
      if (toJs_.empty()) woke = true;
      toJs_.push_back(std::move(r));
    }
    wSlow_.clear();
    wokeJs_ = wokeJs_ || woke;
  }

  // false: the peer is gone (EOF or error).
  bool Recv() {
    if (rpos_ == in_.len) { rpos_ = in_.len = 0; in_.trim(kKeepBuf); }
    size_t want = 1 << 20;
    if (in_.cap - in_.len < want / 4) {
      // Compact before growing: most of the buffer is usually consumed.
      if (rpos_ > 0) { memmove(in_.p, in_.p + rpos_, in_.len - rpos_); in_.len -= rpos_; rpos_ = 0; }
    }
    uint8_t* at = in_.grow(want);
    in_.len -= want;
    ssize_t n = recv(fd_, at, want, 0);
    if (n > 0) { in_.len += size_t(n); return true; }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;
    return false;
  }

  // Serves or forwards every complete request in the input buffer. Returns
  // a reason when the connection must be closed (bad magic, oversized write).
  std::string Process(bool& reading) {
    bool woke = false;
    std::string bad = Parse(reading, woke);
    // The batch's writes go to the writer at once: one lock and one wake-up.
    if (!handOff_.empty()) {
      {
        std::lock_guard<std::mutex> g(wmu_);
        for (WriteJob& j : handOff_) wq_.push_back(std::move(j));
      }
      handOff_.clear();
      wcv_.notify_one();
    }
    if (!coldOff_.empty()) {
      size_t n = coldOff_.size();
      {
        std::lock_guard<std::mutex> g(rmu_);
        for (ReadJob& j : coldOff_) rq_.push_back(std::move(j));
        while (readers_.size() < kMaxReaders && readers_.size() < rq_.size() + busyReaders_) {
          readers_.emplace_back([this] { ReaderLoop(); });
        }
      }
      coldOff_.clear();
      if (n == 1) rcv_.notify_one(); else rcv_.notify_all();
    }
    // Also when closing: slow requests already queued must reach JS, or
    // they never finish and the connection never closes.
    if (woke) Emit("requests", "");
    return bad;
  }

  std::string Parse(bool& reading, bool& woke) {
    while (in_.len - rpos_ >= kReqLen && !Paused()) {
      const uint8_t* h = in_.p + rpos_;
      if (Be32(h) != kRequestMagic) return "bad request magic";
      const uint16_t flags = Be16(h + 4), type = Be16(h + 6);
      const uint64_t off = Be64(h + 16);
      const uint32_t len = Be32(h + 24);
      size_t need = kReqLen;
      if (type == CMD_WRITE) {
        if (len > opts_.maxPayload) return "write of " + std::to_string(len) + " bytes exceeds the maximum payload";
        need += len;
        if (in_.len - rpos_ < need) {
          // Make room for the whole payload (reads then fill it).
          if (rpos_ > 0) { memmove(in_.p, in_.p + rpos_, in_.len - rpos_); in_.len -= rpos_; rpos_ = 0; }
          in_.grow(need);
          in_.len -= need;
          break;
        }
      }
      if (type == CMD_DISC) { rpos_ += kReqLen; reading = false; break; }
      const uint8_t* payload = h + kReqLen;
      // A write with a read queued behind it goes to the writer thread, so
      // the read need not wait for the filesystem to allocate the write's
      // blocks; other writes are cheaper done right here (no hand-off).
      if (type == CMD_WRITE && WriteCandidate(flags, off, len) && ReadAt(rpos_ + need)) {
        WriteJob j{flags, {}, off, len, std::vector<uint8_t>(payload, payload + len)};
        memcpy(j.cookie, h + 8, 8);
        offN_++;
        offBytes_ += len;
        handOff_.push_back(std::move(j));
      } else if (!Fast(type, flags, h + 8, off, len, payload)) {
        SlowReq r{type, flags, {}, off, len, {}};
        memcpy(r.cookie, h + 8, 8);
        if (type == CMD_WRITE) r.payload.assign(payload, payload + len);
        slowN_++;
        const uint64_t cost = type == CMD_WRITE ? len : type == CMD_READ ? std::min(len, opts_.maxPayload) : 0;
        slowBytes_ += cost;
        slow_.fetch_add(1, std::memory_order_relaxed);
        std::lock_guard<std::mutex> g(mu_);
        if (toJs_.empty()) woke = true;
        toJs_.push_back(std::move(r));
      }
      rpos_ += need;
    }
    return "";
  }

  bool Fast(uint16_t type, uint16_t flags, const uint8_t* cookie, uint64_t off, uint32_t len, const uint8_t* payload) {
    if (!Plannable(off, len)) return false;
    if (type == CMD_READ) {
      if (flags & ~kFlagDF) return false;
      if (!target_->plan(TOp::Read, off, len, plan_)) return false;
      const size_t mark = out_.len;
      uint8_t* data = ReadHeader(out_, cookie, off, len);
      bool ok = true;
      for (uint32_t i = 0; i < plan_.nseg && ok; i++) {
        const Seg& s = plan_.seg[i];
        const Got got = ReadSegNowait(s, data);
        if (got == Got::Miss) {
          // Not in the page cache: a reader thread waits for the disk.
          out_.len = mark;
          ReadJob j{{}, off, len, plan_};
          memcpy(j.cookie, cookie, 8);
          offN_++;
          offBytes_ += len;
          coldOff_.push_back(std::move(j));
          cold_.fetch_add(1, std::memory_order_relaxed);
          return true;
        }
        ok = got == Got::Done;
        data += s.len;
      }
      target_->finish(plan_, ok);
      if (!ok) { out_.len = mark; ErrorReply(CMD_READ, cookie, kEIO, "I/O error reading the device"); }
      fast_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    if (type == CMD_WRITE) {
      if (flags != 0 || opts_.readOnly) return false;
      if (!target_->plan(TOp::Write, off, len, plan_)) return false;
      PutSimple(out_, cookie, WritePlanned(plan_, payload));
      return true;
    }
    return false;
  }

  /** A READ/WRITE range the target may plan: non-empty, aligned, inside the device. */
  bool Plannable(uint64_t off, uint32_t len) const {
    return target_ && len > 0 && len <= opts_.maxPayload && off % opts_.minBlock == 0 && len % opts_.minBlock == 0 &&
           off <= opts_.size && len <= opts_.size - off;
  }

  bool WriteCandidate(uint16_t flags, uint64_t off, uint32_t len) const {
    return flags == 0 && !opts_.readOnly && Plannable(off, len);
  }

  /** Whether a whole READ request header sits at `at` in the input buffer. */
  bool ReadAt(size_t at) const { return in_.len - at >= kReqLen && Be16(in_.p + at + 6) == CMD_READ; }

  /** Performs a planned write from `src` and finishes the plan; the NBD error (0: written). */
  uint32_t WritePlanned(const Plan& plan, const uint8_t* src) {
    int e = 0;
    for (uint32_t i = 0; i < plan.nseg && !e; i++) {
      const Seg& sg = plan.seg[i];
      e = sg.fd >= 0 ? WriteAll(sg.fd, src, sg.len, sg.off) : EIO;
      src += sg.len;
    }
    target_->finish(plan, e == 0);
    fast_.fetch_add(1, std::memory_order_relaxed);
    return e ? NbdErr(e) : 0;
  }

  // The writer thread: plans and performs queued WRITEs; replies (whole)
  // and writes it cannot plan go back to the connection thread.
  void WriterLoop() {
    Plan plan;
    for (;;) {
      std::deque<WriteJob> batch;
      {
        std::unique_lock<std::mutex> g(wmu_);
        wcv_.wait(g, [this] { return !wq_.empty() || wstop_; });
        if (wq_.empty() && wstop_) return;
        batch.swap(wq_);
      }
      ByteBuf replies;
      std::vector<WriteJob> slow;
      uint64_t done = 0, doneBytes = 0;
      for (WriteJob& j : batch) {
        if (destroy_.load()) { done++; doneBytes += j.length; continue; }
        if (!target_->plan(TOp::Write, j.offset, j.length, plan)) { slow.push_back(std::move(j)); continue; }
        PutSimple(replies, j.cookie, WritePlanned(plan, j.payload.data()));
        done++;
        doneBytes += j.length;
      }
      {
        std::lock_guard<std::mutex> g(mu_);
        if (replies.len) fromJs_.append(replies.p, replies.len);
        offDone_ += done;
        offDoneBytes_ += doneBytes;
        for (WriteJob& j : slow) wSlow_.push_back(std::move(j));
      }
      Wake();
    }
  }

  // A reader thread: performs handed-off READs (blocking on the disk),
  // finishes their plans and queues each reply whole for the connection thread.
  void ReaderLoop() {
    std::unique_lock<std::mutex> g(rmu_);
    for (;;) {
      rcv_.wait(g, [this] { return !rq_.empty() || rstop_; });
      if (rq_.empty()) return;  // stopping, and nothing left to finish
      ReadJob j = std::move(rq_.front());
      rq_.pop_front();
      busyReaders_++;
      g.unlock();
      ByteBuf reply;
      bool ok = !destroy_.load();
      uint8_t* data = ReadHeader(reply, j.cookie, j.offset, j.length);
      for (uint32_t i = 0; i < j.plan.nseg && ok; i++) {
        ok = ReadSeg(j.plan.seg[i], data);
        data += j.plan.seg[i].len;
      }
      target_->finish(j.plan, ok);
      if (!ok) {
        reply.len = 0;
        ErrorReplyTo(reply, CMD_READ, j.cookie, kEIO, "I/O error reading the device");
      }
      {
        std::lock_guard<std::mutex> m(mu_);
        if (!destroy_.load()) fromJs_.append(reply.p, reply.len);
        offDone_++;
        offDoneBytes_ += j.length;
      }
      fast_.fetch_add(1, std::memory_order_relaxed);
      Wake();
      g.lock();
      busyReaders_--;
    }
  }

  /** Appends a READ reply's header for `len` bytes to `b`; returns where the data goes. */
  uint8_t* ReadHeader(ByteBuf& b, const uint8_t* cookie, uint64_t off, uint32_t len) const {
    uint8_t* hdr;
    if (opts_.structured) {
      hdr = b.grow(28 + size_t(len));
      Put32(hdr, kStructuredMagic); Put16(hdr + 4, kReplyDone); Put16(hdr + 6, kTypeOffsetData);
      memcpy(hdr + 8, cookie, 8); Put32(hdr + 16, 8 + len); Put64(hdr + 20, off);
      return hdr + 28;
    }
    hdr = b.grow(16 + size_t(len));
    Put32(hdr, kSimpleMagic); Put32(hdr + 4, 0); memcpy(hdr + 8, cookie, 8);
    return hdr + 16;
  }

  enum class Got { Done, Miss, Error };

  // Reads a segment only if the page cache holds it all (RWF_NOWAIT); Miss
  // when the disk would be needed (also for a short read, e.g. at EOF: the
  // reader thread's blocking read handles that). Filesystems without NOWAIT
  // reads (tmpfs, which never waits for a disk) are read directly.
  Got ReadSegNowait(const Seg& s, uint8_t* dst) {
    if (s.fd < 0 || !nowait_) return ReadSeg(s, dst) ? Got::Done : Got::Error;
    iovec v{dst, s.len};
    for (;;) {
      ssize_t n = preadv2(s.fd, &v, 1, off_t(s.off), RWF_NOWAIT);
      if (n == ssize_t(s.len)) return Got::Done;
      if (n >= 0 || errno == EAGAIN) return Got::Miss;
      if (errno == EINTR) continue;
      if (errno == EOPNOTSUPP) {
        nowait_ = false;
        return ReadSeg(s, dst) ? Got::Done : Got::Error;
      }
      return Got::Error;
    }
  }

  static bool ReadSeg(const Seg& s, uint8_t* dst) {
    if (s.fd < 0) { memset(dst, 0, s.len); return true; }
    size_t done = 0;
    while (done < s.len) {
      ssize_t n = pread(s.fd, dst + done, s.len - done, off_t(s.off + done));
      if (n < 0) { if (errno == EINTR) continue; return false; }
      if (n == 0) { memset(dst + done, 0, s.len - done); break; }  // sparse tail past EOF
      done += size_t(n);
    }
    return true;
  }

  /** 0, or the errno of the failed pwrite. */
  static int WriteAll(int fd, const uint8_t* src, size_t len, uint64_t off) {
    size_t done = 0;
    while (done < len) {
      ssize_t n = pwrite(fd, src + done, len - done, off_t(off + done));
      if (n < 0) { if (errno == EINTR) continue; return errno; }
      done += size_t(n);
    }
    return 0;
  }

  /** The NBD error for an errno, from the table the JavaScript side gave (EIO without one). */
  uint32_t NbdErr(int e) const { return e > 0 && size_t(e) < nbdErr_.size() ? nbdErr_[size_t(e)] : kEIO; }

  static void PutSimple(ByteBuf& b, const uint8_t* cookie, uint32_t err) {
    uint8_t* h = b.grow(16);
    Put32(h, kSimpleMagic); Put32(h + 4, err); memcpy(h + 8, cookie, 8);
  }

  void ErrorReply(uint16_t type, const uint8_t* cookie, uint32_t err, const char* msg) { ErrorReplyTo(out_, type, cookie, err, msg); }

  void ErrorReplyTo(ByteBuf& b, uint16_t type, const uint8_t* cookie, uint32_t err, const char* msg) const {
    if (!opts_.structured || type != CMD_READ) { PutSimple(b, cookie, err); return; }
    const uint16_t ml = static_cast<uint16_t>(strlen(msg));
    uint8_t* h = b.grow(20 + 6 + ml);
    Put32(h, kStructuredMagic); Put16(h + 4, kReplyDone); Put16(h + 6, kTypeError);
    memcpy(h + 8, cookie, 8); Put32(h + 16, 6 + ml); Put32(h + 20, err); Put16(h + 24, ml);
    memcpy(h + 26, msg, ml);
  }

  // Sends what it can without blocking; false when the socket is broken.
  bool Flush() {
    while (sent_ < out_.len) {
      ssize_t n = send(fd_, out_.p + sent_, out_.len - sent_, MSG_NOSIGNAL);
      if (n > 0) { sent_ += size_t(n); continue; }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        // A client that reads about as fast as replies come never empties
        // the buffer: drop what was sent, or it grows without end.
        if (sent_ >= kKeepBuf && sent_ >= out_.len - sent_) {
          memmove(out_.p, out_.p + sent_, out_.len - sent_);
          out_.len -= sent_;
          sent_ = 0;
        }
        return true;
      }
      return false;
    }
    sent_ = out_.len = 0;
    out_.trim(kKeepBuf);
    return true;
  }

  int fd_ = -1, efd_ = -1;
  Opts opts_;
  std::vector<uint32_t> nbdErr_;
  TargetRef target_;
  Napi::Reference<Napi::Value> targetRef_;
  Napi::ObjectReference self_;
  Napi::ThreadSafeFunction tsfn_;
  std::thread th_;
  // Thread-owned.
  ByteBuf in_, out_;
  size_t rpos_ = 0, sent_ = 0;
  uint64_t slowN_ = 0, slowBytes_ = 0;
  // Requests handed to the writer or reader threads and not yet answered.
  uint64_t offN_ = 0, offBytes_ = 0;
  bool wokeJs_ = false;
  Plan plan_;
  std::vector<WriteJob> handOff_;  // this batch's writes for the writer
  std::vector<ReadJob> coldOff_;   // this batch's page-cache misses for the readers
  bool nowait_ = true;             // the files take RWF_NOWAIT reads
  // The reader threads' queue.
  std::mutex rmu_;
  std::condition_variable rcv_;
  std::deque<ReadJob> rq_;
  std::vector<std::thread> readers_;
  size_t busyReaders_ = 0;
  bool rstop_ = false;
  // The writer thread's queue.
  std::mutex wmu_;
  std::condition_variable wcv_;
  std::deque<WriteJob> wq_;
  bool wstop_ = false;
  // Shared with JS, under mu_.
  std::mutex mu_;
  std::vector<SlowReq> toJs_;
  ByteBuf fromJs_;
  uint64_t doneN_ = 0, doneBytes_ = 0;
  uint64_t offDone_ = 0, offDoneBytes_ = 0;  // writer and reader completions
  std::vector<WriteJob> wSlow_;          // writes the writer could not plan
  std::atomic<bool> shutdown_{false}, destroy_{false};
  std::atomic<uint64_t> fast_{0}, slow_{0}, pending_{0}, cold_{0}, unsent_{0};
  std::atomic<int> phase_{0};  // diagnostics: 0 reading, 1 draining, 2 peer gone
};

}  // namespace

void InitNbdWire(Napi::Env env, Napi::Object exports) { exports.Set("NbdWire", Wire::Init(env)); }

}  // namespace strata
