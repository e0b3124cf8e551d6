// target.h — the contract between native frontends (NBD transmission
// threads, ublk queue threads) and whatever serves the blocks.
//
// A frontend asks the target to *plan* a request on its own thread. A plan is
// a list of segments saying where the request's bytes live (a file range, or
// zeros for reads); the frontend performs the I/O itself — pread/pwrite, or
// io_uring READ_FIXED/WRITE_FIXED straight into a ublk request buffer — and
// then calls finish() exactly once. When a target cannot plan a request
// (cold data to fetch, a partial-block copy-on-write, a snapshot switching
// overlays, FUA, ...) plan() returns false and the frontend hands the
// request to JavaScript (the slow path), which answers it later.
#pragma once

#include <cstdint>

namespace strata {

/** Where `len` bytes of a request live. fd < 0: zeros (reads only). */
struct Seg {
  int32_t fd;
  uint32_t len;
  uint64_t off;
};

constexpr int kMaxSegs = 64;

enum class TOp : uint8_t { Read = 0, Write = 1 };

struct Plan {
  TOp op = TOp::Read;
  uint32_t nseg = 0;
  Seg seg[kMaxSegs];
  // Target-private data carried from plan() to finish().
  uint64_t a = 0, b = 0, t0 = 0;
  // Set by the frontend before finish(): a synchronous (FUA) write. Its
  // failure may stand for earlier writes whose writeback was lost.
  bool sync = false;
};

class Target {
 public:
  virtual ~Target() = default;
  /** Device size in bytes. */
  virtual uint64_t size() const = 0;
  /**
   * Plans [off, off+len). On true, the segments cover the request in order
   * (their lengths sum to len) and the frontend must call finish(). On false
   * nothing is held and the request goes the slow path.
   */
  virtual bool plan(TOp op, uint64_t off, uint32_t len, Plan& p) = 0;
  /** Called once per successful plan, after the I/O (ok = it all succeeded). */
  virtual void finish(const Plan& p, bool ok) = 0;
};

}  // namespace strata
