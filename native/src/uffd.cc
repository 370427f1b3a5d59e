// userfaultfd for the addon: each function below is one system call (or a short fixed sequence
// of them), plus one mechanism JavaScript cannot have, native reader threads. Which memory is
// registered, which page goes where, who is told what: all policy is in src/uffd/ and src/kvm/.
//
//   uffdOpen(nonBlocking)        userfaultfd(2), or /dev/userfaultfd + USERFAULTFD_IOC_NEW where
//                                the syscall is refused -> { fd, via }. Never UFFD_USER_MODE_ONLY:
//                                KVM touches guest memory from the kernel (get_user_pages).
//   uffdApi(fd, features)        UFFDIO_API -> { features, ioctls } (BigInts).
//   uffdRegister(fd, a, n, mode) UFFDIO_REGISTER (mode bits MISSING 1, WP 2, MINOR 4) -> ioctls.
//   uffdUnregister(fd, a, n)     UFFDIO_UNREGISTER.
//   uffdCopy(fd, dst, src, n, dontWake, ok?)   UFFDIO_COPY    } -> bytes resolved, or -errno for
//   uffdZeropage(fd, dst, n, dontWake, ok?)    UFFDIO_ZEROPAGE} errnos in `ok` (EEXIST: the page
//   uffdContinue(fd, dst, n, dontWake, ok?)    UFFDIO_CONTINUE} is there already). EAGAIN retried.
//   uffdWake(fd, a, n)           UFFDIO_WAKE.
//   uffdRead(fd, max, timeoutMs) poll + read on the calling thread -> [{ event, flags, address,
//                                ptid }] (empty on timeout). For a worker thread that reads events.
//   addressOf(typedArray)        the address of a typed array's first byte (a COPY source).
//   memfdMap(bytes, hugetlb)     memfd (MFD_HUGETLB if asked) mapped twice MAP_SHARED -> { fd, hva,
//                                buffer, aliasHva, alias }: register hva for MINOR, write via alias.
//   madvise(a, n, advice)        'dontneed' | 'remove' | 'populate_write'.
//   mincore(a, n)                Uint8Array, 1 per resident page.
//   remapShared(a, n)            private anonymous memory -> memfd MAP_SHARED in place (MINOR).
//   uffdHandlerStart(o) / uffdHandlerStop(id) / uffdHandlerWaits(id)   native reader threads, below.
//
// Native reader threads (uffdHandlerStart): `readers` pthreads per uffd poll it and read fault
// events. In mode 'copy' each resolves its event itself: sleep delayUs (demand_paging_test -d),
// UFFDIO_COPY from src (ranges map registered addresses to source addresses); 'continue' copies
// the source page into the alias mapping, then UFFDIO_CONTINUE; 'notify' hands the event to a JS
// function on the thread that started the handler (napi thread-safe function) and resolves
// nothing. EEXIST (another reader or path installed the page) is followed by UFFDIO_WAKE, so no
// waiter is left behind. The first failure is kept as { op, errno } and returned by Stop.
//
// Concurrency: a handler's readers share its fd (opened O_NONBLOCK, so a reader that loses the
// read race gets EAGAIN and polls again: each event is read by exactly one reader), its
// read-only ranges, atomic counters, and the waits log under its mutex. The kernel orders COPY
// against the fault: the page is installed once (the second COPY gets EEXIST) and every thread
// queued on the range is woken. Readers never touch registered memory themselves (only src and
// alias), so a reader can never block on a fault it would have to resolve. Stop writes the
// handler's eventfd (every reader polls it), joins the readers, then releases the JS function.
// The registry of handlers is used from the JS thread only.
#include "common.h"

#include <v8.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif

namespace stage2 {
namespace {

uint64_t NowNs() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

bool Tolerated(const Napi::CallbackInfo& info, size_t at, int err) {
  if (info.Length() <= at || !info[at].IsArray()) return false;
  Napi::Array ok = info[at].As<Napi::Array>();
  for (uint32_t i = 0; i < ok.Length(); i++)
    if (ok.Get(i).As<Napi::Number>().Int32Value() == err) return true;
  return false;
}

Napi::Value Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int flags = O_CLOEXEC | (info.Length() > 0 && info[0].ToBoolean() ? O_NONBLOCK : 0);
  std::string via = "syscall";
  int fd = (int)syscall(SYS_userfaultfd, flags);
  if (fd < 0) {
    int sysErr = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return Throw(env, "userfaultfd (syscall " + std::string(strerrorname_np(sysErr) ?: "?") + ", then open /dev/userfaultfd)", errno);
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    if (fd < 0) return Throw(env, "USERFAULTFD_IOC_NEW", err);
    via = "/dev/userfaultfd";
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("fd", Napi::Number::New(env, fd));
  out.Set("via", Napi::String::New(env, via));
  return out;
}

Napi::Value Api(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = ToU64(info[1]);
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_API, &api) < 0) return Throw(env, "UFFDIO_API", errno);
  Napi::Object out = Napi::Object::New(env);
  out.Set("features", Napi::BigInt::New(env, (uint64_t)api.features));
  out.Set("ioctls", Napi::BigInt::New(env, (uint64_t)api.ioctls));
  return out;
}

Napi::Value Register(const Napi::CallbackInfo& info) {
  struct uffdio_register reg = {};
  reg.range.start = ToU64(info[1]);
  reg.range.len = ToU64(info[2]);
  reg.mode = ToU64(info[3]);
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), UFFDIO_REGISTER, &reg) < 0) return Throw(info.Env(), "UFFDIO_REGISTER", errno);
  return Napi::BigInt::New(info.Env(), (uint64_t)reg.ioctls);
}

Napi::Value RangeOp(const Napi::CallbackInfo& info, unsigned long req, const char* name) {
  struct uffdio_range r = {ToU64(info[1]), ToU64(info[2])};
  if (ioctl(info[0].As<Napi::Number>().Int32Value(), req, &r) < 0) return Throw(info.Env(), name, errno);
  return info.Env().Undefined();
}

Napi::Value Unregister(const Napi::CallbackInfo& info) { return RangeOp(info, UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER"); }
Napi::Value Wake(const Napi::CallbackInfo& info) { return RangeOp(info, UFFDIO_WAKE, "UFFDIO_WAKE"); }

// The three resolving ioctls, retried on EAGAIN (the mm was changing; the kernel asks to retry).
// Returns the bytes resolved (>= 0) or -errno.
int64_t DoCopy(int fd, uint64_t dst, uint64_t src, uint64_t len, bool dontWake) {
  for (;;) {
    struct uffdio_copy c = {dst, src, len, dontWake ? UFFDIO_COPY_MODE_DONTWAKE : 0, 0};
    if (ioctl(fd, UFFDIO_COPY, &c) == 0) return c.copy;
    if (errno != EAGAIN) return -errno;
    if (c.copy > 0) dst += c.copy, src += c.copy, len -= c.copy;
  }
}

int64_t DoZeropage(int fd, uint64_t dst, uint64_t len, bool dontWake) {
  for (;;) {
    struct uffdio_zeropage z = {{dst, len}, dontWake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0, 0};
    if (ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0) return z.zeropage;
    if (errno != EAGAIN) return -errno;
    if (z.zeropage > 0) dst += z.zeropage, len -= z.zeropage;
  }
}

int64_t DoContinue(int fd, uint64_t dst, uint64_t len, bool dontWake) {
  for (;;) {
    struct uffdio_continue c = {{dst, len}, dontWake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0, 0};
    if (ioctl(fd, UFFDIO_CONTINUE, &c) == 0) return c.mapped;
    if (errno != EAGAIN) return -errno;
    if (c.mapped > 0) dst += c.mapped, len -= c.mapped;
  }
}

Napi::Value Resolved(const Napi::CallbackInfo& info, int64_t r, size_t okAt, const char* name) {
  if (r < 0 && !Tolerated(info, okAt, (int)-r)) return Throw(info.Env(), name, (int)-r);
  return Napi::Number::New(info.Env(), (double)r);
}

Napi::Value Copy(const Napi::CallbackInfo& info) {
  int64_t r = DoCopy(info[0].As<Napi::Number>().Int32Value(), ToU64(info[1]), ToU64(info[2]), ToU64(info[3]), info[4].ToBoolean());
  return Resolved(info, r, 5, "UFFDIO_COPY");
}

Napi::Value Zeropage(const Napi::CallbackInfo& info) {
  int64_t r = DoZeropage(info[0].As<Napi::Number>().Int32Value(), ToU64(info[1]), ToU64(info[2]), info[3].ToBoolean());
  return Resolved(info, r, 4, "UFFDIO_ZEROPAGE");
}

Napi::Value Continue(const Napi::CallbackInfo& info) {
  int64_t r = DoContinue(info[0].As<Napi::Number>().Int32Value(), ToU64(info[1]), ToU64(info[2]), info[3].ToBoolean());
  return Resolved(info, r, 4, "UFFDIO_CONTINUE");
}

Napi::Object EventObject(Napi::Env env, const struct uffd_msg& m) {
  Napi::Object e = Napi::Object::New(env);
  e.Set("event", Napi::Number::New(env, m.event));
  if (m.event == UFFD_EVENT_PAGEFAULT) {
    e.Set("flags", Napi::Number::New(env, (double)m.arg.pagefault.flags));
    e.Set("address", Napi::Number::New(env, (double)m.arg.pagefault.address));
    e.Set("ptid", Napi::Number::New(env, m.arg.pagefault.feat.ptid));
  }
  return e;
}

Napi::Value Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint32_t max = info[1].As<Napi::Number>().Uint32Value();
  int timeout = info[2].As<Napi::Number>().Int32Value();
  Napi::Array out = Napi::Array::New(env);
  struct pollfd p = {fd, POLLIN, 0};
  int n = poll(&p, 1, timeout);
  if (n < 0 && errno != EINTR) return Throw(env, "poll userfaultfd", errno);
  if (n <= 0) return out;
  std::vector<struct uffd_msg> msgs(max ? max : 1);
  ssize_t got = read(fd, msgs.data(), msgs.size() * sizeof(struct uffd_msg));
  if (got < 0) {
    if (errno == EAGAIN || errno == EINTR) return out;
    return Throw(env, "read userfaultfd", errno);
  }
  for (size_t i = 0; i < (size_t)got / sizeof(struct uffd_msg); i++) out.Set((uint32_t)i, EventObject(env, msgs[i]));
  return out;
}

// napi cannot give the data of a view over a SharedArrayBuffer (napi_invalid_arg): ask V8. A
// napi_value is a v8::Local handle (the same reliance as kvm_addon.cc's FromV8).
Napi::Value AddressOf(const Napi::CallbackInfo& info) {
  napi_value raw = info[0];
  v8::Local<v8::Value> v;
  static_assert(sizeof(raw) == sizeof(v), "napi_value must be a v8 handle");
  memcpy(static_cast<void*>(&v), &raw, sizeof(raw));
  if (!v->IsArrayBufferView()) return TypeErr(info.Env(), "addressOf: a typed array or DataView is required");
  v8::Local<v8::ArrayBufferView> view = v.As<v8::ArrayBufferView>();
  uint8_t* base = static_cast<uint8_t*>(view->Buffer()->GetBackingStore()->Data());
  return Napi::Number::New(info.Env(), (double)(uintptr_t)(base + view->ByteOffset()));
}

Napi::Value MemfdMap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t bytes = (size_t)ToU64(info[0]);
  bool huge = info.Length() > 1 && info[1].ToBoolean();
  int fd = memfd_create("stage2-uffd", MFD_CLOEXEC | (huge ? MFD_HUGETLB : 0));
  if (fd < 0) return Throw(env, "memfd_create", errno);
  if (ftruncate(fd, (off_t)bytes) < 0) {
    int err = errno;
    close(fd);
    return Throw(env, "ftruncate memfd", err);
  }
  void* a = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (a == MAP_FAILED) {
    int err = errno;
    close(fd);
    return Throw(env, "mmap memfd", err);
  }
  void* b = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (b == MAP_FAILED) {
    int err = errno;
    munmap(a, bytes);
    close(fd);
    return Throw(env, "mmap memfd alias", err);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("fd", Napi::Number::New(env, fd));
  out.Set("hva", Napi::Number::New(env, (double)(uintptr_t)a));
  out.Set("buffer", SharedBufferOver(env, a, bytes, bytes));
  out.Set("aliasHva", Napi::Number::New(env, (double)(uintptr_t)b));
  out.Set("alias", SharedBufferOver(env, b, bytes, bytes));
  return out;
}

Napi::Value Madvise(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  void* p = (void*)(uintptr_t)ToU64(info[0]);
  size_t n = (size_t)ToU64(info[1]);
  std::string what = info[2].As<Napi::String>();
  int advice = what == "dontneed" ? MADV_DONTNEED : what == "remove" ? MADV_REMOVE : what == "populate_write" ? MADV_POPULATE_WRITE : -1;
  if (advice < 0) return TypeErr(env, "madvise: unknown advice " + what);
  if (madvise(p, n, advice) < 0) return Throw(env, "madvise " + what, errno);
  return env.Undefined();
}

Napi::Value Mincore(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  void* p = (void*)(uintptr_t)ToU64(info[0]);
  size_t n = (size_t)ToU64(info[1]);
  size_t pages = (n + 4095) / 4096;
  Napi::Uint8Array out = Napi::Uint8Array::New(env, pages);
  if (mincore(p, n, out.Data()) < 0) return Throw(env, "mincore", errno);
  for (size_t i = 0; i < pages; i++) out[i] &= 1;
  return out;
}

// Replace private anonymous memory [hva, hva+bytes) by a memfd mapped MAP_SHARED at the same
// address (MAP_FIXED), for MINOR faults on memory that was mapped anonymous. Every page of the
// file is allocated (in the page cache, so a touch through hva is a MINOR fault); pages that were
// resident keep their contents (copied through the alias first) and are mapped again at once
// (MADV_POPULATE_WRITE) so they do not fault. Nothing may touch the range meanwhile (the caller's
// vCPUs have not run). -> { aliasHva, alias, resident }: the second mapping and mincore's view.
Napi::Value RemapShared(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t* p = (uint8_t*)(uintptr_t)ToU64(info[0]);
  size_t bytes = (size_t)ToU64(info[1]);
  size_t pages = bytes / 4096;
  Napi::Uint8Array resident = Napi::Uint8Array::New(env, pages);
  if (mincore(p, bytes, resident.Data()) < 0) return Throw(env, "mincore", errno);
  int fd = memfd_create("stage2-guest-shared", MFD_CLOEXEC);
  if (fd < 0) return Throw(env, "memfd_create", errno);
  if (fallocate(fd, 0, 0, (off_t)bytes) < 0) {
    int err = errno;
    close(fd);
    return Throw(env, "fallocate memfd", err);
  }
  uint8_t* alias = (uint8_t*)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (alias == MAP_FAILED) {
    int err = errno;
    close(fd);
    return Throw(env, "mmap memfd alias", err);
  }
  for (size_t i = 0; i < pages; i++) {
    resident[i] &= 1;
    if (resident[i]) memcpy(alias + i * 4096, p + i * 4096, 4096);
  }
  void* q = mmap(p, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
  int err = errno;
  close(fd);
  if (q == MAP_FAILED) {
    munmap(alias, bytes);
    return Throw(env, "mmap MAP_FIXED memfd", err);
  }
  for (size_t i = 0; i < pages;) {
    if (!resident[i]) {
      i++;
      continue;
    }
    size_t j = i;
    while (j < pages && resident[j]) j++;
    if (madvise(p + i * 4096, (j - i) * 4096, MADV_POPULATE_WRITE) < 0) return Throw(env, "madvise populate_write", errno);
    i = j;
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("aliasHva", Napi::Number::New(env, (double)(uintptr_t)alias));
  out.Set("alias", SharedBufferOver(env, alias, bytes, bytes));
  out.Set("resident", resident);
  return out;
}

// ---- native reader threads ----

enum class Mode { Copy, Continue, Notify };

struct Range {
  uint64_t dst, len, src, alias;
};

struct Event {
  uint64_t address, t0;
  uint32_t ptid, flags;
};

struct Handler;

struct Reader {
  Handler* h;
  pthread_t thread;
};

struct Handler {
  int fd = -1;
  int stopFd = -1;
  Mode mode = Mode::Copy;
  std::vector<Range> ranges;
  uint64_t pageSize = 4096;
  uint64_t delayUs = 0;
  std::vector<Reader> readers;
  std::atomic<uint64_t> events{0}, resolved{0}, exists{0}, errors{0};
  std::mutex mu;  // guards the fields below
  std::vector<double> waits;  // triples (ptid, ns from event read to the resolving ioctl, page address)
  std::string errOp;
  int errNo = 0;
  Napi::ThreadSafeFunction notify;
  bool hasNotify = false;

  void Fail(const char* op, int err) {
    errors++;
    std::lock_guard<std::mutex> g(mu);
    if (!errNo) errOp = op, errNo = err;
  }
  const Range* Find(uint64_t a) const {
    for (const Range& r : ranges)
      if (a >= r.dst && a < r.dst + r.len) return &r;
    return nullptr;
  }
};

void Resolve(Handler* h, const struct uffd_msg& m) {
  uint64_t t0 = NowNs();
  uint64_t addr = m.arg.pagefault.address & ~(h->pageSize - 1);
  if (h->mode == Mode::Notify) {
    Event* e = new Event{addr, t0, m.arg.pagefault.feat.ptid, (uint32_t)m.arg.pagefault.flags};
    napi_status s = h->notify.NonBlockingCall(e, [](Napi::Env env, Napi::Function fn, Event* e) {
      if (env != nullptr && fn != nullptr)
        fn.Call({Napi::Number::New(env, (double)e->address), Napi::Number::New(env, e->ptid), Napi::Number::New(env, (double)e->t0),
                 Napi::Number::New(env, e->flags)});
      delete e;
    });
    if (s != napi_ok) {
      delete e;
      h->Fail("notify", EIO);
    }
    return;
  }
  const Range* r = h->Find(addr);
  if (!r) {
    h->Fail("range", EFAULT);
    return;
  }
  if (h->delayUs) {
    struct timespec ts = {(time_t)(h->delayUs / 1000000), (long)(h->delayUs % 1000000) * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
  }
  uint64_t off = addr - r->dst;
  // Logged and counted before the ioctl that resolves it: COPY and CONTINUE wake the faulting
  // thread, which may finish its work at once, and the VMM, reading the log then, must already
  // see the page resolved. Taken back below if the page was there already or the ioctl failed
  // (a failed reader is reported by its error count).
  {
    uint64_t dt = NowNs() - t0;
    std::lock_guard<std::mutex> g(h->mu);
    h->waits.push_back(m.arg.pagefault.feat.ptid);
    h->waits.push_back((double)dt);
    h->waits.push_back((double)addr);
  }
  h->resolved++;
  int64_t res;
  const char* op;
  if (h->mode == Mode::Copy) {
    op = "UFFDIO_COPY";
    res = DoCopy(h->fd, addr, r->src + off, h->pageSize, false);
  } else {
    op = "UFFDIO_CONTINUE";
    memcpy((void*)(uintptr_t)(r->alias + off), (const void*)(uintptr_t)(r->src + off), h->pageSize);
    res = DoContinue(h->fd, addr, h->pageSize, false);
  }
  if (res == -EEXIST) {
    h->resolved--;
    h->exists++;
    struct uffdio_range wr = {addr, h->pageSize};
    if (ioctl(h->fd, UFFDIO_WAKE, &wr) < 0) h->Fail("UFFDIO_WAKE", errno);
  } else if (res < 0) {
    h->resolved--;
    h->Fail(op, (int)-res);
  }
}

void* ReaderMain(void* arg) {
  Handler* h = static_cast<Reader*>(arg)->h;
  struct pollfd p[2] = {{h->fd, POLLIN, 0}, {h->stopFd, POLLIN, 0}};
  struct uffd_msg msgs[16];
  for (;;) {
    int n = poll(p, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      h->Fail("poll userfaultfd", errno);
      return nullptr;
    }
    if (p[1].revents) return nullptr;
    if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
      h->Fail("poll userfaultfd", EBADF);
      return nullptr;
    }
    ssize_t got = read(h->fd, msgs, sizeof msgs);
    if (got < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      h->Fail("read userfaultfd", errno);
      return nullptr;
    }
    for (size_t i = 0; i < (size_t)got / sizeof(struct uffd_msg); i++) {
      h->events++;
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT) Resolve(h, msgs[i]);
    }
  }
}

std::map<int, std::unique_ptr<Handler>> handlers;  // JS thread only
int nextHandler = 1;

Napi::Value HandlerStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = info[0].As<Napi::Object>();
  auto h = std::make_unique<Handler>();
  h->fd = o.Get("fd").As<Napi::Number>().Int32Value();
  std::string mode = o.Get("mode").As<Napi::String>();
  if (mode == "copy") h->mode = Mode::Copy;
  else if (mode == "continue") h->mode = Mode::Continue;
  else if (mode == "notify") h->mode = Mode::Notify;
  else return TypeErr(env, "uffdHandlerStart: mode must be copy, continue or notify, not " + mode);
  uint32_t readers = o.Get("readers").As<Napi::Number>().Uint32Value();
  if (readers < 1 || readers > 1024) return TypeErr(env, "uffdHandlerStart: readers must be 1..1024");
  if (o.Has("delayUs")) h->delayUs = (uint64_t)o.Get("delayUs").As<Napi::Number>().Int64Value();
  if (o.Has("pageSize")) h->pageSize = (uint64_t)o.Get("pageSize").As<Napi::Number>().Int64Value();
  if (h->mode != Mode::Notify) {
    Napi::Array rs = o.Get("ranges").As<Napi::Array>();
    for (uint32_t i = 0; i < rs.Length(); i++) {
      Napi::Object r = rs.Get(i).As<Napi::Object>();
      Range range = {ToU64(r.Get("dst")), ToU64(r.Get("len")), ToU64(r.Get("src")), r.Has("alias") ? ToU64(r.Get("alias")) : 0};
      if (h->mode == Mode::Continue && !range.alias) return TypeErr(env, "uffdHandlerStart: mode continue needs an alias per range");
      h->ranges.push_back(range);
    }
  } else {
    h->notify = Napi::ThreadSafeFunction::New(env, o.Get("onFault").As<Napi::Function>(), "uffd-notify", 0, 1);
    h->notify.Unref(env);  // the handler's owner keeps the process alive, not its readers
    h->hasNotify = true;
  }
  // Several readers share the fd: each must be able to lose the read race without blocking.
  int fl = fcntl(h->fd, F_GETFL);
  if (fl < 0 || fcntl(h->fd, F_SETFL, fl | O_NONBLOCK) < 0) return Throw(env, "fcntl O_NONBLOCK userfaultfd", errno);
  h->stopFd = eventfd(0, EFD_CLOEXEC);
  if (h->stopFd < 0) return Throw(env, "eventfd", errno);
  h->readers.resize(readers);
  for (uint32_t i = 0; i < readers; i++) {
    h->readers[i].h = h.get();
    int err = pthread_create(&h->readers[i].thread, nullptr, ReaderMain, &h->readers[i]);
    if (err) {
      uint64_t one = 1;
      (void)!write(h->stopFd, &one, sizeof one);
      for (uint32_t j = 0; j < i; j++) pthread_join(h->readers[j].thread, nullptr);
      close(h->stopFd);
      if (h->hasNotify) h->notify.Release();
      return Throw(env, "pthread_create", err);
    }
  }
  int id = nextHandler++;
  handlers[id] = std::move(h);
  return Napi::Number::New(env, id);
}

Handler* FindHandler(const Napi::CallbackInfo& info) {
  auto it = handlers.find(info[0].As<Napi::Number>().Int32Value());
  return it == handlers.end() ? nullptr : it->second.get();
}

Napi::Value Waits(Handler* h, Napi::Env env) {
  std::lock_guard<std::mutex> g(h->mu);
  Napi::Float64Array out = Napi::Float64Array::New(env, h->waits.size());
  if (!h->waits.empty()) memcpy(out.Data(), h->waits.data(), h->waits.size() * sizeof(double));
  h->waits.clear();
  return out;
}

Napi::Value HandlerWaits(const Napi::CallbackInfo& info) {
  Handler* h = FindHandler(info);
  if (!h) return TypeErr(info.Env(), "uffdHandlerWaits: no such handler");
  return Waits(h, info.Env());
}

Napi::Object Counters(Handler* h, Napi::Env env) {
  Napi::Object out = Napi::Object::New(env);
  out.Set("events", Napi::Number::New(env, (double)h->events.load()));
  out.Set("resolved", Napi::Number::New(env, (double)h->resolved.load()));
  out.Set("exists", Napi::Number::New(env, (double)h->exists.load()));
  out.Set("errors", Napi::Number::New(env, (double)h->errors.load()));
  return out;
}

Napi::Value HandlerCounters(const Napi::CallbackInfo& info) {
  Handler* h = FindHandler(info);
  if (!h) return TypeErr(info.Env(), "uffdHandlerCounters: no such handler");
  return Counters(h, info.Env());
}

Napi::Value HandlerStop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int id = info[0].As<Napi::Number>().Int32Value();
  auto it = handlers.find(id);
  if (it == handlers.end()) return TypeErr(env, "uffdHandlerStop: no such handler");
  Handler* h = it->second.get();
  uint64_t one = 1;
  (void)!write(h->stopFd, &one, sizeof one);
  for (Reader& r : h->readers) pthread_join(r.thread, nullptr);
  close(h->stopFd);
  if (h->hasNotify) h->notify.Release();
  Napi::Object out = Counters(h, env);
  out.Set("waits", Waits(h, env));
  if (h->errNo) {
    Napi::Object e = Napi::Object::New(env);
    e.Set("op", Napi::String::New(env, h->errOp));
    e.Set("errno", Napi::Number::New(env, h->errNo));
    e.Set("code", Napi::String::New(env, strerrorname_np(h->errNo) ?: "?"));
    out.Set("error", e);
  }
  handlers.erase(it);
  return out;
}

}  // namespace

void RegisterUffd(Napi::Env env, Napi::Object exports) {
  exports.Set("uffdOpen", Napi::Function::New(env, Open));
  exports.Set("uffdApi", Napi::Function::New(env, Api));
  exports.Set("uffdRegister", Napi::Function::New(env, Register));
  exports.Set("uffdUnregister", Napi::Function::New(env, Unregister));
  exports.Set("uffdCopy", Napi::Function::New(env, Copy));
  exports.Set("uffdZeropage", Napi::Function::New(env, Zeropage));
  exports.Set("uffdContinue", Napi::Function::New(env, Continue));
  exports.Set("uffdWake", Napi::Function::New(env, Wake));
  exports.Set("uffdRead", Napi::Function::New(env, Read));
  exports.Set("addressOf", Napi::Function::New(env, AddressOf));
  exports.Set("memfdMap", Napi::Function::New(env, MemfdMap));
  exports.Set("madvise", Napi::Function::New(env, Madvise));
  exports.Set("mincore", Napi::Function::New(env, Mincore));
  exports.Set("uffdHandlerStart", Napi::Function::New(env, HandlerStart));
  exports.Set("uffdHandlerStop", Napi::Function::New(env, HandlerStop));
  exports.Set("uffdHandlerWaits", Napi::Function::New(env, HandlerWaits));
  exports.Set("uffdHandlerCounters", Napi::Function::New(env, HandlerCounters));
  exports.Set("remapShared", Napi::Function::New(env, RemapShared));
}

}  // namespace stage2
