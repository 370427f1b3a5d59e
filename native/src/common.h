// What kvm_addon.cc and uffd.cc share: typed system-call errors and SharedArrayBuffers over
// native memory.
#pragma once
#include <napi.h>

#include <cstdint>
#include <string>

namespace stage2 {

/** An Error "WHAT: ENAME (strerror)" with .code, .errno and .syscall (= what). */
Napi::Error SysError(Napi::Env env, const std::string& what, int err);

/** A SharedArrayBuffer over [ptr, ptr+len); [ptr, ptr+mapLen) is unmapped with its last reference. */
Napi::Value SharedBufferOver(Napi::Env env, void* ptr, size_t len, size_t mapLen);

/** Throw SysError(what, err) into JavaScript; returns undefined for the caller to return. */
inline Napi::Value Throw(Napi::Env env, const std::string& what, int err) {
  SysError(env, what, err).ThrowAsJavaScriptException();
  return env.Undefined();
}

/** Throw a TypeError (a bad argument) into JavaScript; returns undefined. */
inline Napi::Value TypeErr(Napi::Env env, const std::string& msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

/** A JavaScript number or BigInt as a uint64 (addresses, offsets, lengths). */
inline uint64_t ToU64(const Napi::Value& v) {
  if (v.IsBigInt()) {
    bool lossless;
    return v.As<Napi::BigInt>().Uint64Value(&lossless);
  }
  return (uint64_t)v.As<Napi::Number>().DoubleValue();
}

/** Adds the uffd* functions (uffd.cc) to the addon's exports. */
void RegisterUffd(Napi::Env env, Napi::Object exports);

}  // namespace stage2
