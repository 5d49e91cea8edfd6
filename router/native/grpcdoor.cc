// gpugate's native gRPC door (router/native_server.py drives it).
//
// gRPC C++'s async generic service takes the calls: HTTP/2, HPACK, flow control,
// deadlines and message limits all run in gRPC's core on this module's completion
// queue thread, without the GIL. A call whose request message has arrived goes on
// a queue, and an eventfd wakes the Python event loop, which takes every queued call
// in one go (Door.take) and answers each with Door.finish. Python sees raw request
// bytes, metadata and the time left; it parses and serializes the messages itself,
// so this module knows nothing of the KServe protobufs.
//
// Lifetime of a call: Accept -> Read -> (Python) -> Finish. AsyncNotifyWhenDone
// delivers Done once the call is over, finished or cancelled, and it can come before
// the Read's tag (a client that resets its stream as its message arrives); a call
// cancelled while Python holds it, or before Python got it, is reported to Python
// (take() returns it as a cancellation), and Python still finishes it. A call is
// deleted once Done has arrived, no Read or Finish of its is pending, and Python no
// longer holds it.
//
// Key before body: a call of the deferred method (ModelInfer) goes to Python as soon as
// its metadata is in, without its message: Accept -> (Python authenticates) -> Read ->
// (Python) -> Finish. Python asks for the message (Door.read) only once the caller's key
// is known, so a stranger's call is answered without its message being read beyond what
// HTTP/2 flow control had already let in. A call over the server's cap on calls in
// progress is answered RESOURCE_EXHAUSTED at Accept, also before any Read.
//
// Streams (health Watch, server reflection): a call taken with its first message may be
// read on (Door.read, one message at a time, each coming back as a body; none once the
// client has half-closed) and written to (Door.write, one message at a time, each
// coming back as written) before Python finishes it. A Finish that Python asks for while
// a Read or Write is pending starts when the last of them is back.

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

enum class Ev : uint8_t { Accept, Read, Write, Finish, Done };

struct Call;

struct Tag {
  Call* call;
  Ev ev;
};

struct Call {
  uint64_t id = 0;
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream{&ctx};
  grpc::ByteBuffer request;
  grpc::ByteBuffer response;
  grpc::ByteBuffer message;  // a message of a streamed answer being written (Door.write)
  grpc::Status status;
  bool with_payload = false;
  Tag accept_tag{this, Ev::Accept};
  Tag read_tag{this, Ev::Read};
  Tag write_tag{this, Ev::Write};
  Tag finish_tag{this, Ev::Finish};
  Tag done_tag{this, Ev::Done};
  bool done = false;            // Done delivered
  bool read_pending = false;    // the Read started, its tag not back yet
  bool write_pending = false;   // a Write started (Door.write), its tag not back yet
  bool finish_pending = false;  // a Finish started, its tag not back yet
  bool handed = false;          // queued for or held by Python
  bool counted = false;         // accepted: counts against the cap on calls in progress
  bool deferred = false;        // key before body: Python starts the Read (Door.read)
  bool read_started = false;    // Door.read was called
  bool streaming = false;       // taken with its message, and read on since (Door.read)
  bool finish_after_io = false;  // Python answered while a Read or Write was pending
};

// Fewer calls than this held by Python, and none queued for the writer: Finish
// writes on the caller's thread.
constexpr size_t kInlineBelow = 4;

enum class Kind : uint8_t {
  New,        // a new call (call is set); a deferred one comes without its message
  Cancelled,  // call `id` was cancelled
  Body,       // the message of deferred call `id` (ok: false when none came)
  Written,    // the Write of call `id` ended (ok: false when the call is over)
};

struct Event {
  Kind kind;
  Call* call;
  uint64_t id;
  bool ok = true;
};

// TLS files; an empty cert means plain text. gRPC's core reads the files and reads them
// again every `interval_s` when they changed (FileWatcherCertificateProvider).
struct TlsFiles {
  std::string cert;
  std::string key;
  std::string client_ca;  // empty: no client certificate asked for
  unsigned int interval_s = 10;
};

std::shared_ptr<grpc::ServerCredentials> Credentials(const TlsFiles& tls) {
  if (tls.cert.empty()) return grpc::InsecureServerCredentials();
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      tls.key, tls.cert, tls.client_ca, tls.interval_s);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (tls.client_ca.empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

class Door {
 public:
  Door(const std::string& address, int max_recv, int max_send, int accepts, int max_streams,
       int64_t max_calls, const std::string& deferred_method, const TlsFiles& tls,
       bool reuse_port)
      : accepts_(accepts), max_calls_(max_calls), deferred_method_(deferred_method) {
    efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    grpc::ServerBuilder builder;
    builder.AddListeningPort(address, Credentials(tls), &port_);
    builder.RegisterAsyncGenericService(&service_);
    builder.SetMaxReceiveMessageSize(max_recv);
    builder.SetMaxSendMessageSize(max_send);
    // A second server on the same port must fail to bind, not share it, unless the
    // caller asks to share it (several gateways on one node, SO_REUSEPORT).
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port ? 1 : 0);
    // Per connection: a client that opens more streams has them refused (REFUSED_STREAM).
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, max_streams);
    cq_ = builder.AddCompletionQueue();
    server_ = builder.BuildAndStart();
  }

  bool ok() const { return efd_ >= 0 && server_ != nullptr && port_ > 0; }
  int port() const { return port_; }
  int fileno() const { return efd_; }
  int64_t allocated() {
    std::lock_guard<std::mutex> lock(mu_);
    return allocated_;
  }
  int64_t active() {
    std::lock_guard<std::mutex> lock(mu_);
    return active_;
  }

  void Start() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int i = 0; i < accepts_; ++i) RequestLocked();
    }
    thread_ = std::thread([this] { Run(); });
    writer_ = std::thread([this] { Write(); });
  }

  // Everything queued since the last take (called with the GIL held).
  void Take(std::vector<Event>* out) {
    uint64_t count;
    while (read(efd_, &count, sizeof count) > 0) {
    }
    std::lock_guard<std::mutex> lock(mu_);
    out->swap(queue_);
    signalled_ = false;
    // A message that arrived for a call Python has answered since (a cancel, say) has
    // nobody to go to, and its call may be gone.
    out->erase(std::remove_if(out->begin(), out->end(),
                              [this](const Event& e) {
                                return (e.kind == Kind::Body || e.kind == Kind::Written) &&
                                       calls_.count(e.id) == 0;
                              }),
               out->end());
  }

  // Start reading call `id`'s next message (called with the GIL held): a deferred call's
  // one message, or the next message of a stream taken with its first. False when the
  // call is gone, a Read of it is pending, or the deferred call's Read already started.
  bool ReadBody(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return false;
    auto it = calls_.find(id);
    if (it == calls_.end()) return false;
    Call* call = it->second;
    if (call->read_pending || (call->deferred && call->read_started)) return false;
    if (!call->deferred) call->streaming = true;
    call->read_started = true;
    call->read_pending = true;
    call->stream.Read(&call->request, &call->read_tag);
    return true;
  }

  // Start writing one message of call `id`'s streamed answer (called with the GIL held);
  // false when the call is gone or a Write of it is pending. The end of the Write comes
  // back as a Written event.
  bool WriteMessage(uint64_t id, const char* data, Py_ssize_t size) {
    grpc::Slice slice(data, static_cast<size_t>(size));  // the copy, outside the lock
    grpc::ByteBuffer message(&slice, 1);
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_ || writer_stopping_) return false;
    auto it = calls_.find(id);
    if (it == calls_.end()) return false;
    Call* call = it->second;
    if (call->write_pending) return false;
    call->write_pending = true;
    call->message.Swap(&message);
    call->stream.Write(call->message, &call->write_tag);
    return true;
  }

  // Answer call `id` (called with the GIL held); false when it is gone (already
  // finished, or stopped). Under load the answer is queued for the writer thread,
  // which starts its write: gRPC's framing and the socket write run there, off the
  // event loop's thread and without the GIL (+10-15% calls/s at 64 in flight); near
  // idle it is written here, which is quicker for one call.
  bool Finish(uint64_t id, int code, const std::string& details, const char* data,
              Py_ssize_t size, bool has_payload,
              const std::vector<std::pair<std::string, std::string>>& trailers = {}) {
    bool with_payload = has_payload && code == 0;
    grpc::ByteBuffer response;
    if (with_payload) {
      grpc::Slice slice(data, static_cast<size_t>(size));  // the copy, outside the lock
      response = grpc::ByteBuffer(&slice, 1);
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_ || writer_stopping_) return false;
    auto it = calls_.find(id);
    if (it == calls_.end()) return false;
    Call* call = it->second;
    calls_.erase(it);
    call->handed = false;
    call->finish_pending = true;
    call->status = grpc::Status(static_cast<grpc::StatusCode>(code), details);
    call->with_payload = with_payload;
    if (with_payload) call->response.Swap(&response);
    for (const auto& [key, value] : trailers) call->ctx.AddTrailingMetadata(key, value);
    if (call->read_pending || call->write_pending) {
      // A Finish may not start while a Read or Write is pending: the last of their tags
      // starts it. The call is cancelled so that they end soon: the client may never send
      // its message (Python gave up waiting for it) or never read the one being written,
      // and it then gets CANCELLED.
      call->finish_after_io = true;
      call->ctx.TryCancel();
      return true;
    }
    if (replies_.empty() && calls_.size() < kInlineBelow) {
      // Next to idle: write here, as a hand-off to the writer thread would cost
      // more latency than the write itself.
      StartReply(call);
      return true;
    }
    replies_.push_back(call);
    if (replies_.size() == 1) replies_ready_.notify_one();
    return true;
  }

  // Stop accepting; wait up to grace_s for calls in progress, then cancel the rest.
  // Blocks: call without the GIL, and keep the event loop running meanwhile so
  // Python can finish what it holds.
  void Shutdown(double grace_s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (shutdown_started_) return;
      shutdown_started_ = true;
    }
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(grace_s * 1e6));
    if (server_) server_->Shutdown(deadline);
    {
      std::lock_guard<std::mutex> lock(mu_);
      writer_stopping_ = true;  // the writer starts what is queued, then ends
    }
    replies_ready_.notify_one();
    if (writer_.joinable()) writer_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopped_ = true;
    }
    if (cq_) {
      cq_->Shutdown();
      if (thread_.joinable()) {
        thread_.join();
      } else {  // never started: drain here, as a completion queue must be before it goes
        void* tag;
        bool ok;
        while (cq_->Next(&tag, &ok)) {
        }
      }
    }
  }

  ~Door() {
    Shutdown(0);
    // Calls still allocated here belong to a server that is gone; they are left
    // (a few objects at most, once per server).
    server_.reset();
    cq_.reset();
    if (efd_ >= 0) close(efd_);
  }

 private:
  void RequestLocked() {
    if (stopped_ || shutdown_started_) return;
    Call* call = new Call();
    ++allocated_;
    call->ctx.AsyncNotifyWhenDone(&call->done_tag);
    service_.RequestCall(&call->ctx, &call->stream, cq_.get(), cq_.get(), &call->accept_tag);
  }

  static void StartReply(Call* c) {
    if (c->with_payload) {
      c->stream.WriteAndFinish(c->response, grpc::WriteOptions(), c->status, &c->finish_tag);
    } else {
      c->stream.Finish(c->status, &c->finish_tag);
    }
  }

  // Starts the writes Python queued. The operations start outside the lock: a call
  // with a pending Finish is not deleted, and the completion queue is shut down only
  // after this thread has ended.
  void Write() {
    std::vector<Call*> batch;
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      replies_ready_.wait(lock, [this] { return !replies_.empty() || writer_stopping_; });
      if (replies_.empty()) return;  // stopping, nothing left
      batch.swap(replies_);
      lock.unlock();
      for (Call* c : batch) StartReply(c);
      batch.clear();
      lock.lock();
    }
  }

  void PushLocked(Event event) {
    queue_.push_back(event);
    if (!signalled_) {
      signalled_ = true;
      uint64_t one = 1;
      ssize_t n = write(efd_, &one, sizeof one);
      (void)n;  // EAGAIN means the counter is already non-zero: Python wakes anyway
    }
  }

  void MaybeDeleteLocked(Call* call) {
    if (call->done && !call->read_pending && !call->write_pending && !call->finish_pending &&
        !call->handed) {
      if (call->counted) --active_;
      delete call;
      --allocated_;
    }
  }

  void Run() {
    void* raw;
    bool ok;
    while (cq_->Next(&raw, &ok)) {
      Tag* tag = static_cast<Tag*>(raw);
      Call* call = tag->call;
      std::lock_guard<std::mutex> lock(mu_);
      switch (tag->ev) {
        case Ev::Accept:
          if (!ok) break;  // shutting down; a call never started gets no Done (grpc#10136)
          RequestLocked();
          call->id = ++next_id_;
          call->counted = true;
          if (++active_ > max_calls_) {
            call->finish_pending = true;
            call->stream.Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                             "too many calls in progress on this server"),
                                &call->finish_tag);
            break;
          }
          if (!deferred_method_.empty() && call->ctx.method() == deferred_method_) {
            call->deferred = true;
            call->handed = true;
            calls_.emplace(call->id, call);
            PushLocked(Event{Kind::New, call, call->id});
            break;
          }
          call->read_pending = true;
          call->stream.Read(&call->request, &call->read_tag);
          break;
        case Ev::Read:
          call->read_pending = false;
          if (call->deferred || call->streaming) {
            if (call->finish_after_io) {
              if (!call->write_pending) {
                call->finish_after_io = false;
                StartReply(call);
              }
            } else if (call->handed) {
              PushLocked(Event{Kind::Body, call, call->id, ok});
            }
            break;
          }
          if (ok) {
            call->handed = true;
            calls_.emplace(call->id, call);
            PushLocked(Event{Kind::New, call, call->id});
            // Done came first: the message arrived with the client's reset.
            if (call->done && call->ctx.IsCancelled()) {
              PushLocked(Event{Kind::Cancelled, nullptr, call->id});
            }
          } else {  // the client went away (or half-closed) before sending a message
            call->finish_pending = true;
            call->stream.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "no request"),
                                &call->finish_tag);
          }
          break;
        case Ev::Write:
          call->write_pending = false;
          if (call->finish_after_io) {
            if (!call->read_pending) {
              call->finish_after_io = false;
              StartReply(call);
            }
          } else if (call->handed) {
            PushLocked(Event{Kind::Written, call, call->id, ok});
          }
          break;
        case Ev::Finish:
          call->finish_pending = false;
          MaybeDeleteLocked(call);
          break;

        case Ev::Done:
          call->done = true;
          if (call->handed && call->ctx.IsCancelled()) {
            PushLocked(Event{Kind::Cancelled, nullptr, call->id});
          }
          MaybeDeleteLocked(call);
          break;
      }
    }
  }

  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::thread thread_;
  int port_ = 0;
  int efd_ = -1;
  int accepts_;
  int64_t max_calls_;
  std::string deferred_method_;
  int64_t active_ = 0;  // calls accepted and not yet deleted
  std::mutex mu_;
  std::vector<Event> queue_;
  std::unordered_map<uint64_t, Call*> calls_;  // held by Python, by id
  std::vector<Call*> replies_;                 // answered by Python, not yet written
  std::condition_variable replies_ready_;
  std::thread writer_;
  bool writer_stopping_ = false;
  uint64_t next_id_ = 0;
  int64_t allocated_ = 0;  // Call objects alive: outstanding accepts + calls in progress
  bool signalled_ = false;
  bool shutdown_started_ = false;
  bool stopped_ = false;
};

// ---------------------------------------------------------------------------
// Python type

struct DoorObject {
  PyObject_HEAD Door* door;
};

// The call's request message as bytes (empty when none was read).
PyObject* Payload(Call* call) {
  std::vector<grpc::Slice> slices;
  if (!call->request.Valid() || !call->request.Dump(&slices).ok()) {
    return PyBytes_FromStringAndSize("", 0);
  }
  PyObject* payload =
      PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(call->request.Length()));
  if (payload == nullptr) return nullptr;
  char* dst = PyBytes_AS_STRING(payload);
  for (const auto& s : slices) {
    memcpy(dst, s.begin(), s.size());
    dst += s.size();
  }
  call->request.Clear();  // Python has its copy
  return payload;
}

PyObject* TakeCall(Call* call) {
  // (id, method, request bytes or None for a deferred call, metadata, seconds left or None)
  PyObject* payload = call->deferred ? Py_NewRef(Py_None) : Payload(call);
  if (payload == nullptr) return nullptr;
  const auto& md = call->ctx.client_metadata();
  PyObject* items = PyTuple_New(static_cast<Py_ssize_t>(md.size()));
  if (items == nullptr) {
    Py_DECREF(payload);
    return nullptr;
  }
  Py_ssize_t i = 0;
  for (const auto& [key, value] : md) {
    bool binary = key.size() > 4 && memcmp(key.data() + key.size() - 4, "-bin", 4) == 0;
    PyObject* k = PyUnicode_DecodeLatin1(key.data(), static_cast<Py_ssize_t>(key.size()), nullptr);
    PyObject* v = binary ? PyBytes_FromStringAndSize(value.data(), static_cast<Py_ssize_t>(value.size()))
                         : PyUnicode_DecodeLatin1(value.data(),
                                                  static_cast<Py_ssize_t>(value.size()), nullptr);
    PyObject* pair = (k && v) ? PyTuple_Pack(2, k, v) : nullptr;
    Py_XDECREF(k);
    Py_XDECREF(v);
    if (pair == nullptr) {
      Py_DECREF(items);
      Py_DECREF(payload);
      return nullptr;
    }
    PyTuple_SET_ITEM(items, i++, pair);
  }
  PyObject* left;
  auto deadline = call->ctx.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) {
    left = Py_NewRef(Py_None);
  } else {
    std::chrono::duration<double> d = deadline - std::chrono::system_clock::now();
    left = PyFloat_FromDouble(d.count() > 0 ? d.count() : 0.0);
  }
  // The method is the client's :path, any bytes: decoded as Latin-1 (like the metadata)
  // it always converts, and an odd one finds no handler (UNIMPLEMENTED).
  const std::string& method = call->ctx.method();
  PyObject* name = PyUnicode_DecodeLatin1(method.data(), static_cast<Py_ssize_t>(method.size()),
                                          nullptr);
  if (name == nullptr || left == nullptr) {
    Py_XDECREF(name);
    Py_XDECREF(left);
    Py_DECREF(items);
    Py_DECREF(payload);
    return nullptr;
  }
  return Py_BuildValue("(KNNNN)", static_cast<unsigned long long>(call->id), name, payload, items,
                       left);
}

PyObject* Door_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"address",     "max_receive",     "max_send",
                             "accepts",     "max_streams",     "max_calls",
                             "deferred_method", "tls",          "reuse_port",
                             nullptr};
  const char* address;
  int max_recv, max_send, accepts;
  int max_streams = 2147483647;
  long long max_calls = INT64_MAX;
  const char* deferred = "";
  PyObject* tls_arg = Py_None;
  int reuse_port = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "siii|iLsOp", const_cast<char**>(kw), &address,
                                   &max_recv, &max_send, &accepts, &max_streams, &max_calls,
                                   &deferred, &tls_arg, &reuse_port)) {
    return nullptr;
  }
  if (accepts < 1 || max_streams < 1 || max_calls < 1) {
    PyErr_SetString(PyExc_ValueError, "accepts, max_streams and max_calls must be at least 1");
    return nullptr;
  }
  TlsFiles tls;
  if (tls_arg != Py_None) {
    const char *cert, *key, *ca;
    unsigned int interval;
    if (!PyArg_ParseTuple(tls_arg, "sssI;tls is (cert, key, client_ca or '', interval_s)",
                          &cert, &key, &ca, &interval)) {
      return nullptr;
    }
    if (!*cert || !*key) {
      PyErr_SetString(PyExc_ValueError, "tls needs a certificate and a key file");
      return nullptr;
    }
    tls = TlsFiles{cert, key, ca, interval < 1 ? 1 : interval};
  }
  std::string deferred_method(deferred);
  auto* self = reinterpret_cast<DoorObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) return nullptr;
  PyThreadState* state = PyEval_SaveThread();
  Door* door = new Door(address, max_recv, max_send, accepts, max_streams, max_calls,
                        deferred_method, tls, reuse_port != 0);
  bool ok = door->ok();
  if (ok) {
    door->Start();
  } else {
    delete door;
  }
  PyEval_RestoreThread(state);
  if (!ok) {
    Py_DECREF(self);
    PyErr_Format(PyExc_OSError, "cannot listen on %s", address);
    return nullptr;
  }
  self->door = door;
  return reinterpret_cast<PyObject*>(self);
}

void Door_dealloc(DoorObject* self) {
  if (self->door != nullptr) {
    Door* door = self->door;
    self->door = nullptr;
    PyThreadState* state = PyEval_SaveThread();
    delete door;
    PyEval_RestoreThread(state);
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

bool Alive(DoorObject* self) {
  if (self->door == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "door is closed");
    return false;
  }
  return true;
}

PyObject* Door_take(DoorObject* self, PyObject*) {
  if (!Alive(self)) return nullptr;
  std::vector<Event> events;
  self->door->Take(&events);
  PyObject* calls = PyList_New(0);
  PyObject* cancelled = PyList_New(0);
  if (calls == nullptr || cancelled == nullptr) {
    Py_XDECREF(calls);
    Py_XDECREF(cancelled);
    return nullptr;
  }
  PyObject* bodies = PyList_New(0);
  if (bodies == nullptr) {
    Py_DECREF(calls);
    Py_DECREF(cancelled);
    return nullptr;
  }
  PyObject* written = PyList_New(0);
  if (written == nullptr) {
    Py_DECREF(calls);
    Py_DECREF(cancelled);
    Py_DECREF(bodies);
    return nullptr;
  }
  for (const Event& e : events) {
    if (e.kind == Kind::Written) {
      PyObject* item = Py_BuildValue("(KO)", static_cast<unsigned long long>(e.id),
                                     e.ok ? Py_True : Py_False);
      if (item == nullptr || PyList_Append(written, item) < 0) {
        Py_XDECREF(item);
        Py_DECREF(calls);
        Py_DECREF(cancelled);
        Py_DECREF(bodies);
        Py_DECREF(written);
        return nullptr;
      }
      Py_DECREF(item);
      continue;
    }
    if (e.kind == Kind::Body) {
      PyObject* body = e.ok ? Payload(e.call) : Py_NewRef(Py_None);
      if (body == nullptr) {  // out of memory for this message: the call alone fails
        PyErr_Clear();
        body = Py_NewRef(Py_None);
      }
      PyObject* item = Py_BuildValue("(KN)", static_cast<unsigned long long>(e.id), body);
      if (item == nullptr || PyList_Append(bodies, item) < 0) {
        Py_XDECREF(item);
        Py_DECREF(calls);
        Py_DECREF(cancelled);
        Py_DECREF(bodies);
        Py_DECREF(written);
        return nullptr;
      }
      Py_DECREF(item);
      continue;
    }
    bool is_cancel = e.kind == Kind::Cancelled;
    PyObject* item = is_cancel ? PyLong_FromUnsignedLongLong(e.id) : TakeCall(e.call);
    if (item == nullptr && !is_cancel) {
      // This call's request could not be converted (out of memory for it): it alone is
      // answered here, and the calls taken with it go on.
      PyErr_Clear();
      self->door->Finish(e.id, 8, "the request could not be handed to the server", nullptr, 0,
                         false);
      continue;
    }
    if (item == nullptr || PyList_Append(is_cancel ? cancelled : calls, item) < 0) {
      // Out of memory for the lists themselves: no call of this take reaches Python, so
      // each is answered here.
      Py_XDECREF(item);
      for (const Event& rest : events) {
        if (rest.kind == Kind::New) {
          self->door->Finish(rest.id, 13, "out of memory", nullptr, 0, false);
        }
      }
      Py_DECREF(calls);
      Py_DECREF(cancelled);
      Py_DECREF(bodies);
      Py_DECREF(written);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return Py_BuildValue("(NNNN)", calls, cancelled, bodies, written);
}

PyObject* Door_finish(DoorObject* self, PyObject* args) {
  unsigned long long id;
  int code;
  const char* details;
  Py_ssize_t details_size;
  PyObject* payload;
  PyObject* trailer_items = nullptr;
  if (!PyArg_ParseTuple(args, "Kis#O|O", &id, &code, &details, &details_size, &payload,
                        &trailer_items)) {
    return nullptr;
  }
  // Trailing metadata: a sequence of (key, value) str pairs (e.g. retry-after).
  std::vector<std::pair<std::string, std::string>> trailers;
  if (trailer_items != nullptr && trailer_items != Py_None) {
    PyObject* seq = PySequence_Fast(trailer_items, "trailers must be a sequence of pairs");
    if (seq == nullptr) return nullptr;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
      const char *key, *value;
      Py_ssize_t key_size, value_size;
      if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "s#s#;a trailer is (key, value)",
                            &key, &key_size, &value, &value_size)) {
        Py_DECREF(seq);
        return nullptr;
      }
      trailers.emplace_back(std::string(key, key_size), std::string(value, value_size));
    }
    Py_DECREF(seq);
  }
  if (!Alive(self)) return nullptr;
  if (code < 0 || code > 16) {
    PyErr_Format(PyExc_ValueError, "not a gRPC status code: %d", code);
    return nullptr;
  }
  const char* data = nullptr;
  Py_ssize_t size = 0;
  bool has_payload = payload != Py_None;
  if (has_payload && PyBytes_AsStringAndSize(payload, const_cast<char**>(&data), &size) < 0) {
    return nullptr;
  }
  bool started = self->door->Finish(id, code, std::string(details, details_size), data, size,
                                    has_payload, trailers);
  return PyBool_FromLong(started);
}

PyObject* Door_write(DoorObject* self, PyObject* args) {
  unsigned long long id;
  const char* data;
  Py_ssize_t size;
  if (!PyArg_ParseTuple(args, "Ky#", &id, &data, &size)) return nullptr;
  if (!Alive(self)) return nullptr;
  return PyBool_FromLong(self->door->WriteMessage(id, data, size));
}

PyObject* Door_read(DoorObject* self, PyObject* args) {
  unsigned long long id;
  if (!PyArg_ParseTuple(args, "K", &id)) return nullptr;
  if (!Alive(self)) return nullptr;
  return PyBool_FromLong(self->door->ReadBody(id));
}

PyObject* Door_shutdown(DoorObject* self, PyObject* args) {
  double grace;
  if (!PyArg_ParseTuple(args, "d", &grace)) return nullptr;
  if (!Alive(self)) return nullptr;
  Door* door = self->door;
  PyThreadState* state = PyEval_SaveThread();
  door->Shutdown(grace);
  PyEval_RestoreThread(state);
  Py_RETURN_NONE;
}

PyObject* Door_fileno(DoorObject* self, PyObject*) {
  if (!Alive(self)) return nullptr;
  return PyLong_FromLong(self->door->fileno());
}

PyObject* Door_port(DoorObject* self, void*) {
  if (!Alive(self)) return nullptr;
  return PyLong_FromLong(self->door->port());
}

PyObject* Door_allocated(DoorObject* self, void*) {
  if (!Alive(self)) return nullptr;
  return PyLong_FromLongLong(self->door->allocated());
}

PyObject* Door_active(DoorObject* self, void*) {
  if (!Alive(self)) return nullptr;
  return PyLong_FromLongLong(self->door->active());
}

PyMethodDef door_methods[] = {
    {"take", reinterpret_cast<PyCFunction>(Door_take), METH_NOARGS,
     "take() -> (calls, cancelled, bodies, written): calls as (id, method, request or None "
     "when deferred, metadata, seconds left or None); cancelled as ids of calls taken "
     "earlier; bodies as (id, request or None when none came) for the reads started since; "
     "written as (id, ok) for the writes started since"},
    {"read", reinterpret_cast<PyCFunction>(Door_read), METH_VARARGS,
     "read(id) -> bool: start reading a deferred call's request, or a stream's next one "
     "(it comes in a later take)"},
    {"write", reinterpret_cast<PyCFunction>(Door_write), METH_VARARGS,
     "write(id, message) -> bool: start writing one message of a call's streamed answer "
     "(its end comes in a later take); finish(id, code, details, None) ends the stream"},
    {"finish", reinterpret_cast<PyCFunction>(Door_finish), METH_VARARGS,
     "finish(id, code, details, response or None, trailers=()) -> bool: answer a taken "
     "call; trailers are (key, value) pairs of trailing metadata"},
    {"shutdown", reinterpret_cast<PyCFunction>(Door_shutdown), METH_VARARGS,
     "shutdown(grace_s): stop accepting, wait for calls up to grace_s, cancel the rest"},
    {"fileno", reinterpret_cast<PyCFunction>(Door_fileno), METH_NOARGS,
     "the eventfd that becomes readable when calls are waiting"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef door_getset[] = {
    {"port", reinterpret_cast<getter>(Door_port), nullptr, "the bound port", nullptr},
    {"allocated", reinterpret_cast<getter>(Door_allocated), nullptr,
     "call objects alive: outstanding accepts plus calls not yet over", nullptr},
    {"active", reinterpret_cast<getter>(Door_active), nullptr,
     "calls accepted and not yet over (what max_calls caps)", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject DoorType = {
    PyVarObject_HEAD_INIT(nullptr, 0) "router._grpcdoor.Door", /* tp_name */
    sizeof(DoorObject),                                       /* tp_basicsize */
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_grpcdoor",
                          "gRPC C++ front door for the router (router/native_server.py)",
                          -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__grpcdoor(void) {
  DoorType.tp_dealloc = reinterpret_cast<destructor>(Door_dealloc);
  DoorType.tp_flags = Py_TPFLAGS_DEFAULT;
  DoorType.tp_doc =
      "Door(address, max_receive, max_send, accepts, max_streams=, max_calls=, "
      "deferred_method='', tls=None): a started gRPC server";
  DoorType.tp_methods = door_methods;
  DoorType.tp_getset = door_getset;
  DoorType.tp_new = Door_new;
  if (PyType_Ready(&DoorType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "GRPC_VERSION", grpc::Version().c_str());
  if (PyModule_AddObjectRef(m, "Door", reinterpret_cast<PyObject*>(&DoorType)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
