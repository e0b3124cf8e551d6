// ublk.h — the ublk frontend (native/ublk.cc): control plane on
// /dev/ublk-control, one native thread per queue serving requests through a
// strata::Target, and the slow path into JavaScript.
#pragma once

#include <napi.h>

namespace strata {

/** Adds ublkFeatures, UblkDevice and fileTarget to the addon's exports. */
void InitUblk(Napi::Env env, Napi::Object exports);

}  // namespace strata
