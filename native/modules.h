// modules.h — the addon's parts, each registering its exports.
#pragma once

#include <napi.h>

namespace strata {
void InitDeviceTarget(Napi::Env env, Napi::Object exports);
}  // namespace strata
