// strata_native: thin node-addon-api wrapper over liburing.
//
// Requests are described in a SharedArrayBuffer (32-byte descriptors) and
// completions are written to another one (8-byte entries), so JS pays one
// N-API call per batch instead of marshalling arguments per request.
// The layout is documented in src/native.ts.

#include <napi.h>
#include <uv.h>
#include <liburing.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "napi_util.h"
#include "ublk.h"
#include "ublk_uapi.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "descriptors are little-endian and copied as host structs"
#endif

namespace {

using strata::ArgUint;
using strata::Bytes;
using strata::Fail;
using strata::GetBytes;

// SEND/RECV: sockets (MSG_NOSIGNAL; io_uring waits on a non-blocking socket by polling it).
// UBLK_CMD: a ublk I/O command (FETCH_REQ, COMMIT_AND_FETCH_REQ) on /dev/ublkcN:
// fd the char device, len the command, bufIndex the tag, fileOffset the
// queue, bufOffset the result (low 32 bits) and AUTO_BUF_REG (high 32).
enum Op : uint8_t { READ = 1, WRITE = 2, FSYNC = 3, FDATASYNC = 4, FALLOCATE = 5, NOP = 6, SEND = 7, RECV = 8, UBLK_CMD = 9 };
// RAW_FIXED (READ/WRITE): bufIndex is a slot of the sparse table (sparseBuffers)
// and bufOffset the offset in the buffer there, checked by the kernel.
enum Flag : uint8_t { FIXED = 1, PUNCH = 2, ZERO_RANGE = 4, RAW_FIXED = 8 };

struct Desc {
  uint8_t op;
  uint8_t flags;
  uint16_t bufIndex;
  int32_t fd;
  uint32_t len;
  uint32_t id;
  uint64_t bufOffset;  // FALLOCATE: length
  uint64_t fileOffset;
};
static_assert(sizeof(Desc) == 32, "SQ descriptor is 32 bytes");

// Outside the u32 id space, so it can never collide with a caller's id.
constexpr uint64_t kCancelTag = 1ull << 32;

struct Region {
  Napi::Reference<Napi::Value> owner;  // keeps the memory alive
  Napi::Reference<Napi::Value> ab;     // detachable ArrayBuffer, checked before use
  uint8_t* data;
  uint64_t len;
};

// The uv handle outlives the Ring: uv_close completes on a later loop turn,
// so the handle owns the eventfd. Until then an async cleanup hook makes a
// terminating worker wait for it, since the addon may be unloaded right after
// its env is gone and the close callback lives in this library.
struct PollBox {
  uv_poll_t handle;
  int efd;
  napi_async_cleanup_hook_handle hook;
};

class Ring : public Napi::ObjectWrap<Ring> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "Ring",
                       {InstanceMethod<&Ring::AddRegion>("addRegion"),
                        InstanceMethod<&Ring::RegisterRegions>("registerRegions"),
                        InstanceMethod<&Ring::SparseBuffers>("sparseBuffers"),
                        InstanceMethod<&Ring::Submit>("submit"),
                        InstanceMethod<&Ring::Wait>("wait"),
                        InstanceMethod<&Ring::ReapJs>("reap"),
                        InstanceMethod<&Ring::SubmitReap>("submitReap"),
                        InstanceMethod<&Ring::Pwrite>("pwrite"),
                        InstanceMethod<&Ring::CloseJs>("close"),
                        InstanceAccessor<&Ring::Inflight>("inflight"),
                        InstanceAccessor<&Ring::Ready>("ready"),
                        InstanceAccessor<&Ring::MaxInflight>("maxInflight")});
  }

  explicit Ring(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Ring>(info) {
    Napi::Env env = info.Env();
    unsigned entries = static_cast<unsigned>(ArgUint(info, 0, "entries", 32768));
    if (entries == 0) Fail(env, EINVAL, "entries must be >= 1");
    Bytes sq = GetBytes(env, info[1], "sq");
    Bytes cq = GetBytes(env, info[2], "cq");
    sqCap_ = sq.len / sizeof(Desc);
    cqCap_ = static_cast<uint32_t>(std::min<size_t>(cq.len / 8, UINT32_MAX));
    if (sqCap_ == 0 || cqCap_ == 0) Fail(env, EINVAL, "sq needs >= 32 bytes and cq >= 8 bytes");
    if (sq.arrayBuffer || cq.arrayBuffer) Fail(env, EINVAL, "sq and cq must be SharedArrayBuffer-backed");
    bool async = info.Length() > 3 && !info[3].IsUndefined();
    if (async && !info[3].IsFunction()) Fail(env, EINVAL, "onComplete must be a function");
    sq_ = sq.data;
    cq_ = cq.data;
    sqRef_ = Napi::Persistent(info[1]);
    cqRef_ = Napi::Persistent(info[2]);

    // A CQ of 4x entries lets the caller keep that many ops in flight without
    // the kernel ring overflowing; submit() enforces it (see maxInflight).
    io_uring_params p{};
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL;
    p.cq_entries = entries * 4;
    int r = io_uring_queue_init_params(entries, &ring_, &p);
    if (r == -EINVAL) {  // pre-5.18 kernel: no SUBMIT_ALL
      p = io_uring_params{};
      p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
      p.cq_entries = entries * 4;
      r = io_uring_queue_init_params(entries, &ring_, &p);
    }
    if (r < 0) Fail(env, -r, "io_uring_queue_init");
    maxInflight_ = p.cq_entries;
    open_ = true;
    if (!async) return;

    cb_ = Napi::Persistent(info[3].As<Napi::Function>());
    // No resource object: it would be a strong reference back to this wrapper.
    asyncCtx_.reset(new Napi::AsyncContext(env, "strata:ring"));
    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0) { int e = errno; Teardown(true); Fail(env, e, "eventfd"); }
    // The wake-up path: the kernel signals this eventfd after posting CQEs,
    // libuv watches it (uv_poll, level-triggered epoll) and OnPoll reaps.
    // It delivers every completion on 6.18 and in QEMU guests on Debian
    // 6.12.117 and 7.3.4, with Node 20's default libuv (which keeps io_uring
    // off unless UV_USE_IO_URING=1) and with UV_USE_IO_URING=1 (epoll_ctl
    // through libuv's own ring). The one stall reproduced in those guests was
    // the VM test deadlocking itself (see src/uring.ts, armWatchdog).
    // Plain, not register_eventfd_async: _async signals only when the CQE is
    // posted from an io-wq worker, so completions posted through task_work in
    // the submitting thread would never wake us.
    // Inline completions also signal; submitReap() consumes them first and
    // the poll callback simply finds nothing left.
    if ((r = io_uring_register_eventfd(&ring_, efd)) < 0) {
      close(efd);
      Teardown(true);
      Fail(env, -r, "io_uring_register_eventfd");
    }
    uv_loop_t* loop = nullptr;
    NAPI_THROW_IF_FAILED_VOID(env, napi_get_uv_event_loop(env, &loop));
    poll_ = new PollBox{{}, efd, nullptr};
    if ((r = uv_poll_init(loop, &poll_->handle, efd)) < 0) {
      close(efd);
      delete poll_;  // never registered with the loop
      poll_ = nullptr;
      Teardown(true);
      Fail(env, -r, "uv_poll_init");
    }
    poll_->handle.data = this;
    if ((r = uv_poll_start(&poll_->handle, UV_READABLE, OnPoll)) < 0) {
      Teardown(true);  // uv_closes the handle and its eventfd
      Fail(env, -r, "uv_poll_start");
    }
    uv_unref(reinterpret_cast<uv_handle_t*>(&poll_->handle));  // idle rings never hold the loop
    napi_add_async_cleanup_hook(env, OnEnvCleanup, poll_, &poll_->hook);
  }

  ~Ring() override { Teardown(true); }

 private:
  Napi::Value AddRegion(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    Bytes b = GetBytes(env, info[0], "buf");
    uint64_t off = ArgUint(info, 1, "byteOffset", b.len);
    uint64_t len = ArgUint(info, 2, "byteLength", b.len - off);
    if (regions_.size() > 0xFFFF) Fail(env, ENOSPC, "bufIndex is a u16: too many regions");
    Region r{Napi::Persistent(info[0]), {}, b.data + off, len};
    if (b.arrayBuffer) r.ab = Napi::Persistent(Napi::Value(env, b.arrayBuffer));
    regions_.push_back(std::move(r));
    return Napi::Number::New(env, static_cast<double>(regions_.size() - 1));
  }

  Napi::Value RegisterRegions(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    // Swapping the table under in-flight fixed ops is unsafe on older kernels.
    if (inflight_ > 0) return Napi::Number::New(env, -EBUSY);
    if (registered_ > 0) {
      io_uring_unregister_buffers(&ring_);
      registered_ = 0;
    }
    if (regions_.empty()) return Napi::Number::New(env, 0);
    std::vector<iovec> iov;
    for (Region& r : regions_) {
      // Empty regions become sparse slots: the kernel rejects a zero-length iovec with a base.
      iov.push_back(r.len ? iovec{r.data, r.len} : iovec{nullptr, 0});
    }
    int r = io_uring_register_buffers(&ring_, iov.data(), static_cast<unsigned>(iov.size()));
    if (r == 0) registered_ = regions_.size();
    return Napi::Number::New(env, r);
  }

  // A table of n empty fixed-buffer slots, for buffers the kernel registers
  // itself (ublk's AUTO_BUF_REG puts each request's pages in one); ops name
  // a slot with the RAW_FIXED flag. Instead of registerRegions.
  Napi::Value SparseBuffers(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    unsigned n = static_cast<unsigned>(ArgUint(info, 0, "slots", 65535));
    if (inflight_ > 0 || registered_ > 0 || sparse_ > 0) return Napi::Number::New(env, -EBUSY);
    int r = io_uring_register_buffers_sparse(&ring_, n);
    if (r == 0) sparse_ = n;
    return Napi::Number::New(env, r);
  }

  Napi::Value Submit(const Napi::CallbackInfo& info) {
    return SubmitOnly(info);
  }

  // pwrite(bufIndex, bufOffset, len, fd, fileOffset): the whole range written
  // now, on this thread; bytes written or -errno. Buffered writes to ext4
  // cannot complete inline in a ring (no NOWAIT buffered writes): there they
  // go to io-wq, a thread hop per write that halves small-write throughput.
  Napi::Value Pwrite(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    Desc d{};
    d.op = WRITE;
    d.bufIndex = static_cast<uint16_t>(ArgUint(info, 0, "bufIndex", 0xFFFF));
    d.bufOffset = ArgUint(info, 1, "bufOffset", UINT64_MAX);
    d.len = static_cast<uint32_t>(ArgUint(info, 2, "len", UINT32_MAX));
    d.fd = static_cast<int32_t>(ArgUint(info, 3, "fd", INT32_MAX));
    d.fileOffset = ArgUint(info, 4, "fileOffset", UINT64_MAX);
    uint8_t* addr = nullptr;
    int e = Check(d, &addr);
    if (e) return Napi::Number::New(env, -e);
    uint64_t done = 0;
    while (done < d.len) {
      ssize_t n = pwrite(d.fd, addr + done, d.len - done, static_cast<off_t>(d.fileOffset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Napi::Number::New(env, -errno);
      if (n == 0) return Napi::Number::New(env, -EIO);
      done += static_cast<uint64_t>(n);
    }
    return Napi::Number::New(env, static_cast<double>(done));
  }

  // submit() + reap() in one call: returns how many completions are now in
  // cq[0..n) for the caller to consume (often all of them for cached reads).
  Napi::Value SubmitReap(const Napi::CallbackInfo& info) {
    SubmitOnly(info);
    return Napi::Number::New(info.Env(), Reap(cqCap_));
  }

  Napi::Value SubmitOnly(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    uint64_t start = ArgUint(info, 0, "start", (1ull << 53));
    uint64_t count = ArgUint(info, 1, "count", sqCap_);
    if (inflight_ + count > maxInflight_)
      Fail(env, EBUSY, "submit would exceed maxInflight (" + std::to_string(maxInflight_) + "); reap first");
    RefreshDetached(env);
    bool faked = false;
    for (uint64_t i = 0; i < count; i++) {
      Desc d;
      memcpy(&d, sq_ + ((start + i) % sqCap_) * sizeof(Desc), sizeof d);
      uint8_t* addr = nullptr;
      int err = Check(d, &addr);
      inflight_++;
      Pin();
      if (err) {
        // Rejected ops still complete, through the same CQ path, so callers
        // need no second error channel.
        fake_.emplace_back(d.id, -err);
        faked = true;
        continue;
      }
      Prep(GetSqe(env), d, addr);
    }
    if (faked) Kick();
    Flush(env);
    return Napi::Number::New(env, static_cast<double>(count));
  }

  Napi::Value Wait(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    uint64_t want = ArgUint(info, 0, "minComplete", UINT32_MAX);
    // Never wait for more than can arrive or than fits in cq.
    want = std::min<uint64_t>({want, inflight_, cqCap_});
    while (want > fake_.size() + io_uring_cq_ready(&ring_)) {
      // submit_and_wait also pushes SQEs left queued by a failed submit.
      int r = io_uring_submit_and_wait(&ring_, static_cast<unsigned>(want - fake_.size()));
      if (r < 0 && r != -EINTR) Fail(env, -r, "io_uring_submit_and_wait");
    }
    return Napi::Number::New(env, Reap(cqCap_));
  }

  // Non-blocking: copies whatever has completed into cq[0..n). Called right
  // after submit, it picks up ops the kernel finished inline (page-cache
  // hits) without waiting for an eventfd wake-up and a loop turn.
  Napi::Value ReapJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CheckOpen(env);
    return Napi::Number::New(env, Reap(cqCap_));
  }

  Napi::Value CloseJs(const Napi::CallbackInfo& info) {
    Teardown(false);
    return info.Env().Undefined();
  }

  Napi::Value Inflight(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(inflight_));
  }

  // Completions waiting to be reaped (rejected ops included). Reads the CQ
  // ring's head and tail in shared memory: no syscall, nothing consumed.
  Napi::Value Ready(const Napi::CallbackInfo& info) {
    double n = open_ ? static_cast<double>(fake_.size() + io_uring_cq_ready(&ring_)) : 0;
    return Napi::Number::New(info.Env(), n);
  }

  Napi::Value MaxInflight(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), maxInflight_);
  }

  void CheckOpen(Napi::Env env) {
    if (!open_) Fail(env, EBADF, "ring is closed");
  }

  // A detached ArrayBuffer's memory may be gone or moved (e.g. non-shared
  // wasm memory after grow): turn its region into one that fails every op.
  void RefreshDetached(Napi::Env env) {
    for (Region& r : regions_) {
      if (r.ab.IsEmpty() || r.len == 0) continue;
      bool detached = false;
      napi_is_detached_arraybuffer(env, r.ab.Value(), &detached);
      if (detached) r.len = 0;
    }
  }

  // Returns a positive errno for descriptors that must not reach the kernel.
  int Check(const Desc& d, uint8_t** addr) {
    if (d.op == UBLK_CMD) return d.fileOffset > 0xFFFF ? EINVAL : 0;
    if ((d.flags & RAW_FIXED) && (d.op == READ || d.op == WRITE)) {
      if (d.bufIndex >= sparse_ || d.fileOffset > INT64_MAX) return EINVAL;
      *addr = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(d.bufOffset));
      return 0;
    }
    if (d.fileOffset > INT64_MAX) return EINVAL;  // -1 would mean "file position"
    switch (d.op) {
      case READ:
      case WRITE:
      case SEND:
      case RECV: {
        if (d.bufIndex >= regions_.size()) return EFAULT;
        const Region& r = regions_[d.bufIndex];
        if (d.bufOffset > r.len || d.len > r.len - d.bufOffset) return EFAULT;
        *addr = r.data + d.bufOffset;
        return 0;
      }
      case FALLOCATE:
        return d.bufOffset > INT64_MAX ? EINVAL : 0;
      case FSYNC:
      case FDATASYNC:
      case NOP:
        return 0;
      default:
        return EINVAL;
    }
  }

  void Prep(io_uring_sqe* sqe, const Desc& d, uint8_t* addr) {
    bool fixed = ((d.flags & FIXED) && d.bufIndex < registered_) || (d.flags & RAW_FIXED);
    switch (d.op) {
      case READ:
        if (fixed) io_uring_prep_read_fixed(sqe, d.fd, addr, d.len, d.fileOffset, d.bufIndex);
        else io_uring_prep_read(sqe, d.fd, addr, d.len, d.fileOffset);
        break;
      case WRITE:
        if (fixed) io_uring_prep_write_fixed(sqe, d.fd, addr, d.len, d.fileOffset, d.bufIndex);
        else io_uring_prep_write(sqe, d.fd, addr, d.len, d.fileOffset);
        break;
      case SEND:
        io_uring_prep_send(sqe, d.fd, addr, d.len, MSG_NOSIGNAL);
        break;
      case RECV:
        io_uring_prep_recv(sqe, d.fd, addr, d.len, 0);
        break;
      case UBLK_CMD: {
        cmds_.insert(d.id);
        io_uring_prep_rw(IORING_OP_URING_CMD, sqe, d.fd, nullptr, 0, 0);
        sqe->cmd_op = d.len;  // after prep_rw: it shares the SQE's offset field
        sqe->addr = d.bufOffset >> 32;
        strata::ublk::IoCmd c{uint16_t(d.fileOffset), d.bufIndex, int32_t(uint32_t(d.bufOffset)), 0};
        memcpy(sqe->cmd, &c, sizeof c);
        break;
      }
      case FSYNC:
      case FDATASYNC:
        io_uring_prep_fsync(sqe, d.fd, d.op == FDATASYNC ? IORING_FSYNC_DATASYNC : 0);
        break;
      case FALLOCATE: {
        int mode = (d.flags & PUNCH)        ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                   : (d.flags & ZERO_RANGE) ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                                            : 0;
        io_uring_prep_fallocate(sqe, d.fd, mode, static_cast<off_t>(d.fileOffset),
                                static_cast<off_t>(d.bufOffset));
        break;
      }
      default:
        io_uring_prep_nop(sqe);
    }
    io_uring_sqe_set_data64(sqe, d.id);
  }

  io_uring_sqe* GetSqe(Napi::Env env) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe) return sqe;
    Flush(env);  // SQ full: hand the queued batch to the kernel, which empties it
    return io_uring_get_sqe(&ring_);
  }

  // Without SQPOLL the kernel consumes SQEs inside io_uring_enter, so a
  // successful submit always drains the SQ.
  void Flush(Napi::Env env) {
    while (io_uring_sq_ready(&ring_) > 0) {
      int r = io_uring_submit(&ring_);
      if (r == -EINTR) continue;
      // Unsubmitted SQEs stay queued and go out with the next submit/wait.
      if (r < 0) Fail(env, -r, "io_uring_submit");
      if (r == 0) Fail(env, EAGAIN, "io_uring_submit consumed nothing");
    }
  }

  // Copies up to max completions (rejected ops first) into cq[0..n).
  uint32_t Reap(uint32_t max) {
    uint32_t n = 0;
    auto put = [&](uint32_t id, int32_t res) {
      uint8_t* e = cq_ + 8 * static_cast<size_t>(n++);
      memcpy(e, &id, 4);
      memcpy(e + 4, &res, 4);
    };
    while (n < max && !fake_.empty()) {
      put(fake_.front().first, fake_.front().second);
      fake_.pop_front();
    }
    unsigned head, seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      if (n >= max) break;
      put(static_cast<uint32_t>(cqe->user_data), cqe->res);
      if (!cmds_.empty()) cmds_.erase(static_cast<uint32_t>(cqe->user_data));
      seen++;
    }
    io_uring_cq_advance(&ring_, seen);
    inflight_ -= n;
    Pin();
    return n;
  }

  // While ops are in flight: keep the loop alive (async) and keep the JS
  // object from being collected, since the kernel still writes to regions.
  void Pin() {
    bool busy = inflight_ > 0;
    if (busy == pinned_) return;
    pinned_ = busy;
    if (busy) Ref(); else Unref();
    if (poll_) {
      uv_handle_t* h = reinterpret_cast<uv_handle_t*>(&poll_->handle);
      if (busy) uv_ref(h); else uv_unref(h);
    }
  }

  void Kick() {
    if (!poll_) return;
    uint64_t one = 1;
    (void)!write(poll_->efd, &one, sizeof one);
  }

  static void OnPoll(uv_poll_t* h, int /*status*/, int /*events*/) {
    Ring* self = static_cast<Ring*>(h->data);
    if (self) self->Dispatch();
  }

  void Dispatch() {
    uint64_t count;
    (void)!read(poll_->efd, &count, sizeof count);  // re-arm; CQ state is the truth
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    // A local handle keeps the wrapper (and this) alive across the callback,
    // even once Pin() has dropped the strong reference.
    Napi::Object self = Value();
    while (open_) {
      uint32_t n = Reap(cqCap_);
      if (n == 0) break;
      try {
        // MakeCallback runs microtasks/nextTicks afterwards, like any I/O callback.
        cb_.MakeCallback(self, {Napi::Number::New(env, n)}, *asyncCtx_);
      } catch (const Napi::Error& e) {
        if (open_ && (!fake_.empty() || io_uring_cq_ready(&ring_))) Kick();  // deliver the rest later
        napi_fatal_exception(env, e.Value());
        return;
      }
    }
  }

  // Env teardown with the ring still open: close it; OnClosed lets the env go on.
  static void OnEnvCleanup(napi_async_cleanup_hook_handle, void* arg) {
    Ring* self = static_cast<Ring*>(static_cast<PollBox*>(arg)->handle.data);
    if (self) self->Teardown(true);
  }

  static void OnClosed(uv_handle_t* h) {
    PollBox* box = reinterpret_cast<PollBox*>(h);
    close(box->efd);
    if (box->hook) napi_remove_async_cleanup_hook(box->hook);
    delete box;
  }

  // Closing with ops in flight: cancel what can be cancelled and wait for the
  // rest, so the kernel never writes into regions after we release them.
  // Waits for the operations in flight that may still write JS memory.
  // Not for ublk commands: no async cancel reaches them and they end only
  // when their device stops; closing the ring cancels them (the kernel
  // then sees their queue's server gone), and they touch no JS memory.
  void Drain() {
    uint64_t pending = inflight_ - fake_.size() - cmds_.size();
    if (pending == 0) return;
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe) {
      io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
      io_uring_sqe_set_data64(sqe, kCancelTag);
      pending++;
    }
    while (pending > 0) {
      io_uring_cqe* cqe;
      int r = io_uring_submit_and_wait(&ring_, 1);
      if (r == -EINTR) continue;
      if (r < 0) break;
      unsigned head, seen = 0, counted = 0;
      io_uring_for_each_cqe(&ring_, head, cqe) {
        seen++;
        if (!cmds_.erase(static_cast<uint32_t>(cqe->user_data))) counted++;
      }
      io_uring_cq_advance(&ring_, seen);
      pending -= std::min<uint64_t>(counted, pending);
    }
  }

  // finalizing: called from the destructor or env cleanup, where the
  // wrapper's own reference must not be touched.
  void Teardown(bool finalizing) {
    if (!open_ && !poll_) return;
    if (open_) Drain();
    if (poll_) {
      poll_->handle.data = nullptr;
      uv_close(reinterpret_cast<uv_handle_t*>(&poll_->handle), OnClosed);
      poll_ = nullptr;
    }
    // Ring teardown also drops the registered buffers and eventfd.
    if (open_) io_uring_queue_exit(&ring_);
    open_ = false;
    inflight_ = 0;
    fake_.clear();
    cmds_.clear();
    registered_ = 0;
    sparse_ = 0;
    if (pinned_ && !finalizing) Unref();
    pinned_ = false;
    if (!finalizing) {
      regions_.clear();
      sqRef_.Reset();
      cqRef_.Reset();
      cb_.Reset();
    }
  }

  io_uring ring_{};
  bool open_ = false;
  bool pinned_ = false;
  PollBox* poll_ = nullptr;
  uint8_t* sq_ = nullptr;
  uint8_t* cq_ = nullptr;
  uint64_t sqCap_ = 0;
  uint32_t cqCap_ = 0;
  uint32_t maxInflight_ = 0;
  uint64_t inflight_ = 0;
  size_t registered_ = 0;
  unsigned sparse_ = 0;  // slots of a sparse table (sparseBuffers), else 0
  std::vector<Region> regions_;
  std::deque<std::pair<uint32_t, int32_t>> fake_;
  std::unordered_set<uint32_t> cmds_;  // ids of ublk commands in flight (see Drain)
  Napi::Reference<Napi::Value> sqRef_, cqRef_;
  Napi::FunctionReference cb_;
  std::unique_ptr<Napi::AsyncContext> asyncCtx_;
};

Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
#if defined(IO_URING_VERSION_MAJOR)
  out.Set("liburing", std::to_string(IO_URING_VERSION_MAJOR) + "." + std::to_string(IO_URING_VERSION_MINOR));
#elif defined(STRATA_LIBURING_VERSION)  // liburing < 2.4 has no version macros; binding.gyp asks pkg-config
  out.Set("liburing", STRATA_LIBURING_VERSION);
#else
  out.Set("liburing", "unknown");
#endif
  static const std::pair<int, const char*> kOps[] = {
      {IORING_OP_READ_FIXED, "READ_FIXED"}, {IORING_OP_WRITE_FIXED, "WRITE_FIXED"},
      {IORING_OP_READ, "READ"},             {IORING_OP_WRITE, "WRITE"},
      {IORING_OP_FSYNC, "FSYNC"},           {IORING_OP_FALLOCATE, "FALLOCATE"},
      {IORING_OP_URING_CMD, "URING_CMD"}};
  Napi::Array ops = Napi::Array::New(env);
  if (io_uring_probe* p = io_uring_get_probe()) {
    for (const auto& op : kOps)
      if (io_uring_opcode_supported(p, op.first)) ops.Set(ops.Length(), op.second);
    io_uring_free_probe(p);
  }
  out.Set("probeOps", ops);
  return out;
}

Napi::Value PageSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(sysconf(_SC_PAGESIZE)));
}

// dataExtents(fd, size): [start, end, start, end, ...] of the file's data
// (SEEK_DATA/SEEK_HOLE), which Node's fs does not expose. Overlays are
// written in whole blocks and zeroed by punching, so after a crash the
// allocated ranges are exactly the written blocks.
Napi::Value DataExtents(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = static_cast<int>(ArgUint(info, 0, "fd", INT32_MAX));
  const off_t size = static_cast<off_t>(ArgUint(info, 1, "size", 1ull << 53));
  Napi::Array out = Napi::Array::New(env);
  uint32_t n = 0;
  for (off_t pos = 0; pos < size;) {
    off_t d = lseek(fd, pos, SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) break;
      Fail(env, errno, "lseek(SEEK_DATA)");
    }
    if (d >= size) break;
    off_t h = lseek(fd, d, SEEK_HOLE);
    if (h < 0) Fail(env, errno, "lseek(SEEK_HOLE)");
    if (h > size) h = size;
    out.Set(n++, Napi::Number::New(env, static_cast<double>(d)));
    out.Set(n++, Napi::Number::New(env, static_cast<double>(h)));
    pos = h;
  }
  return out;
}

// dropPageCache(fd): writes back and evicts the file's cached pages
// (fdatasync, then POSIX_FADV_DONTNEED), so the next reads need the disk —
// for tests and benchmarks of cold reads without dropping the whole
// machine's cache.
void DropPageCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = static_cast<int>(ArgUint(info, 0, "fd", INT32_MAX));
  if (fdatasync(fd) < 0) Fail(env, errno, "fdatasync");
  int r = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  if (r != 0) Fail(env, r, "posix_fadvise(DONTNEED)");
}

// eventfd(): a blocking eventfd (cloexec). An I/O worker keeps a READ of it
// in its ring, so another thread wakes the worker's wait by writing 8 bytes.
// Blocking on purpose: io_uring fails a read of an O_NONBLOCK file with
// EAGAIN instead of waiting for it.
Napi::Value EventFd(const Napi::CallbackInfo& info) {
  int fd = eventfd(0, EFD_CLOEXEC);
  if (fd < 0) Fail(info.Env(), errno, "eventfd");
  return Napi::Number::New(info.Env(), fd);
}

// ioFlusher(): PR_SET_IO_FLUSHER for the calling thread: memory reclaim in
// it must not wait on writeback through a block device it serves itself
// (an I/O worker serving ublk queues), which would deadlock. 0 or -errno
// (EPERM without CAP_SYS_RESOURCE).
Napi::Value IoFlusher(const Napi::CallbackInfo& info) {
  int r = prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
  return Napi::Number::New(info.Env(), r < 0 ? -errno : 0);
}

// dup(fd): a cloexec duplicate, so a socket can change owner (Node's handle
// closes its descriptor, the I/O worker keeps the copy).
Napi::Value Dup(const Napi::CallbackInfo& info) {
  const int fd = static_cast<int>(ArgUint(info, 0, "fd", INT32_MAX));
  int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0) Fail(info.Env(), errno, "dup");
  return Napi::Number::New(info.Env(), d);
}

// shutdownSocket(fd): shutdown(SHUT_RDWR), which also ends a receive the
// ring is waiting on (closing the descriptor would not: the ring holds it).
void ShutdownSocket(const Napi::CallbackInfo& info) {
  const int fd = static_cast<int>(ArgUint(info, 0, "fd", INT32_MAX));
  if (shutdown(fd, SHUT_RDWR) < 0 && errno != ENOTCONN) Fail(info.Env(), errno, "shutdown");
}

// socketPair(): a connected pair of unix stream sockets (cloexec). A TLS
// connection's plaintext reaches its I/O worker through one: Node keeps the
// encrypted socket and one end, the worker's ring reads and writes the other.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) Fail(info.Env(), errno, "socketpair");
  Napi::Array a = Napi::Array::New(info.Env(), 2);
  a.Set(uint32_t(0), Napi::Number::New(info.Env(), sv[0]));
  a.Set(uint32_t(1), Napi::Number::New(info.Env(), sv[1]));
  return a;
}

// close(fd): for descriptors Node's fs did not open (eventfds, sockets an
// I/O worker took over), which a worker's fs.closeSync warns about.
void Close(const Napi::CallbackInfo& info) {
  const int fd = static_cast<int>(ArgUint(info, 0, "fd", INT32_MAX));
  if (close(fd) < 0 && errno != EINTR) Fail(info.Env(), errno, "close");
}

Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("socketPair", Napi::Function::New(env, SocketPair, "socketPair"));
  exports.Set("shutdownSocket", Napi::Function::New(env, ShutdownSocket, "shutdownSocket"));
  exports.Set("eventfd", Napi::Function::New(env, EventFd, "eventfd"));
  exports.Set("dup", Napi::Function::New(env, Dup, "dup"));
  exports.Set("ioFlusher", Napi::Function::New(env, IoFlusher, "ioFlusher"));
  exports.Set("dataExtents", Napi::Function::New(env, DataExtents, "dataExtents"));
  exports.Set("dropPageCache", Napi::Function::New(env, DropPageCache, "dropPageCache"));
  exports.Set("Ring", Ring::Init(env));
  exports.Set("info", Napi::Function::New(env, Info, "info"));
  exports.Set("pageSize", Napi::Function::New(env, PageSize, "pageSize"));
  strata::InitUblk(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(strata_native, InitModule)
