// napi_util.h — argument and error helpers shared by the addon's modules.
#pragma once

#include <napi.h>

#include <errno.h>
#include <string.h>

#include <cstdint>
#include <string>

namespace strata {

// Every error raised here carries errno/code like Node's own fs errors.
[[noreturn]] inline void Fail(Napi::Env env, int err, const std::string& what) {
  Napi::Error e = Napi::Error::New(env, what + ": " + strerror(err));
  const char* name = strerrorname_np(err);
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  throw e;
}

struct Bytes {
  uint8_t* data = nullptr;
  size_t len = 0;
  napi_value arrayBuffer = nullptr;  // set only when backed by a detachable ArrayBuffer
};

inline Bytes GetBytes(Napi::Env env, Napi::Value v, const char* what) {
  Bytes b;
  void* data = nullptr;
  napi_value ab = nullptr;
  if (v.IsTypedArray()) {
    napi_typedarray_type type;
    size_t n;
    NAPI_THROW_IF_FAILED(env, napi_get_typedarray_info(env, v, &type, &n, &data, &ab, nullptr), b);
    b.len = v.As<Napi::TypedArray>().ByteLength();
  } else if (v.IsDataView()) {
    NAPI_THROW_IF_FAILED(env, napi_get_dataview_info(env, v, &b.len, &data, &ab, nullptr), b);
  } else if (v.IsArrayBuffer()) {
    ab = v;
    NAPI_THROW_IF_FAILED(env, napi_get_arraybuffer_info(env, v, &data, &b.len), b);
  } else if (v.IsObject()) {
    // Node-API (Node 20) cannot open a SharedArrayBuffer directly, but a
    // Uint8Array over it can; checking .buffer rejects array-likes, which
    // the constructor would copy instead of view.
    Napi::Function u8 = env.Global().Get("Uint8Array").As<Napi::Function>();
    Napi::Value view = u8.New({v});
    if (!view.As<Napi::Object>().Get("buffer").StrictEquals(v))
      Fail(env, EINVAL, std::string(what) + " must be a SharedArrayBuffer, ArrayBuffer or view");
    return GetBytes(env, view, what);
  } else {
    Fail(env, EINVAL, std::string(what) + " must be a SharedArrayBuffer, ArrayBuffer or view");
  }
  b.data = static_cast<uint8_t*>(data);
  bool isPlainAb = false;
  if (ab != nullptr) napi_is_arraybuffer(env, ab, &isPlainAb);  // false for SAB
  if (isPlainAb) b.arrayBuffer = ab;
  return b;
}

inline uint64_t ArgUint(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t max) {
  Napi::Env env = info.Env();
  if (!info[i].IsNumber()) Fail(env, EINVAL, std::string(name) + " must be a number");
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= static_cast<double>(max)) || d != static_cast<double>(static_cast<uint64_t>(d)))
    Fail(env, EINVAL, std::string(name) + " must be an integer in [0, " + std::to_string(max) + "]");
  return static_cast<uint64_t>(d);
}

}  // namespace strata
