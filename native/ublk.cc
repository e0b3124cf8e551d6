// ublk.cc — the ublk frontend.
//
// Control plane: URING_CMDs on /dev/ublk-control through a small SQE128 ring,
// issued from libuv worker threads (AsyncWorker) so JavaScript stays free to
// answer slow-path requests while START_DEV / STOP_DEV wait on I/O.
//
// Data plane: one native thread per queue owns that queue's io_uring and is
// the only task ever entering it (the kernel binds each tag to the task that
// fetched it). Requests are planned through a strata::Target; the segments
// are executed on the same ring:
//   - USER_COPY: file <-> per-tag buffer <-> /dev/ublkcN at the tag's offset.
//   - zero copy (AUTO_BUF_REG): the kernel registers the request pages as
//     fixed buffer `tag`; READ_FIXED/WRITE_FIXED move data straight between
//     the file and the request (zeros come from /dev/zero the same way).
// Requests the target cannot plan (and FLUSH/DISCARD/WRITE_ZEROES unless the
// target is a plain FileTarget) go to JavaScript. Their data is staged per
// tag — in zero-copy mode in a per-queue memfd, moved in and out of the
// request with WRITE_FIXED/READ_FIXED — so a slow read can never land on
// another request's bytes (hazard H16).

#include "ublk.h"

#include <liburing.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/prctl.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "napi_util.h"
#include "target_js.h"
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

// -------------------------------------------------------------- FileTarget

class FileTarget;
// The addon builds without RTTI: FileTargets register themselves so a device
// can recognise one (and serve FLUSH/DISCARD/WRITE_ZEROES on its fd).
std::mutex gFileTargetsMu;
std::vector<const FileTarget*> gFileTargets;

// Identity mapping onto one file: every request is one segment.
class FileTarget : public Target {
 public:
  FileTarget(int fd, uint64_t size, bool slow) : fd_(fd), size_(size), slow_(slow) {
    std::lock_guard<std::mutex> lk(gFileTargetsMu);
    gFileTargets.push_back(this);
  }
  ~FileTarget() override {
    {
      std::lock_guard<std::mutex> lk(gFileTargetsMu);
      for (auto& p : gFileTargets)
        if (p == this) { p = gFileTargets.back(); gFileTargets.pop_back(); break; }
    }
    close(fd_);
  }
  static FileTarget* From(Target* t) {
    std::lock_guard<std::mutex> lk(gFileTargetsMu);
    for (const FileTarget* p : gFileTargets)
      if (static_cast<const Target*>(p) == t) return const_cast<FileTarget*>(p);
    return nullptr;
  }
  uint64_t size() const override { return size_; }
  bool plan(TOp op, uint64_t off, uint32_t len, Plan& p) override {
    if (slow_ || off > size_ || len > size_ - off) return false;
    p.op = op;
    if (split_ == 0) {
      p.nseg = 1;
      p.seg[0] = Seg{fd_, len, off};
      return true;
    }
    // Test mode: cut at every multiple of split_, and make every
    // zeroEvery_-th chunk a zero segment, like a sparse overlay plan.
    p.nseg = 0;
    for (uint64_t o = off, end = off + len; o < end;) {
      uint64_t chunk = o / split_;
      uint64_t n = std::min<uint64_t>(end, (chunk + 1) * split_) - o;
      if (p.nseg == uint32_t(kMaxSegs)) return false;
      bool zero = zeroEvery_ && chunk % zeroEvery_ == zeroEvery_ - 1;
      p.seg[p.nseg++] = Seg{zero ? -1 : fd_, uint32_t(n), o};
      o += n;
    }
    return true;
  }
  void SetSplit(uint32_t bytes, uint32_t zeroEvery) {
    split_ = bytes;
    zeroEvery_ = zeroEvery;
  }
  void finish(const Plan&, bool) override {}
  int fd() const { return fd_; }
  bool slow() const { return slow_; }

 private:
  int fd_;
  uint64_t size_;
  bool slow_;
  uint32_t split_ = 0, zeroEvery_ = 0;
};

// A queue's request descriptors, mapped read-only (`len` gets the mapping's length).
void* MapIoDescs(int cdev, uint16_t q, uint32_t depth, size_t* len) {
  size_t page = sysconf(_SC_PAGESIZE);
  *len = (depth * sizeof(IoDesc) + page - 1) / page * page;
  return mmap(nullptr, *len, PROT_READ, MAP_SHARED | MAP_POPULATE, cdev, DescMapOffset(q, page));
}

// ----------------------------------------------------------------- device

// K_LCMD: a COMMIT_AND_FETCH linked behind a request's only target SQE.
enum Kind : uint8_t { K_CMD = 1, K_TGT, K_ZFILL, K_COPY, K_SLOWIN, K_SLOWOUT, K_EVT, K_MISC, K_LCMD };
inline uint64_t Ud(uint16_t tag, Kind k, uint8_t seg = 0) {
  return uint64_t(tag) | (uint64_t(k) << 16) | (uint64_t(seg) << 24);
}

struct SlowReq {
  uint16_t q, tag;
  uint8_t op;
  uint32_t flags;
  uint64_t off;
  uint32_t len;
};

struct Done {
  uint16_t tag;
  int32_t result;
};

struct TagState {
  Plan plan;
  bool planned = false;
  bool dead = false;   // aborted by the kernel: never re-fetch
  bool busy = false;   // owns a request (between FETCH completion and COMMIT)
  uint8_t op = 0;
  uint32_t flags = 0;
  uint64_t off = 0;
  uint32_t len = 0;
  int pending = 0;  // outstanding target SQEs
  int err = 0;
  bool linked = false;  // its commit is queued behind the target SQE (zero copy, one segment)
  std::atomic<bool> jsOwned{false};
};

struct Dev;

class Queue {
 public:
  Queue(Dev* d, uint16_t qid) : dev_(d), qid_(qid) {}
  ~Queue() {
    Join();
    FreeStage();
  }
  std::future<Status> Start() {
    auto f = ready_.get_future();
    th_ = std::thread([this] { Run(); });
    return f;
  }
  void RequestStop() {
    stop_.store(true);
    Kick();
  }
  void Join() {
    if (th_.joinable()) th_.join();
  }
  /** JS thread: a slow request answered. */
  void PushDone(uint16_t tag, int32_t result) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_.push_back({tag, result});
    }
    Kick();
  }
  /** JS thread, after delete: the staging memory is no longer reachable. */
  void FreeStage() {
    if (stage_) munmap(stage_, stageLen_), stage_ = nullptr;
  }
  uint8_t* Stage(uint16_t tag) const { return stage_ + size_t(tag) * maxIo_; }
  TagState& Tag(uint16_t tag) { return tags_[tag]; }

 private:
  // Under mu_ so Teardown never closes the eventfd between load and write.
  void Kick() {
    std::lock_guard<std::mutex> lk(mu_);
    int fd = efd_.load();
    if (fd >= 0) {
      uint64_t one = 1;
      (void)!write(fd, &one, sizeof one);
    }
  }
  void Run();
  Status Setup();
  void Loop();
  void Teardown();
  io_uring_sqe* Sqe();
  void ArmEventfd();
  void QueueFetch(uint16_t tag, uint32_t cmdOp, int32_t result, Kind k = K_CMD);
  void LinkCommit(io_uring_sqe* target, uint16_t tag);
  // A link must not straddle two submissions (Sqe() submits when the ring is
  // full): a chain cut there would commit before the I/O ran.
  bool Linkable(const TagState& t) const { return zc_ && t.plan.nseg == 1; }
  void RoomForLink() {
    if (io_uring_sq_space_left(&ring_) < 2) io_uring_submit(&ring_);
  }
  void Commit(uint16_t tag, int32_t result);
  void Handle(io_uring_cqe* cqe);
  void Dispatch(uint16_t tag);
  void StartRead(uint16_t tag);
  void StartWrite(uint16_t tag);
  void PrepSeg(uint16_t tag, uint8_t i, bool write, int fd, uint32_t o, uint32_t len, uint64_t off, int rwFlags);
  void TargetDone(uint16_t tag);
  void ToSlow(uint16_t tag);
  void Publish(uint16_t tag);
  void OnEventfd();
  void PrepRw(io_uring_sqe* sqe, uint8_t opcode, int fd, uint64_t addr, uint32_t len, uint64_t off) {
    io_uring_prep_rw(opcode, sqe, fd, reinterpret_cast<void*>(addr), len, off);
  }
  void PrepCopy(uint16_t tag, bool toDevice, uint8_t* buf, uint32_t len, Kind k);
  uint32_t SegOffset(const Plan& p, int i) const {
    uint32_t o = 0;
    for (int j = 0; j < i; j++) o += p.seg[j].len;
    return o;
  }

  Dev* dev_;
  uint16_t qid_;
  std::thread th_;
  std::promise<Status> ready_;
  std::atomic<bool> stop_{false};
  std::atomic<int> efd_{-1};
  io_uring ring_{};
  bool ringUp_ = false;
  bool zc_ = false;
  uint32_t depth_ = 0, maxIo_ = 0;
  const IoDesc* descs_ = nullptr;
  size_t descLen_ = 0;
  uint8_t* stage_ = nullptr;  // depth * maxIo: USER_COPY buffers, or the zero-copy staging memfd
  size_t stageLen_ = 0;
  int memfd_ = -1;
  uint64_t efdVal_ = 0;
  std::unique_ptr<TagState[]> tags_;
  int inflight_ = 0;  // SQEs other than FETCH/COMMIT and the eventfd read
  std::mutex mu_;
  std::vector<Done> done_;
};

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
  bool alwaysSlow = false;
  bool partScan = false;
  int64_t owner = -1;  // strata owner id kept in ublksrv_flags; -1: none
  // Queues served by another party (an I/O worker's ring): start() only
  // adds the device, opens nothing and starts no thread; startDev() starts
  // it once every tag was fetched there.
  bool external = false;
};

enum class State { New, Added, Live, Stopped, Deleted };

struct Dev {
  Options opt;
  TargetRef target;
  int fileFd = -1;  // FileTarget fast path for FLUSH/DISCARD/WRITE_ZEROES
  Ctrl ctrl;
  DevInfo info{};
  uint64_t features = 0;
  bool zc = false;
  bool recovering = false;  // external: START_USER_RECOVERY sent, startDev() ends it
  int cdev = -1;
  int zerofd = -1;
  std::vector<std::unique_ptr<Queue>> queues;
  std::mutex lifeMu;
  std::atomic<State> state{State::New};
  uint32_t id = 0xFFFFFFFF;

  std::mutex slowMu;
  std::vector<SlowReq> slow;
  Napi::ThreadSafeFunction tsfn;
  std::atomic<bool> tsfnLive{false};

  std::atomic<uint64_t> fastIos{0}, slowIos{0};
  // Queue-thread wake-ups (io_uring_enter returns) and the CQEs they reaped:
  // their ratio is how much each wake-up batches.
  std::atomic<uint64_t> waits{0}, cqes{0};
  double createMs = 0;
  // Where create() spends its time: ADD_DEV, SET_PARAMS, open cdev, queues ready, START_DEV.
  double stepMs[5] = {0, 0, 0, 0, 0};

  void Notify() {
    if (tsfnLive.load()) tsfn.NonBlockingCall();
  }

  Status OpenCdev() {
    char path[64];
    snprintf(path, sizeof path, "/dev/ublkc%u", id);
    // devtmpfs creates the node with the device; udev may still be
    // adjusting it, so retry briefly like kublk does.
    for (int i = 0; i < 3000; i++) {
      cdev = open(path, O_RDWR | O_CLOEXEC);
      if (cdev >= 0) return Status::Ok();
      if (errno != ENOENT && errno != EACCES && errno != EPERM) break;
      usleep(1000);
    }
    return Status::Err(errno, std::string("open ") + path);
  }

  Status StartQueues() {
    if (zc) {
      zerofd = open("/dev/zero", O_RDONLY | O_CLOEXEC);
      if (zerofd < 0) return Status::Err(errno, "open /dev/zero");
    }
    queues.clear();
    for (uint16_t q = 0; q < info.nr_hw_queues; q++) queues.emplace_back(new Queue(this, q));
    std::vector<std::future<Status>> ready;
    for (auto& q : queues) ready.push_back(q->Start());
    Status first;
    for (auto& f : ready) {
      Status s = f.get();
      if (!s.ok() && first.ok()) first = s;
    }
    return first;
  }

  // Queue objects stay until the device is finished on the JS thread:
  // drain()/complete() may still look at them.
  void StopQueues() {
    for (auto& q : queues) q->RequestStop();
    for (auto& q : queues) q->Join();
    if (cdev >= 0) close(cdev), cdev = -1;
    if (zerofd >= 0) close(zerofd), zerofd = -1;
  }

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
    if (s.ok() && opt.external) {
      createMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      return s;  // state Added: startDev() follows
    }
    if (s.ok()) s = OpenCdev();
    stepMs[2] = lap();
    if (s.ok()) s = StartQueues();
    stepMs[3] = lap();
    if (s.ok()) {
      // Every queue has submitted its FETCH_REQs and sits in
      // io_uring_enter(GETEVENTS), which runs the deferred FETCH task work.
      r = ctrl.Cmd(kCmdStartDev, id, nullptr, 0, uint64_t(getpid()));
      if (r < 0) s = Status::Err(r, "UBLK_U_CMD_START_DEV");
    }
    stepMs[4] = lap();
    if (!s.ok()) {
      StopQueues();
      DelDev();
      state = State::Deleted;
      return s;
    }
    state = State::Live;
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

  // Recovery of a device whose server died (USER_RECOVERY): same queues,
  // new process.
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
    if (opt.external) {
      recovering = true;
      return Status::Ok();  // the other ring fetches every tag; startDev() ends the recovery
    }
    Status s = OpenCdev();
    if (s.ok()) s = StartQueues();
    if (s.ok()) {
      r = ctrl.Cmd(kCmdEndUserRecovery, id, nullptr, 0, uint64_t(getpid()));
      if (r < 0) s = Status::Err(r, "UBLK_U_CMD_END_USER_RECOVERY");
    }
    if (!s.ok()) {
      StopQueues();  // leaves the device quiesced for another attempt
      state = State::Deleted;  // this object is done with it
      return s;
    }
    state = State::Live;
    return s;
  }

  Status Stop(bool tryOnly) {
    std::lock_guard<std::mutex> lk(lifeMu);
    return StopLocked(tryOnly);
  }

  // External queues: every tag was fetched on their ring (6.12 waits in
  // START_DEV until then; newer kernels fail it instead).
  Status StartDev() {
    std::lock_guard<std::mutex> lk(lifeMu);
    if (state != State::Added) return Status::Err(EINVAL, "startDev: the device is not added (or already started)");
    int r = ctrl.Cmd(recovering ? kCmdEndUserRecovery : kCmdStartDev, id, nullptr, 0, uint64_t(getpid()));
    if (r < 0) return Status::Err(r, recovering ? "UBLK_U_CMD_END_USER_RECOVERY" : "UBLK_U_CMD_START_DEV");
    recovering = false;
    state = State::Live;
    return Status::Ok();
  }

  Status StopLocked(bool tryOnly) {
    if (state == State::Live) {
      if (tryOnly && !(features & F_SAFE_STOP_DEV))
        return Status::Err(EOPNOTSUPP, "UBLK_U_CMD_TRY_STOP_DEV needs UBLK_F_SAFE_STOP_DEV (kernel >= 7.0)");
      // Queue threads keep serving while STOP_DEV drains the disk.
      int r = ctrl.Cmd(tryOnly ? kCmdTryStopDev : kCmdStopDev, id);
      if (r < 0) return Status::Err(r, tryOnly ? "UBLK_U_CMD_TRY_STOP_DEV" : "UBLK_U_CMD_STOP_DEV");
      state = State::Stopped;
    }
    StopQueues();
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

  /** Detach from the device without stopping it (recovery tests). */
  void Abandon() {
    std::lock_guard<std::mutex> lk(lifeMu);
    StopQueues();
    ctrl.Close();
    state = State::Deleted;
  }
};

// ----------------------------------------------------------- queue thread

void Queue::Run() {
  // Reclaim must not wait on writeback through our own device.
  prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
  Status s = Setup();
  ready_.set_value(s);
  if (s.ok()) Loop();
  Teardown();
}

Status Queue::Setup() {
  zc_ = dev_->zc;
  depth_ = dev_->info.queue_depth;
  maxIo_ = dev_->info.max_io_buf_bytes;
  tags_.reset(new TagState[depth_]);
  unsigned entries = 2 * depth_ + 16;
  io_uring_params p{};
  p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
  p.cq_entries = entries * 4;
  int r = io_uring_queue_init_params(entries, &ring_, &p);
  if (r == -EINVAL) {
    p = io_uring_params{};
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 4;
    r = io_uring_queue_init_params(entries, &ring_, &p);
  }
  if (r < 0) return Status::Err(r, "io_uring_queue_init (queue)");
  ringUp_ = true;
  int cdev = dev_->cdev;
  if ((r = io_uring_register_files(&ring_, &cdev, 1)) < 0) return Status::Err(r, "io_uring_register_files");
  if (zc_ && (r = io_uring_register_buffers_sparse(&ring_, depth_)) < 0)
    return Status::Err(r, "io_uring_register_buffers_sparse");

  void* m = MapIoDescs(cdev, qid_, depth_, &descLen_);
  if (m == MAP_FAILED) return Status::Err(errno, "mmap io descriptors");
  descs_ = static_cast<const IoDesc*>(m);

  stageLen_ = size_t(depth_) * maxIo_;
  if (zc_) {
    memfd_ = memfd_create("strata-ublk-stage", MFD_CLOEXEC);
    if (memfd_ < 0) return Status::Err(errno, "memfd_create");
    if (ftruncate(memfd_, stageLen_) < 0) return Status::Err(errno, "ftruncate staging memfd");
    m = mmap(nullptr, stageLen_, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_, 0);
  } else {
    m = mmap(nullptr, stageLen_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  }
  if (m == MAP_FAILED) return Status::Err(errno, "mmap staging buffers");
  stage_ = static_cast<uint8_t*>(m);

  int efd = eventfd(0, EFD_CLOEXEC);
  if (efd < 0) return Status::Err(errno, "eventfd");
  efd_.store(efd);
  ArmEventfd();
  for (uint16_t t = 0; t < depth_; t++) QueueFetch(t, kIoFetchReq, -1);
  r = io_uring_submit(&ring_);
  if (r < 0) return Status::Err(r, "io_uring_submit (FETCH_REQ)");
  // A FETCH rejected at issue completes inline: report it instead of
  // letting START_DEV wait for a queue that will never be ready.
  io_uring_cqe* cqe;
  unsigned head;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    if ((cqe->user_data >> 16 & 0xFF) == K_CMD && cqe->res < 0) return Status::Err(cqe->res, "UBLK_U_IO_FETCH_REQ");
  }
  return Status::Ok();
}

io_uring_sqe* Queue::Sqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  while (!sqe) {
    io_uring_submit(&ring_);
    sqe = io_uring_get_sqe(&ring_);
  }
  return sqe;
}

void Queue::ArmEventfd() {
  io_uring_sqe* sqe = Sqe();
  io_uring_prep_read(sqe, efd_.load(), &efdVal_, sizeof efdVal_, 0);
  io_uring_sqe_set_data64(sqe, Ud(0, K_EVT));
}

void Queue::QueueFetch(uint16_t tag, uint32_t cmdOp, int32_t result, Kind k) {
  io_uring_sqe* sqe = Sqe();
  io_uring_prep_rw(IORING_OP_URING_CMD, sqe, 0, nullptr, 0, 0);
  sqe->flags |= IOSQE_FIXED_FILE;
  sqe->cmd_op = cmdOp;
  // AUTO_BUF_REG: the kernel registers each request's pages as fixed
  // buffer `tag` on this ring before delivering it.
  sqe->addr = zc_ ? AutoBufReg(tag, 0) : 0;
  IoCmd c{qid_, tag, result, 0};
  memcpy(sqe->cmd, &c, sizeof c);
  io_uring_sqe_set_data64(sqe, Ud(tag, k));
}

// Zero copy, one segment: the commit rides behind the file I/O as a linked
// SQE, so the kernel completes the block request as soon as the I/O is done
// instead of after a round trip through this thread. A failed or short I/O
// breaks the link (the commit is cancelled) and TargetDone commits itself.
// The plan is still finished on the I/O's own completion; until then its
// stripes stay held, so a request for the same blocks on another queue
// takes the slow path rather than reading ahead of the published state.
// ublk re-issues a linked command that lands on an io-wq worker in the
// queue's task (IO_URING_F_UNLOCKED), so this holds for punted I/O too.
void Queue::LinkCommit(io_uring_sqe* target, uint16_t tag) {
  target->flags |= IOSQE_IO_LINK;
  tags_[tag].linked = true;
  QueueFetch(tag, kIoCommitAndFetchReq, int32_t(tags_[tag].len), K_LCMD);
}

void Queue::Commit(uint16_t tag, int32_t result) {
  TagState& t = tags_[tag];
  t.busy = false;
  t.planned = false;
  QueueFetch(tag, kIoCommitAndFetchReq, result);
}

void Queue::Loop() {
  for (;;) {
    if (stop_.load() && inflight_ == 0) {
      bool anyBusy = false;
      for (uint32_t i = 0; i < depth_; i++) anyBusy |= tags_[i].busy && !tags_[i].jsOwned.load();
      if (!anyBusy) break;
    }
    int r = io_uring_submit_and_wait(&ring_, 1);
    if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
      fprintf(stderr, "strata ublk q%u: io_uring_submit_and_wait: %s\n", qid_, strerror(-r));
      break;
    }
    io_uring_cqe* cqe;
    unsigned head, seen = 0;
    // Handlers queue new SQEs; they go out with the next submit_and_wait.
    io_uring_for_each_cqe(&ring_, head, cqe) {
      Handle(cqe);
      seen++;
    }
    io_uring_cq_advance(&ring_, seen);
    dev_->waits.fetch_add(1, std::memory_order_relaxed);
    dev_->cqes.fetch_add(seen, std::memory_order_relaxed);
  }
}

void Queue::Teardown() {
  // Closing the ring cancels the outstanding FETCH/COMMIT commands.
  if (ringUp_) io_uring_queue_exit(&ring_), ringUp_ = false;
  if (descs_) munmap(const_cast<IoDesc*>(descs_), descLen_), descs_ = nullptr;
  // stage_ stays mapped until the JS thread frees it (drain() may still
  // copy a slow WRITE's data out of it).
  if (memfd_ >= 0) close(memfd_), memfd_ = -1;
  std::lock_guard<std::mutex> lk(mu_);
  int efd = efd_.exchange(-1);
  if (efd >= 0) close(efd);
}

void Queue::Handle(io_uring_cqe* cqe) {
  uint16_t tag = cqe->user_data & 0xFFFF;
  Kind k = static_cast<Kind>(cqe->user_data >> 16 & 0xFF);
  uint8_t seg = cqe->user_data >> 24 & 0xFF;
  int res = cqe->res;
  if (k == K_EVT) {
    OnEventfd();
    return;
  }
  if (k == K_LCMD && res == -ECANCELED && !stop_.load()) return;  // link broken: TargetDone commits
  if (k == K_CMD || k == K_LCMD) {
    if (res == kIoResOk) {
      if (stop_.load()) {
        // Torn down without STOP_DEV (error path): fail what still arrives.
        tags_[tag].busy = true;
        Commit(tag, -EIO);
        return;
      }
      Dispatch(tag);
    } else {
      // UBLK_IO_RES_ABORT (-ENODEV) or a rejected command: never re-fetch.
      tags_[tag].dead = true;
      tags_[tag].busy = false;
      if (res != -ENODEV && res != -ECANCELED)
        fprintf(stderr, "strata ublk q%u tag %u: io command failed: %s\n", qid_, tag, strerror(-res));
    }
    return;
  }
  inflight_--;
  TagState& t = tags_[tag];
  switch (k) {
    case K_TGT: {
      const Seg& s = t.plan.seg[seg];
      if (t.linked && res != int(s.len)) t.linked = false;  // the link broke: commit ourselves
      if (res < 0) {
        if (!t.err) t.err = res;
      } else if (uint32_t(res) < s.len) {
        if (t.op == OP_READ) {
          // Short read past the end of a backing file: the rest reads as zeros.
          uint32_t o = SegOffset(t.plan, seg) + res;
          uint32_t n = s.len - res;
          if (zc_) {
            io_uring_sqe* sqe = Sqe();
            PrepRw(sqe, IORING_OP_READ_FIXED, dev_->zerofd, o, n, 0);
            sqe->buf_index = tag;
            io_uring_sqe_set_data64(sqe, Ud(tag, K_ZFILL));
            inflight_++;
            t.pending++;
          } else {
            memset(stage_ + size_t(tag) * maxIo_ + o, 0, n);
          }
        } else if (!t.err) {
          t.err = -EIO;
        }
      }
      if (--t.pending == 0) TargetDone(tag);
      return;
    }
    case K_ZFILL:
      if (res < 0 && !t.err) t.err = res;
      if (--t.pending == 0) TargetDone(tag);
      return;
    case K_COPY:
      if (res != int(t.len)) {
        int e = res < 0 ? res : -EIO;
        if (t.planned) dev_->target->finish(t.plan, false);  // WRITE: copy-in failed
        t.planned = false;
        Commit(tag, e);
        return;
      }
      if (t.op == OP_READ) {
        Commit(tag, t.len);  // data is in the request; plan already finished
      } else {
        StartWrite(tag);  // data copied in from the request: write the segments
      }
      return;
    case K_SLOWIN:
      if (res != int(t.len)) {
        Commit(tag, res < 0 ? res : -EIO);
        return;
      }
      Publish(tag);
      return;
    case K_SLOWOUT:
      Commit(tag, res == int(t.len) ? int(t.len) : (res < 0 ? res : -EIO));
      return;
    case K_MISC:
      Commit(tag, res < 0 ? res : 0);
      return;
    default:
      return;
  }
}

void Queue::Dispatch(uint16_t tag) {
  TagState& t = tags_[tag];
  IoDesc d;
  memcpy(&d, &descs_[tag], sizeof d);
  t.busy = true;
  t.op = d.op_flags & 0xFF;
  t.flags = d.op_flags;
  t.off = d.start_sector << 9;
  t.len = d.nr_sectors << 9;
  t.err = 0;
  t.pending = 0;
  t.planned = false;
  switch (t.op) {
    case OP_READ:
    case OP_WRITE: {
      if (t.len > maxIo_) {
        Commit(tag, -EIO);
        return;
      }
      if (dev_->opt.alwaysSlow ||
          !dev_->target->plan(t.op == OP_READ ? TOp::Read : TOp::Write, t.off, t.len, t.plan)) {
        ToSlow(tag);
        return;
      }
      t.planned = true;
      uint64_t sum = 0;
      bool bad = t.plan.nseg == 0 || t.plan.nseg > uint32_t(kMaxSegs);
      for (uint32_t i = 0; !bad && i < t.plan.nseg; i++) sum += t.plan.seg[i].len;
      if (bad || sum != t.len) {
        fprintf(stderr, "strata ublk: target plan does not cover the request (%u segs, %llu of %u bytes)\n",
                t.plan.nseg, (unsigned long long)sum, t.len);
        dev_->target->finish(t.plan, false);
        t.planned = false;
        Commit(tag, -EIO);
        return;
      }
      dev_->fastIos.fetch_add(1, std::memory_order_relaxed);
      if (t.op == OP_READ) {
        StartRead(tag);
      } else if (zc_) {
        StartWrite(tag);
      } else {
        PrepCopy(tag, false, stage_ + size_t(tag) * maxIo_, t.len, K_COPY);
      }
      return;
    }
    case OP_FLUSH:
    case OP_DISCARD:
    case OP_WRITE_ZEROES: {
      int fd = dev_->opt.alwaysSlow ? -1 : dev_->fileFd;
      if (fd < 0) {
        ToSlow(tag);
        return;
      }
      io_uring_sqe* sqe = Sqe();
      if (t.op == OP_FLUSH) {
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
      } else {
        int mode = (t.op == OP_WRITE_ZEROES && (t.flags & IO_F_NOUNMAP)) ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE;
        io_uring_prep_fallocate(sqe, fd, mode | FALLOC_FL_KEEP_SIZE, t.off, t.len);
      }
      io_uring_sqe_set_data64(sqe, Ud(tag, K_MISC));
      inflight_++;
      dev_->fastIos.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    default:
      Commit(tag, -EOPNOTSUPP);
  }
}

// Copies between the request and a userspace buffer: USER_COPY read/write
// on /dev/ublkcN (fixed file 0) at the tag's offset.
void Queue::PrepCopy(uint16_t tag, bool toDevice, uint8_t* buf, uint32_t len, Kind k) {
  io_uring_sqe* sqe = Sqe();
  uint64_t pos = UserCopyPos(qid_, tag);
  if (toDevice) io_uring_prep_write(sqe, 0, buf, len, pos);
  else io_uring_prep_read(sqe, 0, buf, len, pos);
  sqe->flags |= IOSQE_FIXED_FILE;
  io_uring_sqe_set_data64(sqe, Ud(tag, k));
  inflight_++;
}

void Queue::StartRead(uint16_t tag) {
  TagState& t = tags_[tag];
  uint32_t o = 0;
  for (uint32_t i = 0; i < t.plan.nseg; i++) {
    const Seg& s = t.plan.seg[i];
    if (s.fd >= 0) PrepSeg(tag, uint8_t(i), false, s.fd, o, s.len, s.off, 0);
    else if (zc_) PrepSeg(tag, uint8_t(i), false, dev_->zerofd, o, s.len, 0, 0);  // zeroes into the request's pages
    else memset(Stage(tag) + o, 0, s.len);
    o += s.len;
  }
  if (t.pending == 0) TargetDone(tag);
}

void Queue::StartWrite(uint16_t tag) {
  TagState& t = tags_[tag];
  const int rwFlags = (t.flags & IO_F_FUA) ? RWF_DSYNC : 0;  // FUA: durable before the ack
  t.plan.sync = rwFlags != 0;
  uint32_t o = 0;
  for (uint32_t i = 0; i < t.plan.nseg; i++) {
    const Seg& s = t.plan.seg[i];
    if (s.fd >= 0) PrepSeg(tag, uint8_t(i), true, s.fd, o, s.len, s.off, rwFlags);
    o += s.len;
  }
  if (t.pending == 0) TargetDone(tag);
}

// One planned segment's file I/O. Zero copy: READ/WRITE_FIXED on the tag's
// registered request buffer, `o` bytes in; otherwise into the tag's staging
// buffer. A one-segment zero-copy request links its COMMIT behind it.
void Queue::PrepSeg(uint16_t tag, uint8_t i, bool write, int fd, uint32_t o, uint32_t len, uint64_t off, int rwFlags) {
  TagState& t = tags_[tag];
  if (Linkable(t)) RoomForLink();
  io_uring_sqe* sqe = Sqe();
  if (zc_) {
    PrepRw(sqe, write ? IORING_OP_WRITE_FIXED : IORING_OP_READ_FIXED, fd, o, len, off);
    sqe->buf_index = tag;
  } else if (write) {
    io_uring_prep_write(sqe, fd, Stage(tag) + o, len, off);
  } else {
    io_uring_prep_read(sqe, fd, Stage(tag) + o, len, off);
  }
  sqe->rw_flags = rwFlags;
  io_uring_sqe_set_data64(sqe, Ud(tag, K_TGT, i));
  inflight_++;
  t.pending++;
  if (Linkable(t)) LinkCommit(sqe, tag);
}

void Queue::TargetDone(uint16_t tag) {
  TagState& t = tags_[tag];
  bool ok = t.err == 0;
  dev_->target->finish(t.plan, ok);
  t.planned = false;
  if (t.linked) {
    // Committed by the linked SQE (the I/O succeeded, so the link held).
    t.linked = false;
    t.busy = false;
    return;
  }
  if (!ok) {
    Commit(tag, t.err);
  } else if (t.op == OP_READ && !zc_) {
    PrepCopy(tag, true, stage_ + size_t(tag) * maxIo_, t.len, K_COPY);
  } else {
    Commit(tag, t.len);
  }
}

void Queue::ToSlow(uint16_t tag) {
  TagState& t = tags_[tag];
  dev_->slowIos.fetch_add(1, std::memory_order_relaxed);
  if (t.op != OP_WRITE) {
    Publish(tag);
    return;
  }
  if (t.len > maxIo_) {
    Commit(tag, -EIO);
    return;
  }
  // Stage the write's data for JavaScript in this tag's own slot.
  if (zc_) {
    io_uring_sqe* sqe = Sqe();
    PrepRw(sqe, IORING_OP_WRITE_FIXED, memfd_, 0, t.len, uint64_t(tag) * maxIo_);
    sqe->buf_index = tag;
    io_uring_sqe_set_data64(sqe, Ud(tag, K_SLOWIN));
    inflight_++;
  } else {
    PrepCopy(tag, false, Stage(tag), t.len, K_SLOWIN);
  }
}

void Queue::Publish(uint16_t tag) {
  TagState& t = tags_[tag];
  t.jsOwned.store(true);
  bool wasEmpty;
  {
    std::lock_guard<std::mutex> lk(dev_->slowMu);
    wasEmpty = dev_->slow.empty();
    dev_->slow.push_back({qid_, tag, t.op, t.flags, t.off, t.len});
  }
  // One wake-up per batch: JS drains everything queued since.
  if (wasEmpty) dev_->Notify();
}

void Queue::OnEventfd() {
  if (efd_.load() >= 0) ArmEventfd();
  std::vector<Done> done;
  {
    std::lock_guard<std::mutex> lk(mu_);
    done.swap(done_);
  }
  for (const Done& d : done) {
    TagState& t = tags_[d.tag];
    if (!t.busy) continue;
    if (t.op == OP_READ && d.result >= 0) {
      // The staged bytes go into the request: copy out (USER_COPY) or
      // READ_FIXED from the staging memfd into the registered request buffer.
      if (zc_) {
        io_uring_sqe* sqe = Sqe();
        PrepRw(sqe, IORING_OP_READ_FIXED, memfd_, 0, t.len, uint64_t(d.tag) * maxIo_);
        sqe->buf_index = d.tag;
        io_uring_sqe_set_data64(sqe, Ud(d.tag, K_SLOWOUT));
        inflight_++;
      } else {
        PrepCopy(d.tag, true, Stage(d.tag), t.len, K_SLOWOUT);
      }
    } else {
      Commit(d.tag, d.result);
    }
  }
}

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
                        InstanceMethod<&UblkDevice::Drain>("drain"),
                        InstanceMethod<&UblkDevice::Complete>("complete"),
                        InstanceMethod<&UblkDevice::StopJs>("stop"),
                        InstanceMethod<&UblkDevice::DeleteJs>("delete"),
                        InstanceMethod<&UblkDevice::AbandonJs>("abandon"),
                        InstanceMethod<&UblkDevice::Stats>("stats")});
  }

  // new UblkDevice(target, { size, queues, depth, maxIo, transport, recovery, alwaysSlow, partScan }, onSlow)
  explicit UblkDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<UblkDevice>(info) {
    Napi::Env env = info.Env();
    dev_ = std::make_shared<Dev>();
    dev_->target = TargetFromJs(info[0]);
    if (auto* ft = FileTarget::From(dev_->target.get())) {
      if (!ft->slow()) dev_->fileFd = ft->fd();
    }
    if (!info[1].IsObject()) Throw(env, EINVAL, "options must be an object");
    Napi::Object o = info[1].As<Napi::Object>();
    Options& op = dev_->opt;
    op.size = OptUint(o, "size", dev_->target->size(), 512, 1ull << 53);
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
    op.alwaysSlow = OptBool(o, "alwaysSlow");
    op.partScan = OptBool(o, "partScan");
    op.external = OptBool(o, "external");
    Napi::Value ow = o.Get("owner");
    if (!ow.IsUndefined() && !ow.IsNull()) op.owner = int64_t(OptUint(o, "owner", 0, 0, 0xFFFFFFFFu));
    if (!info[2].IsFunction()) Throw(env, EINVAL, "onSlow must be a function");
    dev_->tsfn = Napi::ThreadSafeFunction::New(env, info[2].As<Napi::Function>(), "strata:ublk:slow", 0, 1);
    dev_->tsfn.Unref(env);
    dev_->tsfnLive = true;
  }

  ~UblkDevice() override {
    // A live device keeps serving even if its wrapper is collected (the JS
    // layer holds live devices); only a finished one releases its TSFN.
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
    static const char* kSteps[] = {"addDev", "setParams", "openCdev", "queuesReady", "startDev"};
    for (int i = 0; i < 5; i++) steps.Set(kSteps[i], Napi::Number::New(env, d.stepMs[i]));
    r.Set("createSteps", steps);
    return r;
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (dev_->state != State::New || started_) Throw(env, EBUSY, "device already started");
    started_ = true;
    dev_->tsfn.Ref(env);  // a device being served keeps the process alive
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
    dev_->tsfn.Ref(env);
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
    if (!dev_->opt.external) Throw(env, EINVAL, "startDev is for devices whose queues are served elsewhere (external: true)");
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

  // Slow requests queued since the last drain:
  // [{ queue, tag, op, flags, fua, offset, length, data? }] (data: WRITE only, a copy).
  Napi::Value Drain(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<SlowReq> batch;
    if (!dev_->tsfnLive.load()) return Napi::Array::New(env);
    {
      std::lock_guard<std::mutex> lk(dev_->slowMu);
      batch.swap(dev_->slow);
    }
    Napi::Array out = Napi::Array::New(env, batch.size());
    uint32_t i = 0;
    for (const SlowReq& s : batch) {
      Napi::Object r = Napi::Object::New(env);
      r.Set("queue", Napi::Number::New(env, s.q));
      r.Set("tag", Napi::Number::New(env, s.tag));
      r.Set("op", Napi::Number::New(env, s.op));
      r.Set("flags", Napi::Number::New(env, s.flags));
      r.Set("fua", Napi::Boolean::New(env, (s.flags & IO_F_FUA) != 0));
      r.Set("offset", Napi::Number::New(env, double(s.off)));
      r.Set("length", Napi::Number::New(env, s.len));
      if (s.op == OP_WRITE) {
        // A copy: the staging slot is reused by this tag's next request.
        Queue* q = dev_->queues.size() > s.q ? dev_->queues[s.q].get() : nullptr;
        if (q) r.Set("data", Napi::Buffer<uint8_t>::Copy(env, q->Stage(s.tag), s.len));
      }
      out.Set(i++, r);
    }
    return out;
  }

  // complete(queue, tag, result, data?) — result: bytes (READ/WRITE) or 0, or -errno.
  Napi::Value Complete(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t qid = OptArg(info, 0, "queue", 0xFFFF);
    uint64_t tag = OptArg(info, 1, "tag", 0xFFFF);
    if (!info[2].IsNumber()) Throw(env, EINVAL, "result must be a number");
    int64_t result = info[2].As<Napi::Number>().Int64Value();
    State st = dev_->state.load();
    // Added: START_DEV's own reads (partition scan) are served before it returns.
    if (st != State::Added && st != State::Live && st != State::Stopped) return Napi::Boolean::New(env, false);
    if (qid >= dev_->queues.size() || tag >= dev_->info.queue_depth) Throw(env, EINVAL, "no such queue/tag");
    Queue* q = dev_->queues[qid].get();
    TagState& t = q->Tag(uint16_t(tag));
    if (!t.jsOwned.load()) Throw(env, EINVAL, "request is not waiting for JavaScript (completed twice?)");
    if (result < 0) {
      if (result < -4095) result = -EIO;
    } else if (t.op == OP_READ || t.op == OP_WRITE) {
      if (t.op == OP_READ) {
        uint8_t* dst = q->Stage(uint16_t(tag));
        size_t n = 0;
        if (info.Length() > 3 && !info[3].IsUndefined() && !info[3].IsNull()) {
          if (!info[3].IsTypedArray()) Throw(env, EINVAL, "data must be a Buffer or Uint8Array");
          Napi::TypedArray ta = info[3].As<Napi::TypedArray>();
          n = ta.ByteLength();
          if (n > t.len) Throw(env, EINVAL, "data is longer than the request");
          uint8_t* src = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
          memcpy(dst, src, n);
        }
        if (n < t.len) memset(dst + n, 0, t.len - n);  // short data reads as zeros
      }
      result = t.len;  // the kernel re-issues the remainder of a short completion
    } else {
      result = 0;
    }
    t.jsOwned.store(false);
    q->PushDone(uint16_t(tag), int32_t(result));
    return Napi::Boolean::New(env, true);
  }

  uint64_t OptArg(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t max) {
    if (!info[i].IsNumber()) Throw(info.Env(), EINVAL, std::string(name) + " must be a number");
    double d = info[i].As<Napi::Number>().DoubleValue();
    if (!(d >= 0 && d <= double(max)) || d != double(uint64_t(d))) Throw(info.Env(), EINVAL, std::string("bad ") + name);
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

  // Drops the queue threads without STOP_DEV/DEL_DEV: a recovery-enabled
  // device goes QUIESCED for another process to recover (tests, handoff).
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

  void Finished(Napi::Env env) {
    // Deleted, or never got past ADD_DEV (a failed start): release the
    // slow-path callback so it no longer holds the event loop.
    State st = dev_->state.load();
    if ((st == State::Deleted || st == State::New) && dev_->tsfnLive.exchange(false)) {
      dev_->tsfn.Release();
      for (auto& q : dev_->queues) q->FreeStage();
      // The queue threads are gone: let go of the target now, not when this
      // object is garbage-collected (a FileTarget holds its file open).
      dev_->fileFd = -1;
      dev_->target.reset();
      self_.Reset();
    }
    (void)env;
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object r = Napi::Object::New(env);
    r.Set("fastIos", Napi::Number::New(env, double(dev_->fastIos.load())));
    r.Set("slowIos", Napi::Number::New(env, double(dev_->slowIos.load())));
    r.Set("waits", Napi::Number::New(env, double(dev_->waits.load())));
    r.Set("cqes", Napi::Number::New(env, double(dev_->cqes.load())));
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

// fileTarget(fd, size, alwaysSlow?, split?, zeroEvery?) -> { handle }:
// identity mapping onto a dup of fd (the caller may close its own fd).
// split/zeroEvery (tests): multi-segment plans with zero segments.
Napi::Value MakeFileTarget(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsNumber()) Throw(env, EINVAL, "fileTarget(fd, size[, alwaysSlow])");
  int fd = info[0].As<Napi::Number>().Int32Value();
  double size = info[1].As<Napi::Number>().DoubleValue();
  if (!(size >= 0) || size != double(uint64_t(size))) Throw(env, EINVAL, "size must be a non-negative integer");
  bool slow = info.Length() > 2 && info[2].ToBoolean().Value();
  uint32_t split = info.Length() > 3 && info[3].IsNumber() ? info[3].As<Napi::Number>().Uint32Value() : 0;
  uint32_t zeroEvery = info.Length() > 4 && info[4].IsNumber() ? info[4].As<Napi::Number>().Uint32Value() : 0;
  if (split % 512) Throw(env, EINVAL, "split must be a multiple of 512");
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (own < 0) Throw(env, errno, "dup target fd");
  auto t = std::make_shared<FileTarget>(own, uint64_t(size), slow);
  t->SetSplit(split, zeroEvery);
  Napi::Object o = Napi::Object::New(env);
  o.Set("handle", WrapTarget(env, t));
  return o;
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
  exports.Set("fileTarget", Napi::Function::New(env, MakeFileTarget, "fileTarget"));
  exports.Set("releaseTarget", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { ReleaseTargetJs(info[0]); },
                                                   "releaseTarget"));
}

}  // namespace strata
