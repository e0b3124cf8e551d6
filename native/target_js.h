// target_js.h — how a Target crosses the JS boundary. A JS target object
// (DeviceTarget, FileTarget, ...) carries its native target in a `handle`
// property: an External owning a std::shared_ptr<Target>. Frontends copy the
// shared_ptr, so a target outlives every thread still serving it.
#pragma once

#include <napi.h>

#include <memory>

#include "target.h"

namespace strata {

using TargetRef = std::shared_ptr<Target>;

inline Napi::External<TargetRef> WrapTarget(Napi::Env env, TargetRef t) {
  return Napi::External<TargetRef>::New(env, new TargetRef(std::move(t)),
                                        [](Napi::Env, TargetRef* p) { delete p; });
}

/** The target held by a JS target object; throws a TypeError otherwise. */
inline TargetRef TargetFromJs(Napi::Value v) {
  Napi::Env env = v.Env();
  if (v.IsObject()) {
    Napi::Value h = v.As<Napi::Object>().Get("handle");
    if (h.IsExternal()) {
      TargetRef t = *h.As<Napi::External<TargetRef>>().Data();
      if (!t) throw Napi::Error::New(env, "the native block target is closed");
      return t;
    }
  }
  throw Napi::TypeError::New(env, "expected a native block target (an object with a `handle`)");
}

/**
 * Drops the JS object's share of its target now rather than at garbage
 * collection: the target (and what it holds open) goes when the last
 * frontend still serving it lets go.
 */
inline void ReleaseTargetJs(Napi::Value handle) {
  if (handle.IsExternal()) handle.As<Napi::External<TargetRef>>().Data()->reset();
}

}  // namespace strata
