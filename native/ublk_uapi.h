// ublk_uapi.h — the ublk UAPI subset strata uses, defined here from the
// upstream include/uapi/linux/ublk_cmd.h (see /work/shared/reference/ublk.md)
// because Debian 12's /usr/include/linux/ublk_cmd.h is from 6.1 and lacks
// GET_FEATURES, USER_COPY offsets, AUTO_BUF_REG, DEL_DEV_ASYNC, TRY_STOP_DEV.
// Everything is namespaced so it never clashes with the system header.
#pragma once

#include <cstddef>
#include <cstdint>

namespace strata::ublk {

// _IOC(dir, 'u', nr, size): dir READ=2, WRITE=1, both=3.
constexpr uint32_t Ioc(uint32_t dir, uint32_t nr, uint32_t size) {
  return (dir << 30) | (size << 16) | (uint32_t('u') << 8) | nr;
}
constexpr uint32_t IoR(uint32_t nr, uint32_t size) { return Ioc(2, nr, size); }
constexpr uint32_t IoWR(uint32_t nr, uint32_t size) { return Ioc(3, nr, size); }

// Control commands (/dev/ublk-control, 32-byte payload, SQE128 ring).
constexpr uint32_t kCmdGetDevInfo = IoR(0x02, 32);
constexpr uint32_t kCmdAddDev = IoWR(0x04, 32);
constexpr uint32_t kCmdDelDev = IoWR(0x05, 32);
constexpr uint32_t kCmdStartDev = IoWR(0x06, 32);
constexpr uint32_t kCmdStopDev = IoWR(0x07, 32);
constexpr uint32_t kCmdSetParams = IoWR(0x08, 32);
constexpr uint32_t kCmdStartUserRecovery = IoWR(0x10, 32);
constexpr uint32_t kCmdEndUserRecovery = IoWR(0x11, 32);
constexpr uint32_t kCmdGetFeatures = IoR(0x13, 32);
constexpr uint32_t kCmdDelDevAsync = IoR(0x14, 32);
constexpr uint32_t kCmdTryStopDev = IoWR(0x17, 32);
static_assert(kCmdAddDev == 0xC0207504u, "ADD_DEV encoding");
static_assert(kCmdGetFeatures == 0x80207513u, "GET_FEATURES encoding");
static_assert(kCmdDelDevAsync == 0x80207514u, "DEL_DEV_ASYNC encoding");
static_assert(kCmdTryStopDev == 0xC0207517u, "TRY_STOP_DEV encoding");

// IO commands (/dev/ublkcN, 16-byte payload).
constexpr uint32_t kIoFetchReq = IoWR(0x20, 16);
constexpr uint32_t kIoCommitAndFetchReq = IoWR(0x21, 16);
static_assert(kIoFetchReq == 0xC0107520u, "FETCH_REQ encoding");
static_assert(kIoCommitAndFetchReq == 0xC0107521u, "COMMIT_AND_FETCH_REQ encoding");

constexpr int kIoResOk = 0;
constexpr int kIoResNeedGetData = 1;
// UBLK_IO_RES_ABORT is -ENODEV: the device is going away, do not re-fetch.

// dev_info.flags (feature bits).
constexpr uint64_t F_SUPPORT_ZERO_COPY = 1ull << 0;
constexpr uint64_t F_URING_CMD_COMP_IN_TASK = 1ull << 1;
constexpr uint64_t F_NEED_GET_DATA = 1ull << 2;
constexpr uint64_t F_USER_RECOVERY = 1ull << 3;
constexpr uint64_t F_USER_RECOVERY_REISSUE = 1ull << 4;
constexpr uint64_t F_UNPRIVILEGED_DEV = 1ull << 5;
constexpr uint64_t F_CMD_IOCTL_ENCODE = 1ull << 6;
constexpr uint64_t F_USER_COPY = 1ull << 7;
constexpr uint64_t F_ZONED = 1ull << 8;
constexpr uint64_t F_USER_RECOVERY_FAIL_IO = 1ull << 9;
constexpr uint64_t F_UPDATE_SIZE = 1ull << 10;
constexpr uint64_t F_AUTO_BUF_REG = 1ull << 11;
constexpr uint64_t F_QUIESCE = 1ull << 12;
constexpr uint64_t F_PER_IO_DAEMON = 1ull << 13;
constexpr uint64_t F_BUF_REG_OFF_DAEMON = 1ull << 14;
constexpr uint64_t F_BATCH_IO = 1ull << 15;
constexpr uint64_t F_INTEGRITY = 1ull << 16;
constexpr uint64_t F_SAFE_STOP_DEV = 1ull << 17;
constexpr uint64_t F_NO_AUTO_PART_SCAN = 1ull << 18;
constexpr uint64_t F_SHMEM_ZC = 1ull << 19;

struct FeatureName {
  uint64_t bit;
  const char* name;
};
inline constexpr FeatureName kFeatureNames[] = {
    {F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"}, {F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"},
    {F_NEED_GET_DATA, "NEED_GET_DATA"},         {F_USER_RECOVERY, "USER_RECOVERY"},
    {F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"}, {F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"},
    {F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"},   {F_USER_COPY, "USER_COPY"},
    {F_ZONED, "ZONED"},                         {F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"},
    {F_UPDATE_SIZE, "UPDATE_SIZE"},             {F_AUTO_BUF_REG, "AUTO_BUF_REG"},
    {F_QUIESCE, "QUIESCE"},                     {F_PER_IO_DAEMON, "PER_IO_DAEMON"},
    {F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"}, {F_BATCH_IO, "BATCH_IO"},
    {F_INTEGRITY, "INTEGRITY"},                 {F_SAFE_STOP_DEV, "SAFE_STOP_DEV"},
    {F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"}, {F_SHMEM_ZC, "SHMEM_ZC"},
};

// Device states (dev_info.state).
constexpr uint16_t S_DEV_DEAD = 0, S_DEV_LIVE = 1, S_DEV_QUIESCED = 2, S_DEV_FAIL_IO = 3;

struct CtrlCmd {
  uint32_t dev_id;
  uint16_t queue_id;
  uint16_t len;
  uint64_t addr;
  uint64_t data[1];
  uint16_t dev_path_len;
  uint16_t pad;
  uint32_t reserved;
};
static_assert(sizeof(CtrlCmd) == 32, "ublksrv_ctrl_cmd");

struct DevInfo {
  uint16_t nr_hw_queues;
  uint16_t queue_depth;
  uint16_t state;
  uint16_t pad0;
  uint32_t max_io_buf_bytes;
  uint32_t dev_id;
  int32_t ublksrv_pid;
  uint32_t pad1;
  uint64_t flags;
  uint64_t ublksrv_flags;
  uint32_t owner_uid;
  uint32_t owner_gid;
  uint64_t reserved1;
  uint64_t reserved2;
};
static_assert(sizeof(DevInfo) == 64, "ublksrv_ctrl_dev_info");
static_assert(offsetof(DevInfo, flags) == 24, "dev_info.flags");

struct IoDesc {
  uint32_t op_flags;
  uint32_t nr_sectors;
  uint64_t start_sector;
  uint64_t addr;
};
static_assert(sizeof(IoDesc) == 24, "ublksrv_io_desc");

struct IoCmd {
  uint16_t q_id;
  uint16_t tag;
  int32_t result;
  uint64_t addr;
};
static_assert(sizeof(IoCmd) == 16, "ublksrv_io_cmd");

// AUTO_BUF_REG: packed into the FETCH/COMMIT SQE's own sqe->addr.
constexpr uint64_t AutoBufReg(uint16_t index, uint8_t flags) {
  return uint64_t(index) | (uint64_t(flags) << 16);
}

// Ops and op flags in IoDesc.op_flags.
constexpr uint8_t OP_READ = 0, OP_WRITE = 1, OP_FLUSH = 2, OP_DISCARD = 3, OP_WRITE_SAME = 4,
                  OP_WRITE_ZEROES = 5;
constexpr uint32_t IO_F_FUA = 1u << 13;
constexpr uint32_t IO_F_NOUNMAP = 1u << 15;
constexpr uint32_t IO_F_NEED_REG_BUF = 1u << 17;

struct ParamBasic {
  uint32_t attrs;
  uint8_t logical_bs_shift;
  uint8_t physical_bs_shift;
  uint8_t io_opt_shift;
  uint8_t io_min_shift;
  uint32_t max_sectors;
  uint32_t chunk_sectors;
  uint64_t dev_sectors;
  uint64_t virt_boundary_mask;
};
static_assert(sizeof(ParamBasic) == 32, "ublk_param_basic");
constexpr uint32_t ATTR_READ_ONLY = 1u << 0, ATTR_ROTATIONAL = 1u << 1, ATTR_VOLATILE_CACHE = 1u << 2,
                   ATTR_FUA = 1u << 3;

struct ParamDiscard {
  uint32_t discard_alignment;
  uint32_t discard_granularity;
  uint32_t max_discard_sectors;
  uint32_t max_write_zeroes_sectors;
  uint16_t max_discard_segments;
  uint16_t reserved0;
};
static_assert(sizeof(ParamDiscard) == 20, "ublk_param_discard");

struct ParamDevt {
  uint32_t char_major, char_minor, disk_major, disk_minor;
};
struct ParamZoned {
  uint32_t max_open_zones, max_active_zones, max_zone_append_sectors;
  uint8_t reserved[20];
};
struct ParamDmaAlign {
  uint32_t alignment;
  uint8_t pad[4];
};
struct ParamSegment {
  uint64_t seg_boundary_mask;
  uint32_t max_segment_size;
  uint16_t max_segments;
  uint8_t pad[2];
};

// Up to SEGMENT; params.len tells the kernel how much we pass (older
// kernels clamp it to what they know).
struct Params {
  uint32_t len;
  uint32_t types;
  ParamBasic basic;
  ParamDiscard discard;
  ParamDevt devt;
  ParamZoned zoned;
  ParamDmaAlign dma;
  ParamSegment seg;
};
static_assert(offsetof(Params, discard) == 40 && offsetof(Params, devt) == 60 &&
                  offsetof(Params, zoned) == 76 && offsetof(Params, dma) == 108 &&
                  offsetof(Params, seg) == 120 && sizeof(Params) == 136,
              "ublk_params layout");
constexpr uint32_t PARAM_BASIC = 1u << 0, PARAM_DISCARD = 1u << 1, PARAM_DEVT = 1u << 2,
                   PARAM_ZONED = 1u << 3, PARAM_DMA_ALIGN = 1u << 4, PARAM_SEGMENT = 1u << 5;

// Descriptor array mmap: UBLKSRV_CMD_BUF_OFFSET = 0, per-queue stride sized
// for UBLK_MAX_QUEUE_DEPTH descriptors.
constexpr uint32_t kMaxQueueDepth = 4096;
inline uint64_t DescMapOffset(uint16_t qid, size_t page) {
  uint64_t stride = (uint64_t(kMaxQueueDepth) * sizeof(IoDesc) + page - 1) / page * page;
  return qid * stride;
}

// USER_COPY: pread/pwrite position on /dev/ublkcN for (qid, tag).
constexpr uint64_t kUserCopyBase = 0x80000000ull;
constexpr int kIoBufBits = 25;  // 32 MiB per IO
constexpr int kTagBits = 16;
constexpr uint64_t UserCopyPos(uint16_t qid, uint16_t tag, uint64_t off = 0) {
  return kUserCopyBase + (uint64_t(qid) << (kIoBufBits + kTagBits)) + (uint64_t(tag) << kIoBufBits) + off;
}
static_assert(UserCopyPos(1, 0) == kUserCopyBase + (1ull << 41), "QID_OFF is 41");

}  // namespace strata::ublk
