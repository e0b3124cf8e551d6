// ublk.cc — the ublk frontend's control plane: URING_CMDs on
// /dev/ublk-control through a small SQE128 ring, issued from libuv worker
// threads (AsyncWorker) so JavaScript stays free to serve requests while
// START_DEV / STOP_DEV wait on I/O.
//
// The data plane is not here: the I/O workers' rings (src/io/loop.ts,
// src/ublk/queue.ts) fetch every tag of a device's queues and serve them.
// This file adds a device (ADD_DEV, SET_PARAMS), starts it once the tags
// are fetched (START_DEV, or END_USER_RECOVERY after START_USER_RECOVERY),
// stops and deletes it, maps a queue's request descriptors, and exports the
// UAPI values the workers need (ublk_uapi.h), so none is defined twice.

#include "ublk.h"

#include <liburing.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "napi_util.h"
#include "ublk_uapi.h"

namespace strata {
namespace {

using namespace strata::ublk;

// ---------------------------------------------------------------- errors

struct Status {
  int err = 0;  // positive errno, 0 = ok
  std::string what;
  static Status Ok() { return {}; }
  static Status Err(int e, std::string w) { return {e < 0 ? -e : e, std::move(w)}; }
  bool ok() const { return err == 0; }
};

Napi::Error MakeError(Napi::Env env, int err, const std::string& what) {
  Napi::Error e = Napi::Error::New(env, what + ": " + strerror(err));
  const char* name = strerrorname_np(err);
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  e.Set("op", Napi::String::New(env, what));
  return e;
}
[[noreturn]] void Throw(Napi::Env env, int err, const std::string& what) { throw MakeError(env, err, what); }

// ------------------------------------------------------------ control ring

// A tiny SQE128 ring on /dev/ublk-control. Commands are serialized by mu_;
// any thread may use it (no SINGLE_ISSUER).
class Ctrl {
 public:
  ~Ctrl() { Close(); }
  int Open() {
    if (fd_ >= 0) return 0;
    fd_ = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
    if (fd_ < 0) return -errno;
    io_uring_params p{};
    p.flags = IORING_SETUP_SQE128;
    int r = io_uring_queue_init_params(4, &ring_, &p);
    if (r < 0) {
      close(fd_);
      fd_ = -1;
      return r;
    }
    return 0;
  }
  void Close() {
    if (fd_ < 0) return;
    io_uring_queue_exit(&ring_);
    close(fd_);
    fd_ = -1;
  }
  /** Returns the CQE result (>= 0 ok, -errno). */
  int Cmd(uint32_t op, uint32_t devId, void* buf = nullptr, uint16_t len = 0, uint64_t data0 = 0) {
    std::lock_guard<std::mutex> lk(mu_);
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) return -EBUSY;
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd_;
    sqe->cmd_op = op;
    CtrlCmd c{};
    c.dev_id = devId;
    c.queue_id = 0xFFFF;
    c.len = len;
    c.addr = reinterpret_cast<uintptr_t>(buf);
    c.data[0] = data0;
    memcpy(sqe->cmd, &c, sizeof c);
    int r;
    do r = io_uring_submit_and_wait(&ring_, 1);
    while (r == -EINTR);
    if (r < 0) return r;
    io_uring_cqe* cqe = nullptr;
    do r = io_uring_wait_cqe(&ring_, &cqe);
    while (r == -EINTR);
    if (r < 0) return r;
    int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    return res;
  }

 private:
  int fd_ = -1;
  io_uring ring_{};
  std::mutex mu_;
};

// Features are a property of the loaded module: probe once per process.
std::mutex gFeatMu;
bool gFeatKnown = false;
uint64_t gFeatures = 0;

int ProbeFeatures(Ctrl& c, uint64_t* out) {
  {
    std::lock_guard<std::mutex> lk(gFeatMu);
    if (gFeatKnown) { *out = gFeatures; return 0; }
  }
  uint64_t f = 0;
  int r = c.Cmd(kCmdGetFeatures, 0xFFFFFFFF, &f, sizeof f);
  if (r < 0) return r;
  std::lock_guard<std::mutex> lk(gFeatMu);
  gFeatKnown = true;
  gFeatures = f;
  *out = f;
  return 0;
}

// A queue's request descriptors, mapped read-only (`len` gets the mapping's length).
void* MapIoDescs(int cdev, uint16_t q, uint32_t depth, size_t* len) {
  size_t page = sysconf(_SC_PAGESIZE);
  *len = (depth * sizeof(IoDesc) + page - 1) / page * page;
  return mmap(nullptr, *len, PROT_READ, MAP_SHARED | MAP_POPULATE, cdev, DescMapOffset(q, page));
}

// ----------------------------------------------------------------- device

// High half of dev_info.ublksrv_flags on devices strata creates ("STRA").
constexpr uint64_t kOwnerMagic = 0x53545241;

// DEL_DEV waits until every opener (fd, mount) is gone; DEL_DEV_ASYNC (6.9+)
// does not, so a device still open elsewhere never hangs us.
int DelDevCmd(Ctrl& c, uint32_t id) {
  int r = c.Cmd(kCmdDelDevAsync, id);
  if (r == -EINVAL || r == -EOPNOTSUPP || r == -ENOTTY) r = c.Cmd(kCmdDelDev, id);
  return r;
}

struct Options {
  uint64_t size = 0;
  uint16_t queues = 1;
  uint16_t depth = 64;
  uint32_t maxIo = 512 << 10;
  std::string transport = "auto";
  int recovery = 0;  // 0 off, 1 USER_RECOVERY, 2 + REISSUE, 3 + FAIL_IO
  bool partScan = false;
  int64_t owner = -1;  // strata owner id kept in ublksrv_flags; -1: none
};

enum class State { New, Added, Live, Stopped, Deleted };

struct Dev {
  Options opt;
  Ctrl ctrl;
  DevInfo info{};
  uint64_t features = 0;
  bool zc = false;
  bool recovering = false;  // START_USER_RECOVERY sent: startDev() ends it
  std::mutex lifeMu;
  std::atomic<State> state{State::New};
  uint32_t id = 0xFFFFFFFF;
  double createMs = 0;
  // Where create() spends its time: ADD_DEV, SET_PARAMS.
  double stepMs[2] = {0, 0};

  // ADD_DEV and SET_PARAMS; startDev() follows once every tag was fetched.
  Status Create() {
    std::lock_guard<std::mutex> lk(lifeMu);
    auto t0 = std::chrono::steady_clock::now();
    int r = ctrl.Open();
    if (r < 0) return Status::Err(r, "open /dev/ublk-control");
    if ((r = ProbeFeatures(ctrl, &features)) < 0) return Status::Err(r, "UBLK_U_CMD_GET_FEATURES (kernel < 6.5?)");
    bool zcAvail = (features & (F_SUPPORT_ZERO_COPY | F_AUTO_BUF_REG)) == (F_SUPPORT_ZERO_COPY | F_AUTO_BUF_REG);
    bool ucAvail = features & F_USER_COPY;
    if (opt.transport == "zero-copy") {
      if (!zcAvail) return Status::Err(EOPNOTSUPP, "zero-copy transport needs UBLK_F_SUPPORT_ZERO_COPY + UBLK_F_AUTO_BUF_REG (kernel >= 6.16)");
      zc = true;
    } else if (opt.transport == "user-copy") {
      if (!ucAvail) return Status::Err(EOPNOTSUPP, "user-copy transport needs UBLK_F_USER_COPY (kernel >= 6.5)");
    } else {
      zc = zcAvail;
      if (!zc && !ucAvail) return Status::Err(EOPNOTSUPP, "kernel offers neither USER_COPY nor AUTO_BUF_REG");
    }
    uint64_t flags = F_CMD_IOCTL_ENCODE | (zc ? (F_SUPPORT_ZERO_COPY | F_AUTO_BUF_REG) : F_USER_COPY);
    if (opt.recovery) {
      uint64_t want = F_USER_RECOVERY | (opt.recovery == 2 ? F_USER_RECOVERY_REISSUE : 0) |
                      (opt.recovery == 3 ? F_USER_RECOVERY_FAIL_IO : 0);
      if ((features & want) != want) return Status::Err(EOPNOTSUPP, "this UBLK_F_USER_RECOVERY mode is not offered");
      flags |= want;
    }
    if (!opt.partScan) flags |= features & F_NO_AUTO_PART_SCAN;

    info = DevInfo{};
    info.nr_hw_queues = opt.queues;
    info.queue_depth = opt.depth;
    info.max_io_buf_bytes = opt.maxIo;
    info.dev_id = 0xFFFFFFFF;  // must equal cmd.dev_id on 6.17+
    info.ublksrv_pid = getpid();
    info.flags = flags;
    // Server-private and kept by the kernel: lets a later process tell a
    // device strata left behind (and whose) from anyone else's.
    if (opt.owner >= 0) info.ublksrv_flags = kOwnerMagic << 32 | uint64_t(opt.owner);
    auto lap = [t = std::chrono::steady_clock::now()]() mutable {
      auto n = std::chrono::steady_clock::now();
      double d = std::chrono::duration<double, std::milli>(n - t).count();
      t = n;
      return d;
    };
    r = ctrl.Cmd(kCmdAddDev, 0xFFFFFFFF, &info, sizeof info);
    if (r < 0) return Status::Err(r, "UBLK_U_CMD_ADD_DEV");
    id = info.dev_id;
    state = State::Added;
    stepMs[0] = lap();
    Status s = SetParams();
    stepMs[1] = lap();
    if (!s.ok()) {
      DelDev();
      state = State::Deleted;
      return s;
    }
    createMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return s;
  }

  Status SetParams() {
    Params p{};
    p.types = PARAM_BASIC | PARAM_DISCARD;
    p.basic.attrs = ATTR_VOLATILE_CACHE | ATTR_FUA;
    p.basic.logical_bs_shift = 9;
    p.basic.physical_bs_shift = 12;
    p.basic.io_opt_shift = 12;
    p.basic.io_min_shift = 9;
    p.basic.max_sectors = info.max_io_buf_bytes >> 9;
    p.basic.dev_sectors = opt.size >> 9;
    p.discard.discard_granularity = 4096;
    p.discard.max_discard_sectors = info.max_io_buf_bytes >> 9;
    p.discard.max_write_zeroes_sectors = info.max_io_buf_bytes >> 9;
    p.discard.max_discard_segments = 1;
    p.len = offsetof(Params, devt);
    // No DMA_ALIGN/SEGMENT: the block layer's default 511-byte alignment
    // already suits buffered and O_DIRECT backing files.
    int r = ctrl.Cmd(kCmdSetParams, id, &p, sizeof p);
    if (r < 0) return Status::Err(r, "UBLK_U_CMD_SET_PARAMS");
    return Status::Ok();
  }

  // Recovery of a device whose server died (USER_RECOVERY): same queues, new
  // process. START_USER_RECOVERY here; the tags are fetched anew, then
  // startDev() sends END_USER_RECOVERY.
  Status Recover(uint32_t devId) {
    std::lock_guard<std::mutex> lk(lifeMu);
    int r = ctrl.Open();
    if (r < 0) return Status::Err(r, "open /dev/ublk-control");
    if ((r = ProbeFeatures(ctrl, &features)) < 0) return Status::Err(r, "UBLK_U_CMD_GET_FEATURES");
    id = devId;
    r = ctrl.Cmd(kCmdGetDevInfo, id, &info, sizeof info);
    if (r < 0) return Status::Err(r, "UBLK_U_CMD_GET_DEV_INFO");
    if (!(info.flags & F_USER_RECOVERY)) return Status::Err(EINVAL, "device was created without recovery");
    zc = info.flags & F_AUTO_BUF_REG;
    if (!zc && !(info.flags & F_USER_COPY)) return Status::Err(EOPNOTSUPP, "device uses a transport strata does not serve");
    opt.queues = info.nr_hw_queues;
    opt.depth = info.queue_depth;
    opt.maxIo = info.max_io_buf_bytes;
    opt.recovery = 1;
    // Accepted only once the dead server has released /dev/ublkcN, which
    // the kernel does asynchronously after the process exits. Usually within
    // 100 ms; on 6.12 a server that died holding every tag is noticed only
    // by a request timing out (30 s unless the device's io_timeout was
    // shortened, as UblkDevice does), so allow 60 s.
    for (int i = 0; i < 6000; i++) {
      r = ctrl.Cmd(kCmdStartUserRecovery, id);
      if (r != -EBUSY) break;
      usleep(10000);
    }
    if (r < 0) return Status::Err(r, "UBLK_U_CMD_START_USER_RECOVERY");
    state = State::Added;
    recovering = true;
    return Status::Ok();
  }

  // Every tag of every queue was fetched on the workers' rings (6.12 waits
  // in START_DEV until then; newer kernels fail it instead).
  Status StartDev() {
    std::lock_guard<std::mutex> lk(lifeMu);
    if (state != State::Added) return Status::Err(EINVAL, "startDev: the device is not added (or already started)");
    int r = ctrl.Cmd(recovering ? kCmdEndUserRecovery : kCmdStartDev, id, nullptr, 0, uint64_t(getpid()));
    if (r < 0) return Status::Err(r, recovering ? "UBLK_U_CMD_END_USER_RECOVERY" : "UBLK_U_CMD_START_DEV");
    recovering = false;
    state = State::Live;
    return Status::Ok();
  }

  Status Stop(bool tryOnly) {
    std::lock_guard<std::mutex> lk(lifeMu);
    return StopLocked(tryOnly);
  }

  Status StopLocked(bool tryOnly) {
    if (state == State::Live) {
      if (tryOnly && !(features & F_SAFE_STOP_DEV))
        return Status::Err(EOPNOTSUPP, "UBLK_U_CMD_TRY_STOP_DEV needs UBLK_F_SAFE_STOP_DEV (kernel >= 7.0)");
      // The workers keep serving while STOP_DEV drains the disk; then it aborts every fetched tag.
      int r = ctrl.Cmd(tryOnly ? kCmdTryStopDev : kCmdStopDev, id);
      if (r < 0) return Status::Err(r, tryOnly ? "UBLK_U_CMD_TRY_STOP_DEV" : "UBLK_U_CMD_STOP_DEV");
      state = State::Stopped;
    }
    return Status::Ok();
  }

  void DelDev() {
    int r = DelDevCmd(ctrl, id);
    lastDelErr = r < 0 ? r : 0;
  }
  int lastDelErr = 0;

  Status Delete() {
    std::lock_guard<std::mutex> lk(lifeMu);
    if (state == State::Deleted) return Status::Ok();
    if (state == State::New) { state = State::Deleted; return Status::Ok(); }
    Status s = StopLocked(false);
    if (!s.ok()) return s;
    DelDev();
    state = State::Deleted;
    ctrl.Close();
    if (lastDelErr) return Status::Err(lastDelErr, "UBLK_U_CMD_DEL_DEV");
    return Status::Ok();
  }

  /** Let go of the device without stopping it: a recovery device is left for another process. */
  void Abandon() {
    std::lock_guard<std::mutex> lk(lifeMu);
    ctrl.Close();
    state = State::Deleted;
  }
};

// ------------------------------------------------------------ JS wrappers

uint64_t OptUint(Napi::Object o, const char* k, uint64_t def, uint64_t min, uint64_t max) {
  Napi::Value v = o.Get(k);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsNumber()) Throw(o.Env(), EINVAL, std::string(k) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= double(min) && d <= double(max)) || d != double(uint64_t(d)))
    Throw(o.Env(), EINVAL, std::string(k) + " must be an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  return uint64_t(d);
}

bool OptBool(Napi::Object o, const char* k) {
  Napi::Value v = o.Get(k);
  return !v.IsUndefined() && !v.IsNull() && v.ToBoolean().Value();
}

std::string TransportName(bool zc) { return zc ? "zero-copy" : "user-copy"; }

Napi::Array FeatureNames(Napi::Env env, uint64_t f) {
  Napi::Array a = Napi::Array::New(env);
  for (const auto& n : kFeatureNames)
    if (f & n.bit) a.Set(a.Length(), n.name);
  return a;
}

// Runs a lifecycle step on a libuv worker thread and settles a promise.
class LifeWorker : public Napi::AsyncWorker {
 public:
  using Fn = std::function<Status()>;
  using Done = std::function<Napi::Value(Napi::Env)>;
  LifeWorker(Napi::Env env, Fn fn, Done done)
      : Napi::AsyncWorker(env, "strata:ublk"), def_(Napi::Promise::Deferred::New(env)), fn_(std::move(fn)),
        done_(std::move(done)) {}
  Napi::Promise Promise() { return def_.Promise(); }
  void Execute() override { st_ = fn_(); }
  /** Runs on the JS thread after success and failure alike. */
  void Always(std::function<void(Napi::Env)> f) { always_ = std::move(f); }
  void OnOK() override {
    Napi::Env env = Env();
    if (always_) always_(env);
    if (!st_.ok()) {
      def_.Reject(MakeError(env, st_.err, st_.what).Value());
      return;
    }
    try {
      def_.Resolve(done_ ? done_(env) : env.Undefined());
    } catch (const Napi::Error& e) {
      def_.Reject(e.Value());
    }
  }

 private:
  Napi::Promise::Deferred def_;
  Fn fn_;
  Done done_;
  Status st_;
  std::function<void(Napi::Env)> always_;
};

class UblkDevice : public Napi::ObjectWrap<UblkDevice> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "UblkDevice",
                       {InstanceMethod<&UblkDevice::Start>("start"),
                        InstanceMethod<&UblkDevice::RecoverJs>("recover"),
                        InstanceMethod<&UblkDevice::StartDevJs>("startDev"),
                        InstanceMethod<&UblkDevice::StopJs>("stop"),
                        InstanceMethod<&UblkDevice::DeleteJs>("delete"),
                        InstanceMethod<&UblkDevice::AbandonJs>("abandon"),
                        InstanceMethod<&UblkDevice::Stats>("stats")});
  }

  // new UblkDevice({ size, queues, depth, maxIo, transport, recovery, partScan, owner })
  explicit UblkDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<UblkDevice>(info) {
    Napi::Env env = info.Env();
    dev_ = std::make_shared<Dev>();
    if (!info[0].IsObject()) Throw(env, EINVAL, "options must be an object");
    Napi::Object o = info[0].As<Napi::Object>();
    Options& op = dev_->opt;
    op.size = OptUint(o, "size", 0, 0, 1ull << 53);
    if (op.size % 512) Throw(env, EINVAL, "size must be a multiple of 512");
    op.queues = OptUint(o, "queues", 1, 1, 64);
    op.depth = OptUint(o, "depth", 64, 1, kMaxQueueDepth);
    op.maxIo = OptUint(o, "maxIo", 512 << 10, 4096, 1u << kIoBufBits);
    if (op.maxIo % 4096) Throw(env, EINVAL, "maxIo must be a multiple of 4096");
    Napi::Value tr = o.Get("transport");
    if (tr.IsString()) op.transport = tr.As<Napi::String>().Utf8Value();
    if (op.transport != "auto" && op.transport != "zero-copy" && op.transport != "user-copy")
      Throw(env, EINVAL, "transport must be auto, zero-copy or user-copy");
    // recovery: false | true | 'reissue' | 'fail-io'
    Napi::Value rv = o.Get("recovery");
    if (rv.IsString()) {
      std::string m = rv.As<Napi::String>().Utf8Value();
      if (m == "reissue") op.recovery = 2;
      else if (m == "fail-io") op.recovery = 3;
      else Throw(env, EINVAL, "recovery must be true, 'reissue' or 'fail-io'");
    } else {
      op.recovery = OptBool(o, "recovery") ? 1 : 0;
    }
    op.partScan = OptBool(o, "partScan");
    Napi::Value ow = o.Get("owner");
    if (!ow.IsUndefined() && !ow.IsNull()) op.owner = int64_t(OptUint(o, "owner", 0, 0, 0xFFFFFFFFu));
  }

 private:
  Napi::Value Describe(Napi::Env env) {
    Dev& d = *dev_;
    Napi::Object r = Napi::Object::New(env);
    r.Set("id", Napi::Number::New(env, d.id));
    r.Set("transport", TransportName(d.zc));
    r.Set("queues", Napi::Number::New(env, d.info.nr_hw_queues));
    r.Set("depth", Napi::Number::New(env, d.info.queue_depth));
    r.Set("maxIo", Napi::Number::New(env, d.info.max_io_buf_bytes));
    r.Set("flags", FeatureNames(env, d.info.flags));
    r.Set("createMs", Napi::Number::New(env, d.createMs));
    Napi::Object steps = Napi::Object::New(env);
    steps.Set("addDev", Napi::Number::New(env, d.stepMs[0]));
    steps.Set("setParams", Napi::Number::New(env, d.stepMs[1]));
    r.Set("createSteps", steps);
    return r;
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (dev_->state != State::New || started_) Throw(env, EBUSY, "device already started");
    if (dev_->opt.size == 0) Throw(env, EINVAL, "size is required");
    started_ = true;
    auto dev = dev_;
    auto* w = new LifeWorker(
        env, [dev] { return dev->Create(); },
        [this, dev](Napi::Env e) -> Napi::Value {
          return Describe(e);
        });
    w->Always([this](Napi::Env e) { Finished(e); });  // a failed start leaves nothing to serve
    // Keep the wrapper alive until the promise settles.
    self_ = Napi::Persistent(Value());
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  Napi::Value RecoverJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (dev_->state != State::New || started_) Throw(env, EBUSY, "device already started");
    uint64_t id = ArgId(info, 0);
    started_ = true;
    auto dev = dev_;
    auto* w = new LifeWorker(env, [dev, id] { return dev->Recover(uint32_t(id)); },
                             [this](Napi::Env e) -> Napi::Value { return Describe(e); });
    w->Always([this](Napi::Env e) { Finished(e); });
    self_ = Napi::Persistent(Value());
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  Napi::Value StartDevJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto dev = dev_;
    auto* w = new LifeWorker(env, [dev] { return dev->StartDev(); }, nullptr);
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  uint64_t ArgId(const Napi::CallbackInfo& info, size_t i) {
    if (!info[i].IsNumber()) Throw(info.Env(), EINVAL, "id must be a number");
    double d = info[i].As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d < 4294967295.0) || d != double(uint64_t(d))) Throw(info.Env(), EINVAL, "bad device id");
    return uint64_t(d);
  }

  Napi::Value StopJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    bool tryOnly = info.Length() > 0 && info[0].IsObject() && OptBool(info[0].As<Napi::Object>(), "try");
    auto dev = dev_;
    auto* w = new LifeWorker(env, [dev, tryOnly] { return dev->Stop(tryOnly); }, nullptr);
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  Napi::Value DeleteJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto dev = dev_;
    auto* w = new LifeWorker(env, [dev] { return dev->Delete(); },
                             [this, dev](Napi::Env e) -> Napi::Value {
                               Finished(e);
                               return e.Undefined();
                             });
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  // Lets go without STOP_DEV/DEL_DEV: a recovery-enabled device goes
  // QUIESCED for another process once this one's rings let its tags go.
  Napi::Value AbandonJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto dev = dev_;
    auto* w = new LifeWorker(env, [dev] { dev->Abandon(); return Status::Ok(); },
                             [this](Napi::Env e) -> Napi::Value {
                               Finished(e);
                               return e.Undefined();
                             });
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  void Finished(Napi::Env) {
    // Deleted, or never got past ADD_DEV (a failed start): the wrapper may go.
    State st = dev_->state.load();
    if (st == State::Deleted || st == State::New) self_.Reset();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object r = Napi::Object::New(env);
    static const char* kStates[] = {"new", "added", "live", "stopped", "deleted"};
    r.Set("state", kStates[int(dev_->state.load())]);
    return r;
  }

  std::shared_ptr<Dev> dev_;
  bool started_ = false;
  Napi::ObjectReference self_;
};

// ublkFeatures() -> { flags: number, names: string[] }; throws with errno
// (ENOENT: no /dev/ublk-control, i.e. ublk_drv not loaded).
Napi::Value Features(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Ctrl c;
  int r = c.Open();
  if (r < 0) Throw(env, -r, "open /dev/ublk-control");
  uint64_t f = 0;
  if ((r = ProbeFeatures(c, &f)) < 0) Throw(env, -r, "UBLK_U_CMD_GET_FEATURES");
  Napi::Object o = Napi::Object::New(env);
  o.Set("flags", Napi::Number::New(env, double(f)));
  o.Set("names", FeatureNames(env, f));
  return o;
}

// ublkIoDescs(cdevFd, queue, depth): the queue's request descriptors
// (ublksrv_io_desc, 24 bytes per tag), mapped read-only as an ArrayBuffer;
// unmapped when it is collected.
Napi::Value IoDescsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  using strata::ArgUint;
  int fd = int(ArgUint(info, 0, "fd", INT32_MAX));
  uint16_t q = uint16_t(ArgUint(info, 1, "queue", 0xFFFF));
  uint32_t depth = uint32_t(ArgUint(info, 2, "depth", kMaxQueueDepth));
  if (depth == 0) Throw(env, EINVAL, "depth must be >= 1");
  size_t len;
  void* m = MapIoDescs(fd, q, depth, &len);
  if (m == MAP_FAILED) Throw(env, errno, "mmap ublk io descriptors");
  return Napi::ArrayBuffer::New(env, m, len, [](Napi::Env, void* p, size_t* n) { munmap(p, *n); delete n; }, new size_t(len));
}

// ublkDeviceInfo(id) -> { id, state, ownerPid, flags, owner } of any kernel
// ublk device (owner: the strata owner id, null when strata did not tag it).
// Throws ENODEV when there is no such device (ENOENT without ublk_drv).
Napi::Value DeviceInfoJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) Throw(env, EINVAL, "ublkDeviceInfo(id)");
  uint32_t id = info[0].As<Napi::Number>().Uint32Value();
  Ctrl c;
  int r = c.Open();
  if (r < 0) Throw(env, -r, "open /dev/ublk-control");
  DevInfo d{};
  if ((r = c.Cmd(kCmdGetDevInfo, id, &d, sizeof d)) < 0) Throw(env, -r, "UBLK_U_CMD_GET_DEV_INFO");
  static const char* kStates[] = {"dead", "live", "quiesced", "fail-io"};
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", Napi::Number::New(env, d.dev_id));
  o.Set("state", d.state < 4 ? Napi::String::New(env, kStates[d.state]) : Napi::String::New(env, "unknown"));
  o.Set("ownerPid", Napi::Number::New(env, d.ublksrv_pid));
  o.Set("flags", FeatureNames(env, d.flags));
  if ((d.ublksrv_flags >> 32) == kOwnerMagic) o.Set("owner", Napi::Number::New(env, double(uint32_t(d.ublksrv_flags))));
  else o.Set("owner", env.Null());
  return o;
}

// ublkRemove(id) -> Promise: removes a kernel device nobody serves. STOP_DEV
// first (it fails the I/O a quiesced device holds), then DEL_DEV(_ASYNC).
Napi::Value RemoveJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) Throw(env, EINVAL, "ublkRemove(id)");
  uint32_t id = info[0].As<Napi::Number>().Uint32Value();
  auto* w = new LifeWorker(
      env,
      [id] {
        Ctrl c;
        int r = c.Open();
        if (r < 0) return Status::Err(r, "open /dev/ublk-control");
        r = c.Cmd(kCmdStopDev, id);
        if (r < 0) return Status::Err(r, "UBLK_U_CMD_STOP_DEV");
        if ((r = DelDevCmd(c, id)) < 0) return Status::Err(r, "UBLK_U_CMD_DEL_DEV");
        return Status::Ok();
      },
      nullptr);
  auto p = w->Promise();
  w->Queue();
  return p;
}

}  // namespace

void InitUblk(Napi::Env env, Napi::Object exports) {
  exports.Set("ublkFeatures", Napi::Function::New(env, Features, "ublkFeatures"));
  exports.Set("UblkDevice", UblkDevice::Init(env));
  exports.Set("ublkDeviceInfo", Napi::Function::New(env, DeviceInfoJs, "ublkDeviceInfo"));
  exports.Set("ublkRemove", Napi::Function::New(env, RemoveJs, "ublkRemove"));
  exports.Set("ublkIoDescs", Napi::Function::New(env, IoDescsJs, "ublkIoDescs"));
  // What a ring serving ublk queues needs of the UAPI (ublk_uapi.h), so no
  // other file defines it again.
  Napi::Object u = Napi::Object::New(env);
  u.Set("fetchReq", Napi::Number::New(env, kIoFetchReq));
  u.Set("commitAndFetchReq", Napi::Number::New(env, kIoCommitAndFetchReq));
  u.Set("resOk", Napi::Number::New(env, kIoResOk));
  u.Set("ioFlagFua", Napi::Number::New(env, IO_F_FUA));
  u.Set("descSize", Napi::Number::New(env, sizeof(IoDesc)));
  u.Set("descOpFlags", Napi::Number::New(env, offsetof(IoDesc, op_flags)));
  u.Set("descSectors", Napi::Number::New(env, offsetof(IoDesc, nr_sectors)));
  u.Set("descStartSector", Napi::Number::New(env, offsetof(IoDesc, start_sector)));
  u.Set("userCopyBase", Napi::Number::New(env, double(kUserCopyBase)));
  u.Set("userCopyQueueStride", Napi::Number::New(env, double(UserCopyPos(1, 0) - kUserCopyBase)));
  u.Set("userCopyTagStride", Napi::Number::New(env, double(UserCopyPos(0, 1) - kUserCopyBase)));
  exports.Set("ublkUapi", u);
}

}  // namespace strata
