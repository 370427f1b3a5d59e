// What kvm_addon.cc and uffd.cc share: typed system-call errors and SharedArrayBuffers over
// native memory.
#pragma once
#include <napi.h>

#include <string>

namespace stage2 {

/** An Error "WHAT: ENAME (strerror)" with .code, .errno and .syscall (= what). */
Napi::Error SysError(Napi::Env env, const std::string& what, int err);

/** A SharedArrayBuffer over [ptr, ptr+len); [ptr, ptr+mapLen) is unmapped with its last reference. */
Napi::Value SharedBufferOver(Napi::Env env, void* ptr, size_t len, size_t mapLen);

/** Adds the uffd* functions (uffd.cc) to the addon's exports. */
void RegisterUffd(Napi::Env env, Napi::Object exports);

}  // namespace stage2
