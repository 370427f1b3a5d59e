// stage2_kvm: the kvm engine's native addon. A thin layer over system calls that JavaScript
// cannot make itself; ALL policy (which ioctls, in which order, struct layouts, vCPU run loops,
// dirty-ring harvesting, error handling) lives in TypeScript under src/kvm/.
//
// What it provides:
//   open/close                 open(2) a device (/dev/kvm) and close fds.
//   ioctl(fd, name, arg[, ok]) any ioctl in the table below by name; `arg` is an integer or a
//                              Uint8Array whose bytes are the struct (in and out). Errors throw
//                              "NAME: ENAME (strerror)" with .code/.errno/.syscall; errnos listed
//                              in `ok` are returned as -errno instead (KVM_RUN's EINTR).
//   dirtyLog(vmFd, clear, slot, firstPage, numPages, bitmap)
//                              KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG: these structs carry a
//                              pointer to the bitmap, which only native code may take.
//   mmapGuest(bytes, backing)  guest RAM: anonymous, anonymous_thp (2 MiB aligned +
//                              MADV_HUGEPAGE), hugetlb (MAP_HUGETLB, 2 MiB) or memfd (MAP_SHARED).
//                              Returns { hva, buffer } where buffer is a real SharedArrayBuffer
//                              aliasing the mapping (no copy; shareable with worker threads).
//   releaseGuest(hva, bytes)   drops the pages now (PROT_NONE over them); the address range is
//                              unmapped when the last SharedArrayBuffer reference is collected.
//   mmapFd(fd, pgoff, bytes)   MAP_SHARED of a vCPU fd (kvm_run, dirty ring) as a SharedArrayBuffer.
//   threadSelf()               pthread id of the calling thread (a vCPU worker), as a BigInt, with
//                              the kick signal unblocked in that thread.
//   kick(tid)                  pthread_kill(tid, KICK_SIGNAL): makes a blocked KVM_RUN return EINTR.
//   uffd*                      userfaultfd: see uffd.cc.
//
// SharedArrayBuffers are made with V8's API (napi's external ArrayBuffer is not shared and
// postMessage would copy it), which ties this file to the V8 of the Node it is built for.
//
// Concurrency: the functions keep no state except the process-wide kick signal handler, which
// is installed once at load. Any thread may call any function; the kernel serialises the rest.
#include <napi.h>
#include <v8.h>

#include "common.h"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <string>
#include <vector>

#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif
#ifndef KVM_SET_USER_MEMORY_REGION2
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, char[0x60])
#endif

// g++ sizes structs that end in a zero-length array differently from C (kvm_cpuid2 is 12 bytes
// in C++, 8 in C), and the size is part of the ioctl number: spell these out with C's sizes.
#define IOWR_N(nr, n) _IOC(_IOC_READ | _IOC_WRITE, KVMIO, nr, n)
#define IOW_N(nr, n) _IOC(_IOC_WRITE, KVMIO, nr, n)
#define IOR_N(nr, n) _IOC(_IOC_READ, KVMIO, nr, n)
const unsigned long kGetSupportedCpuid = IOWR_N(0x05, 8);
const unsigned long kGetMsrIndexList = IOWR_N(0x02, 4);
const unsigned long kSetCpuid2 = IOW_N(0x90, 8);
const unsigned long kGetCpuid2 = IOWR_N(0x91, 8);
const unsigned long kGetMsrs = IOWR_N(0x88, 8);
const unsigned long kSetMsrs = IOW_N(0x89, 8);
const unsigned long kGetXsave = IOR_N(0xa4, 4096);
const unsigned long kSetXsave = IOW_N(0xa5, 4096);
const unsigned long kGetXsave2 = IOR_N(0xcf, 4096);

namespace {

const int KICK_SIGNAL_OFFSET = 4;  // SIGRTMIN + 4: unused by Node, libuv and glibc.
int KickSignal() { return SIGRTMIN + KICK_SIGNAL_OFFSET; }

struct IoctlDef {
  const char* name;
  unsigned long request;
};

#define DEF(x) {#x, (unsigned long)(x)}
const IoctlDef kIoctls[] = {
    DEF(KVM_GET_API_VERSION), DEF(KVM_CHECK_EXTENSION), DEF(KVM_CREATE_VM),
    DEF(KVM_GET_VCPU_MMAP_SIZE), {"KVM_GET_SUPPORTED_CPUID", kGetSupportedCpuid}, {"KVM_GET_MSR_INDEX_LIST", kGetMsrIndexList},
    // VM
    DEF(KVM_CREATE_VCPU), DEF(KVM_ENABLE_CAP), DEF(KVM_SET_USER_MEMORY_REGION),
    DEF(KVM_SET_USER_MEMORY_REGION2), DEF(KVM_CREATE_IRQCHIP), DEF(KVM_SET_TSS_ADDR),
    DEF(KVM_SET_IDENTITY_MAP_ADDR), DEF(KVM_RESET_DIRTY_RINGS), DEF(KVM_GET_STATS_FD),
    DEF(KVM_GET_CLOCK), DEF(KVM_SET_CLOCK),
    // vCPU
    DEF(KVM_RUN), DEF(KVM_GET_REGS), DEF(KVM_SET_REGS), DEF(KVM_GET_SREGS), DEF(KVM_SET_SREGS),
    DEF(KVM_GET_FPU), DEF(KVM_SET_FPU), DEF(KVM_GET_XCRS), DEF(KVM_SET_XCRS),
    {"KVM_GET_XSAVE", kGetXsave}, {"KVM_GET_XSAVE2", kGetXsave2}, {"KVM_SET_XSAVE", kSetXsave}, {"KVM_GET_MSRS", kGetMsrs},
    {"KVM_SET_MSRS", kSetMsrs}, DEF(KVM_GET_LAPIC), DEF(KVM_SET_LAPIC), DEF(KVM_GET_VCPU_EVENTS),
    DEF(KVM_SET_VCPU_EVENTS), DEF(KVM_GET_MP_STATE), DEF(KVM_SET_MP_STATE), {"KVM_SET_CPUID2", kSetCpuid2},
    {"KVM_GET_CPUID2", kGetCpuid2}, DEF(KVM_GET_DEBUGREGS), DEF(KVM_SET_DEBUGREGS), DEF(KVM_SET_TSC_KHZ),
    DEF(KVM_GET_TSC_KHZ),
};
#undef DEF

}  // namespace

// Shared with uffd.cc (common.h).
namespace stage2 {

Napi::Error SysError(Napi::Env env, const std::string& what, int err) {
  const char* ename = strerrordesc_np(err) ? strerrorname_np(err) : nullptr;
  std::string code = ename ? ename : ("E" + std::to_string(err));
  std::string msg = what + ": " + code + " (" + strerror(err) + ")";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("syscall", Napi::String::New(env, what));
  return e;
}

}  // namespace stage2

namespace {
using stage2::SysError;
using stage2::Throw;
using stage2::ToU64;
using stage2::TypeErr;

}  // namespace

namespace stage2 {

// napi_value and v8::Local<v8::Value> are the same pointer-sized handle (as in Node's
// v8impl::JsValueFromV8LocalValue); this is the one place that relies on it.
napi_value FromV8(v8::Local<v8::Value> local) {
  napi_value v;
  static_assert(sizeof(v) == sizeof(local), "napi_value must be a v8 handle");
  memcpy(&v, &local, sizeof(local));
  return v;
}

void UnmapDeleter(void* data, size_t length, void* deleter_data) {
  munmap(data, (size_t)(uintptr_t)deleter_data);
}

// A SharedArrayBuffer over [ptr, ptr+len); the mapping [ptr, ptr+mapLen) is unmapped when the
// last reference (in any isolate) goes away.
Napi::Value SharedBufferOver(Napi::Env env, void* ptr, size_t len, size_t mapLen) {
  v8::Isolate* isolate = v8::Isolate::GetCurrent();
  std::unique_ptr<v8::BackingStore> store =
      v8::SharedArrayBuffer::NewBackingStore(ptr, len, UnmapDeleter, (void*)(uintptr_t)mapLen);
  v8::Local<v8::SharedArrayBuffer> sab =
      v8::SharedArrayBuffer::New(isolate, std::shared_ptr<v8::BackingStore>(std::move(store)));
  return Napi::Value(env, FromV8(sab));
}

}  // namespace stage2

namespace {
using stage2::SharedBufferOver;

Napi::Value Open(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>();
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return Throw(info.Env(), "open " + path, errno);
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  close(info[0].As<Napi::Number>().Int32Value());
  return info.Env().Undefined();
}

Napi::Value Ioctl(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  std::string name = info[1].As<Napi::String>();
  const IoctlDef* def = nullptr;
  for (const IoctlDef& d : kIoctls)
    if (name == d.name) def = &d;
  if (!def) return TypeErr(env, "ioctl: unknown request " + name);
  int ret;
  if (info[2].IsTypedArray()) {
    Napi::TypedArray ta = info[2].As<Napi::TypedArray>();
    size_t need = _IOC_SIZE(def->request);
    if (ta.ByteLength() < need)
      return TypeErr(env, name + ": buffer of " + std::to_string(ta.ByteLength()) + " bytes, needs " +
                              std::to_string(need));
    uint8_t* p = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    ret = ioctl(fd, def->request, p);
  } else {
    ret = ioctl(fd, def->request, (unsigned long)ToU64(info[2]));
  }
  if (ret < 0) {
    int err = errno;
    if (info.Length() > 3 && info[3].IsArray()) {
      Napi::Array ok = info[3].As<Napi::Array>();
      for (uint32_t i = 0; i < ok.Length(); i++)
        if (ok.Get(i).As<Napi::Number>().Int32Value() == err) return Napi::Number::New(env, -err);
    }
    return Throw(env, name, err);
  }
  return Napi::Number::New(env, ret);
}

Napi::Value DirtyLog(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  bool clear = info[1].As<Napi::Boolean>();
  uint32_t slot = info[2].As<Napi::Number>().Uint32Value();
  uint64_t first = ToU64(info[3]);
  uint32_t num = info[4].As<Napi::Number>().Uint32Value();
  Napi::TypedArray ta = info[5].As<Napi::TypedArray>();
  void* bitmap = static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  // KVM writes/reads whole longs: num pages rounded up to 64 bits.
  if (ta.ByteLength() < ((size_t)num + 63) / 64 * 8) return TypeErr(env, "dirtyLog: bitmap too small");
  int ret;
  if (clear) {
    struct kvm_clear_dirty_log log = {};
    log.slot = slot;
    log.num_pages = num;
    log.first_page = first;
    log.dirty_bitmap = bitmap;
    ret = ioctl(fd, KVM_CLEAR_DIRTY_LOG, &log);
  } else {
    struct kvm_dirty_log log = {};
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    ret = ioctl(fd, KVM_GET_DIRTY_LOG, &log);
  }
  if (ret < 0) return Throw(env, clear ? "KVM_CLEAR_DIRTY_LOG" : "KVM_GET_DIRTY_LOG", errno);
  return env.Undefined();
}

const size_t kHuge = 2u << 20;

Napi::Value MmapGuest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t bytes = (size_t)info[0].As<Napi::Number>().Int64Value();
  std::string backing = info[1].As<Napi::String>();
  void* p = MAP_FAILED;
  size_t mapLen = bytes;
  if (backing == "anonymous" || backing == "anonymous_thp") {
    // Reserve one extra huge page so the guest memory can start 2 MiB aligned (THP needs it).
    size_t reserve = bytes + kHuge;
    uint8_t* r = (uint8_t*)mmap(nullptr, reserve, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) return Throw(env, "mmap " + backing, errno);
    uint8_t* a = (uint8_t*)(((uintptr_t)r + kHuge - 1) & ~(uintptr_t)(kHuge - 1));
    if (a > r) munmap(r, a - r);
    size_t tail = (r + reserve) - (a + bytes);
    if (tail) munmap(a + bytes, tail);
    p = a;
    int advice = backing == "anonymous_thp" ? MADV_HUGEPAGE : MADV_NOHUGEPAGE;
    if (madvise(p, bytes, advice) < 0) {
      int err = errno;
      munmap(p, bytes);
      return Throw(env, "madvise " + backing, err);
    }
  } else if (backing == "hugetlb") {
    if (bytes % kHuge) return TypeErr(env, "mmapGuest: hugetlb size must be a multiple of 2 MiB");
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB, -1, 0);
    if (p == MAP_FAILED) return Throw(env, "mmap hugetlb", errno);
  } else if (backing == "memfd") {
    int fd = memfd_create("stage2-guest", MFD_CLOEXEC);
    if (fd < 0) return Throw(env, "memfd_create", errno);
    if (ftruncate(fd, (off_t)bytes) < 0) {
      int err = errno;
      close(fd);
      return Throw(env, "ftruncate memfd", err);
    }
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) return Throw(env, "mmap memfd", err);
  } else {
    return TypeErr(env, "mmapGuest: unknown backing " + backing);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("hva", Napi::Number::New(env, (double)(uintptr_t)p));
  out.Set("buffer", SharedBufferOver(env, p, bytes, mapLen));
  return out;
}

Napi::Value ReleaseGuest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  void* p = (void*)(uintptr_t)info[0].As<Napi::Number>().Int64Value();
  size_t bytes = (size_t)info[1].As<Napi::Number>().Int64Value();
  // Keep the range reserved (a stale view faults instead of aliasing a later mapping) but
  // give the memory back now rather than at garbage collection.
  if (mmap(p, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0) ==
      MAP_FAILED)
    return Throw(env, "mmap PROT_NONE", errno);
  return env.Undefined();
}

Napi::Value MmapFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  off_t pgoff = (off_t)info[1].As<Napi::Number>().Int64Value();
  size_t bytes = (size_t)info[2].As<Napi::Number>().Int64Value();
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, pgoff * getpagesize());
  if (p == MAP_FAILED) return Throw(env, "mmap vcpu fd", errno);
  return SharedBufferOver(env, p, bytes, bytes);
}

void KickHandler(int) {}

Napi::Value ThreadSelf(const Napi::CallbackInfo& info) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, KickSignal());
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  return Napi::BigInt::New(info.Env(), (uint64_t)pthread_self());
}

Napi::Value Kick(const Napi::CallbackInfo& info) {
  bool lossless;
  pthread_t tid = (pthread_t)info[0].As<Napi::BigInt>().Uint64Value(&lossless);
  int err = pthread_kill(tid, KickSignal());
  if (err) return Throw(info.Env(), "pthread_kill", err);
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  static bool installed = false;
  if (!installed) {
    struct sigaction sa = {};
    sa.sa_handler = KickHandler;  // no SA_RESTART: KVM_RUN must return EINTR
    sigemptyset(&sa.sa_mask);
    sigaction(KickSignal(), &sa, nullptr);
    installed = true;
  }
  exports.Set("open", Napi::Function::New(env, Open));
  exports.Set("close", Napi::Function::New(env, Close));
  exports.Set("ioctl", Napi::Function::New(env, Ioctl));
  exports.Set("dirtyLog", Napi::Function::New(env, DirtyLog));
  exports.Set("mmapGuest", Napi::Function::New(env, MmapGuest));
  exports.Set("releaseGuest", Napi::Function::New(env, ReleaseGuest));
  exports.Set("mmapFd", Napi::Function::New(env, MmapFd));
  exports.Set("threadSelf", Napi::Function::New(env, ThreadSelf));
  exports.Set("kick", Napi::Function::New(env, Kick));
  exports.Set("kickSignal", Napi::Number::New(env, KickSignal()));
  stage2::RegisterUffd(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(stage2_kvm, Init)
