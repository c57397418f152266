#pragma once
// The CUDA driver API, loaded at run time: libcuda.so.1 is dlopen'ed and every entry point is
// resolved with cuGetProcAddress (the binary never links libcuda, so it starts - and can compile
// kernels - on machines without a GPU). <cuda.h> is included for types only.
//
// One Driver per process, created by whoever needs the GPU and passed by reference; the RAII
// types below (Context, DeviceBuffer, Stream, Event, Module, Function, Graph, GraphExec) keep a
// pointer to it, so it must outlive them. Every call is checked: a failure throws q35::Error
// naming the call and the CUresult ("cuMemAlloc(1073741824 bytes) failed: CUDA_ERROR_OUT_OF_MEMORY
// (out of memory)").
#include <cuda.h>
#include <cudaProfiler.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>

namespace q35 {

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  size_t total_mem = 0;  // bytes
  size_t max_pitch = 0;  // the largest row pitch a 2D copy takes (CU_DEVICE_ATTRIBUTE_MAX_PITCH)
  // NVRTC target: "sm_90a" for 9.0 (wgmma, setmaxnreg), else "sm_XY".
  std::string arch() const;
};

class Driver {
 public:
  // Loads `library` (default: the driver's soname) and calls cuInit(0). Throws Error starting with
  // "no CUDA driver found: " when the library cannot be loaded, is the toolkit's link stub, is too
  // old, or cuInit fails; "no CUDA device found: " when the driver sees no device.
  explicit Driver(const std::string& library = "libcuda.so.1");
  ~Driver();
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  int version() const { return version_; }  // e.g. 13000 for CUDA 13.0
  int device_count() const;
  DeviceInfo device_info(int ordinal) const;

  // Throws Error "<what> failed: <CUresult name> (<description>)" unless r == CUDA_SUCCESS.
  void check(CUresult r, const char* what) const;
  std::string error_name(CUresult r) const;  // "CUDA_ERROR_OUT_OF_MEMORY (out of memory)"

  // Entry points, resolved for the ABI of the <cuda.h> this was compiled against.
  struct Api {
    decltype(&::cuInit) init = nullptr;
    decltype(&::cuDriverGetVersion) driver_get_version = nullptr;
    decltype(&::cuGetErrorName) get_error_name = nullptr;
    decltype(&::cuGetErrorString) get_error_string = nullptr;
    decltype(&::cuDeviceGetCount) device_get_count = nullptr;
    decltype(&::cuDeviceGet) device_get = nullptr;
    decltype(&::cuDeviceGetName) device_get_name = nullptr;
    decltype(&::cuDeviceGetAttribute) device_get_attribute = nullptr;
    decltype(&::cuDeviceTotalMem) device_total_mem = nullptr;
    decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
    decltype(&::cuDevicePrimaryCtxRelease) primary_ctx_release = nullptr;
    decltype(&::cuCtxSetCurrent) ctx_set_current = nullptr;
    decltype(&::cuCtxSynchronize) ctx_synchronize = nullptr;
    decltype(&::cuMemGetInfo) mem_get_info = nullptr;
    decltype(&::cuMemAlloc) mem_alloc = nullptr;
    decltype(&::cuMemFree) mem_free = nullptr;
    decltype(&::cuMemcpyHtoDAsync) memcpy_htod_async = nullptr;
    decltype(&::cuMemcpyDtoHAsync) memcpy_dtoh_async = nullptr;
    decltype(&::cuMemcpyDtoDAsync) memcpy_dtod_async = nullptr;
    decltype(&::cuMemcpyAsync) memcpy_async = nullptr;  // unified addressing: the direction from the pointers
    decltype(&::cuMemcpy2DAsync) memcpy_2d_async = nullptr;
    decltype(&::cuMemsetD8Async) memset_d8_async = nullptr;
    decltype(&::cuMemsetD32Async) memset_d32_async = nullptr;
    decltype(&::cuMemHostAlloc) mem_host_alloc = nullptr;
    decltype(&::cuMemFreeHost) mem_free_host = nullptr;
    decltype(&::cuStreamCreate) stream_create = nullptr;
    decltype(&::cuStreamDestroy) stream_destroy = nullptr;
    decltype(&::cuStreamSynchronize) stream_synchronize = nullptr;
    decltype(&::cuEventCreate) event_create = nullptr;
    decltype(&::cuEventDestroy) event_destroy = nullptr;
    decltype(&::cuEventRecord) event_record = nullptr;
    decltype(&::cuEventSynchronize) event_synchronize = nullptr;
    decltype(&::cuEventElapsedTime) event_elapsed_time = nullptr;
    decltype(&::cuModuleLoadData) module_load_data = nullptr;
    decltype(&::cuModuleGetFunction) module_get_function = nullptr;
    decltype(&::cuModuleUnload) module_unload = nullptr;
    decltype(&::cuFuncSetAttribute) func_set_attribute = nullptr;
    decltype(&::cuFuncGetAttribute) func_get_attribute = nullptr;
    decltype(&::cuOccupancyMaxActiveBlocksPerMultiprocessor) occupancy_max_active_blocks = nullptr;
    decltype(&::cuLaunchKernelEx) launch_kernel_ex = nullptr;
    decltype(&::cuStreamBeginCapture) stream_begin_capture = nullptr;
    decltype(&::cuStreamEndCapture) stream_end_capture = nullptr;
    decltype(&::cuGraphInstantiate) graph_instantiate = nullptr;
    decltype(&::cuGraphLaunch) graph_launch = nullptr;
    decltype(&::cuGraphDestroy) graph_destroy = nullptr;
    decltype(&::cuGraphExecDestroy) graph_exec_destroy = nullptr;
    decltype(&::cuGraphGetNodes) graph_get_nodes = nullptr;
    decltype(&::cuGraphNodeGetType) graph_node_get_type = nullptr;
    // Bracket what an external profiler records (ncu --profile-from-start off).
    decltype(&::cuProfilerStart) profiler_start = nullptr;
    decltype(&::cuProfilerStop) profiler_stop = nullptr;
  };
  const Api& api() const { return api_; }

 private:
  std::string library_;
  void* handle_ = nullptr;  // dlopen handle
  int version_ = 0;
  Api api_;
};

// The primary context of one device, retained for the lifetime of this object and made current
// on the constructing thread (call make_current() on other threads).
class Context {
 public:
  Context(const Driver& driver, int ordinal);
  ~Context();
  Context(Context&& o) noexcept;
  Context& operator=(Context&&) = delete;
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  void make_current() const;
  void synchronize() const;
  const DeviceInfo& device() const { return info_; }
  const Driver& driver() const { return *driver_; }
  CUcontext handle() const { return ctx_; }
  std::pair<size_t, size_t> mem_info() const;  // (free, total) bytes

 private:
  const Driver* driver_;
  DeviceInfo info_;
  CUdevice device_ = 0;
  CUcontext ctx_ = nullptr;
};

class Stream {
 public:
  explicit Stream(const Driver& driver);  // non-blocking w.r.t. the legacy default stream
  ~Stream();
  Stream(Stream&& o) noexcept : driver_(o.driver_), stream_(std::exchange(o.stream_, nullptr)) {}
  Stream& operator=(Stream&&) = delete;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  void synchronize() const;
  CUstream handle() const { return stream_; }

 private:
  const Driver* driver_;
  CUstream stream_ = nullptr;
};

// Device memory from cuMemAlloc (256-byte aligned). Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const Driver& driver, size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  CUdeviceptr ptr() const { return ptr_; }
  size_t size() const { return bytes_; }
  // Asynchronous on `stream`; the host memory must stay valid until the stream is synchronized.
  // Sizes are checked against the buffer (Error names both).
  void upload(const void* host, size_t bytes, const Stream& stream, size_t offset = 0);
  void download(void* host, size_t bytes, const Stream& stream, size_t offset = 0) const;
  void copy_from(const DeviceBuffer& src, size_t bytes, const Stream& stream);
  void fill_bytes(uint8_t value, const Stream& stream);
  void fill_bytes(uint8_t value, const Stream& stream, size_t offset, size_t bytes);  // a range
  // `count` 32-bit words from `offset` (a multiple of 4) set to `value`, asynchronously (no host
  // memory involved, unlike a small upload).
  void fill_u32(uint32_t value, const Stream& stream, size_t offset, size_t count);

 private:
  void check_range(const char* what, size_t offset, size_t bytes) const;
  const Driver* driver_ = nullptr;
  CUdeviceptr ptr_ = 0;
  size_t bytes_ = 0;
};

// Page-locked host memory (cuMemHostAlloc): copies between it and the device are asynchronous, and
// with unified addressing its address is also what a copy on the device side takes. Move-only.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const Driver& driver, size_t bytes);  // Error naming the size when it cannot be had
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept;
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() const { return ptr_; }
  size_t size() const { return bytes_; }

 private:
  const Driver* driver_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// An asynchronous copy of `bytes` between two addresses of unified addressing (device memory, pinned
// or pageable host memory: cuMemcpyAsync infers the direction; a pageable host side makes it
// synchronous with respect to the host).
void copy_async(const Driver& driver, uint64_t dst, uint64_t src, size_t bytes, const Stream& stream);
// `height` rows of `width` bytes, rows `src_pitch` apart at src and `dst_pitch` apart at dst, in one
// asynchronous 2D copy (unified addresses, as copy_async; pitches at most DeviceInfo::max_pitch).
void copy_2d_async(const Driver& driver, uint64_t dst, size_t dst_pitch, uint64_t src, size_t src_pitch, size_t width,
                   size_t height, const Stream& stream);
// `bytes` of device memory at `dst` set to `value`, asynchronously.
void fill_async(const Driver& driver, uint64_t dst, uint8_t value, size_t bytes, const Stream& stream);

class Event {
 public:
  explicit Event(const Driver& driver);  // with timing
  ~Event();
  Event(Event&& o) noexcept : driver_(o.driver_), event_(std::exchange(o.event_, nullptr)) {}
  Event& operator=(Event&&) = delete;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(const Stream& stream) const;
  void synchronize() const;
  float elapsed_ms_since(const Event& start) const;  // both recorded and complete
  CUevent handle() const { return event_; }

 private:
  const Driver* driver_;
  CUevent event_ = nullptr;
};

// A loaded cubin image. `name` labels errors (e.g. the kernel spec).
class Module {
 public:
  Module(const Driver& driver, std::span<const uint8_t> image, std::string name);
  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  CUfunction function(const std::string& symbol) const;  // Error names the module and symbol
  const std::string& name() const { return name_; }
  const Driver& driver() const { return *driver_; }

 private:
  const Driver* driver_;
  CUmodule module_ = nullptr;
  std::string name_;
};

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct LaunchConfig {
  Dim3 grid, block;
  unsigned smem_bytes = 0;  // dynamic shared memory
  // Programmatic dependent launch: may start before the previous kernel in the stream finished
  // (the kernel must wait with griddepcontrol.wait before reading its predecessor's output).
  bool pdl = false;
};

// A kernel entry point; keeps its module loaded.
class Function {
 public:
  Function(std::shared_ptr<const Module> module, const std::string& symbol);

  void set_max_dynamic_smem(int bytes) const;  // opt-in above 48 KiB
  int attribute(CUfunction_attribute attr) const;
  // Blocks of `threads` threads with `dynamic_smem` bytes of dynamic shared memory that one SM holds at
  // once (cuOccupancyMaxActiveBlocksPerMultiprocessor).
  int max_active_blocks(int threads, size_t dynamic_smem) const;

  // Arguments are passed by value, in the order of the kernel's parameters; their types must match
  // the kernel's (pointers as CUdeviceptr, ints as int, ...).
  template <typename... Args>
  void launch(const LaunchConfig& cfg, const Stream& stream, const Args&... args) const {
    void* params[sizeof...(Args) + 1] = {const_cast<void*>(static_cast<const void*>(&args))...};
    launch_raw(cfg, stream, params);
  }
  void launch_raw(const LaunchConfig& cfg, const Stream& stream, void** params) const;

  CUfunction handle() const { return function_; }
  const std::string& name() const { return name_; }

 private:
  std::shared_ptr<const Module> module_;
  CUfunction function_ = nullptr;
  std::string name_;
};

class GraphExec;

// The nodes of a graph by kind (a captured decode step: one kernel node per launch).
struct GraphNodeCounts {
  int kernels = 0, memcpys = 0, memsets = 0, other = 0;
  int total() const { return kernels + memcpys + memsets + other; }
};

// A captured graph: Graph::capture(stream, [&] { ...launches on stream... }).
class Graph {
 public:
  template <typename F>
  static Graph capture(const Driver& driver, const Stream& stream, F&& record) {
    begin_capture(driver, stream);
    try {
      record();
    } catch (...) {
      abort_capture(driver, stream);
      throw;
    }
    return end_capture(driver, stream);
  }
  ~Graph();
  Graph(Graph&& o) noexcept : driver_(o.driver_), graph_(std::exchange(o.graph_, nullptr)) {}
  Graph& operator=(Graph&&) = delete;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  GraphExec instantiate() const;
  GraphNodeCounts node_counts() const;  // cuGraphGetNodes + cuGraphNodeGetType
  CUgraph handle() const { return graph_; }

 private:
  Graph(const Driver& driver, CUgraph graph) : driver_(&driver), graph_(graph) {}
  static void begin_capture(const Driver& driver, const Stream& stream);
  static void abort_capture(const Driver& driver, const Stream& stream) noexcept;
  static Graph end_capture(const Driver& driver, const Stream& stream);
  const Driver* driver_;
  CUgraph graph_ = nullptr;
};

class GraphExec {
 public:
  ~GraphExec();
  GraphExec(GraphExec&& o) noexcept : driver_(o.driver_), exec_(std::exchange(o.exec_, nullptr)) {}
  GraphExec& operator=(GraphExec&&) = delete;
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;

  void launch(const Stream& stream) const;

 private:
  friend class Graph;
  GraphExec(const Driver& driver, CUgraphExec exec) : driver_(&driver), exec_(exec) {}
  const Driver* driver_;
  CUgraphExec exec_ = nullptr;
};

}  // namespace q35
