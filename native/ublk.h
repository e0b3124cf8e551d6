// ublk.h — the ublk frontend's control plane (native/ublk.cc): devices on
// /dev/ublk-control, request descriptor mappings and the UAPI values the
// I/O workers' rings use to serve the queues.
#pragma once

#include <napi.h>

namespace strata {

/** Adds ublkFeatures, UblkDevice, ublkDeviceInfo, ublkRemove, ublkIoDescs and ublkUapi to the addon's exports. */
void InitUblk(Napi::Env env, Napi::Object exports);

}  // namespace strata
