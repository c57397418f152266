#include "runtime/cuda/driver.h"

#include <dlfcn.h>
#include <fmt/format.h>

#include <vector>

#include "runtime/core/error.h"

namespace q35 {

namespace {

// cuGetProcAddress_v2 (CUDA >= 12.0); looked up with dlsym, everything else through it.
using GetProcAddressFn = CUresult (*)(const char*, void**, int, cuuint64_t,
                                      CUdriverProcAddressQueryResult*);

}  // namespace

std::string DeviceInfo::arch() const {
  if (cc_major == 9 && cc_minor == 0) return "sm_90a";
  return fmt::format("sm_{}{}", cc_major, cc_minor);
}

Driver::Driver(const std::string& library) : library_(library) {
  handle_ = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle_) {
    const char* why = dlerror();
    fail("no CUDA driver found: cannot load {}: {}", library, why ? why : "unknown dlopen error");
  }
  // From here on the handle must be closed if construction fails.
  try {
    auto get_proc = reinterpret_cast<GetProcAddressFn>(dlsym(handle_, "cuGetProcAddress_v2"));
    if (!get_proc)
      fail("no CUDA driver found: {} has no cuGetProcAddress_v2 (a driver for CUDA >= 12.0 is required)",
           library);
    auto resolve = [&](const char* symbol, auto& fn) {
      void* p = nullptr;
      CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SUCCESS;
      CUresult r = get_proc(symbol, &p, CUDA_VERSION, CU_GET_PROC_ADDRESS_DEFAULT, &status);
      if (r == CUDA_ERROR_STUB_LIBRARY)
        fail("no CUDA driver found: {} is the CUDA toolkit's link stub (CUDA_ERROR_STUB_LIBRARY), "
             "not an NVIDIA driver",
             library);
      if (r != CUDA_SUCCESS || status != CU_GET_PROC_ADDRESS_SUCCESS || !p)
        fail("no CUDA driver found: {} does not provide {} for CUDA {}.{} (cuGetProcAddress returned "
             "CUresult {}, status {}); the driver is too old for this build",
             library, symbol, CUDA_VERSION / 1000, CUDA_VERSION % 1000 / 10, int(r), int(status));
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    resolve("cuGetErrorName", api_.get_error_name);
    resolve("cuGetErrorString", api_.get_error_string);
    resolve("cuInit", api_.init);
    resolve("cuDriverGetVersion", api_.driver_get_version);

    CUresult r = api_.init(0);
    if (r == CUDA_ERROR_NO_DEVICE)
      fail("no CUDA device found: cuInit(0) returned {} ({})", error_name(r), library);
    if (r != CUDA_SUCCESS)
      fail("no CUDA driver found: cuInit(0) failed: {} ({})", error_name(r), library);
    check(api_.driver_get_version(&version_), "cuDriverGetVersion");

    resolve("cuDeviceGetCount", api_.device_get_count);
    resolve("cuDeviceGet", api_.device_get);
    resolve("cuDeviceGetName", api_.device_get_name);
    resolve("cuDeviceGetAttribute", api_.device_get_attribute);
    resolve("cuDeviceTotalMem", api_.device_total_mem);
    resolve("cuDevicePrimaryCtxRetain", api_.primary_ctx_retain);
    resolve("cuDevicePrimaryCtxRelease", api_.primary_ctx_release);
    resolve("cuCtxSetCurrent", api_.ctx_set_current);
    resolve("cuCtxSynchronize", api_.ctx_synchronize);
    resolve("cuMemGetInfo", api_.mem_get_info);
    resolve("cuMemAlloc", api_.mem_alloc);
    resolve("cuMemFree", api_.mem_free);
    resolve("cuMemcpyHtoDAsync", api_.memcpy_htod_async);
    resolve("cuMemcpyDtoHAsync", api_.memcpy_dtoh_async);
    resolve("cuMemcpyDtoDAsync", api_.memcpy_dtod_async);
    resolve("cuMemcpyAsync", api_.memcpy_async);
    resolve("cuMemcpy2DAsync", api_.memcpy_2d_async);
    resolve("cuMemsetD8Async", api_.memset_d8_async);
    resolve("cuMemsetD32Async", api_.memset_d32_async);
    resolve("cuMemHostAlloc", api_.mem_host_alloc);
    resolve("cuMemFreeHost", api_.mem_free_host);
    resolve("cuStreamCreate", api_.stream_create);
    resolve("cuStreamDestroy", api_.stream_destroy);
    resolve("cuStreamSynchronize", api_.stream_synchronize);
    resolve("cuEventCreate", api_.event_create);
    resolve("cuEventDestroy", api_.event_destroy);
    resolve("cuEventRecord", api_.event_record);
    resolve("cuEventSynchronize", api_.event_synchronize);
    resolve("cuEventElapsedTime", api_.event_elapsed_time);
    resolve("cuModuleLoadData", api_.module_load_data);
    resolve("cuModuleGetFunction", api_.module_get_function);
    resolve("cuModuleUnload", api_.module_unload);
    resolve("cuFuncSetAttribute", api_.func_set_attribute);
    resolve("cuFuncGetAttribute", api_.func_get_attribute);
    resolve("cuOccupancyMaxActiveBlocksPerMultiprocessor", api_.occupancy_max_active_blocks);
    resolve("cuLaunchKernelEx", api_.launch_kernel_ex);
    resolve("cuStreamBeginCapture", api_.stream_begin_capture);
    resolve("cuStreamEndCapture", api_.stream_end_capture);
    resolve("cuGraphInstantiateWithFlags", api_.graph_instantiate);
    resolve("cuGraphLaunch", api_.graph_launch);
    resolve("cuGraphDestroy", api_.graph_destroy);
    resolve("cuGraphExecDestroy", api_.graph_exec_destroy);
    resolve("cuGraphGetNodes", api_.graph_get_nodes);
    resolve("cuGraphNodeGetType", api_.graph_node_get_type);
    resolve("cuProfilerStart", api_.profiler_start);
    resolve("cuProfilerStop", api_.profiler_stop);

    if (device_count() == 0)
      fail("no CUDA device found: the driver ({}, CUDA {}.{}) reports 0 devices", library,
           version_ / 1000, version_ % 1000 / 10);
  } catch (...) {
    dlclose(handle_);
    throw;
  }
}

Driver::~Driver() { dlclose(handle_); }

std::string Driver::error_name(CUresult r) const {
  const char* name = nullptr;
  const char* text = nullptr;
  if (api_.get_error_name) api_.get_error_name(r, &name);
  if (api_.get_error_string) api_.get_error_string(r, &text);
  if (!name) return fmt::format("CUresult {}", int(r));
  return text ? fmt::format("{} ({})", name, text) : std::string(name);
}

void Driver::check(CUresult r, const char* what) const {
  if (r != CUDA_SUCCESS) fail("{} failed: {}", what, error_name(r));
}

int Driver::device_count() const {
  int n = 0;
  check(api_.device_get_count(&n), "cuDeviceGetCount");
  return n;
}

DeviceInfo Driver::device_info(int ordinal) const {
  int count = device_count();
  if (ordinal < 0 || ordinal >= count)
    fail("CUDA device {} requested, but the driver reports {} device(s)", ordinal, count);
  CUdevice dev = 0;
  check(api_.device_get(&dev, ordinal), "cuDeviceGet");
  DeviceInfo info;
  info.ordinal = ordinal;
  char name[256] = {};
  check(api_.device_get_name(name, sizeof(name) - 1, dev), "cuDeviceGetName");
  info.name = name;
  check(api_.device_get_attribute(&info.cc_major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
  check(api_.device_get_attribute(&info.cc_minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
  check(api_.device_get_attribute(&info.sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
        "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)");
  check(api_.device_total_mem(&info.total_mem, dev), "cuDeviceTotalMem");
  int pitch = 0;
  check(api_.device_get_attribute(&pitch, CU_DEVICE_ATTRIBUTE_MAX_PITCH, dev), "cuDeviceGetAttribute(MAX_PITCH)");
  info.max_pitch = size_t(unsigned(pitch));
  return info;
}

// ---- Context ----

Context::Context(const Driver& driver, int ordinal) : driver_(&driver), info_(driver.device_info(ordinal)) {
  driver.check(driver.api().device_get(&device_, ordinal), "cuDeviceGet");
  driver.check(driver.api().primary_ctx_retain(&ctx_, device_),
               fmt::format("cuDevicePrimaryCtxRetain(device {})", ordinal).c_str());
  try {
    make_current();
  } catch (...) {
    driver.api().primary_ctx_release(device_);
    throw;
  }
}

Context::Context(Context&& o) noexcept
    : driver_(o.driver_), info_(std::move(o.info_)), device_(o.device_), ctx_(std::exchange(o.ctx_, nullptr)) {}

Context::~Context() {
  if (ctx_) driver_->api().primary_ctx_release(device_);
}

void Context::make_current() const { driver_->check(driver_->api().ctx_set_current(ctx_), "cuCtxSetCurrent"); }

void Context::synchronize() const { driver_->check(driver_->api().ctx_synchronize(), "cuCtxSynchronize"); }

std::pair<size_t, size_t> Context::mem_info() const {
  size_t free_bytes = 0, total_bytes = 0;
  driver_->check(driver_->api().mem_get_info(&free_bytes, &total_bytes), "cuMemGetInfo");
  return {free_bytes, total_bytes};
}

// ---- Stream ----

Stream::Stream(const Driver& driver) : driver_(&driver) {
  driver.check(driver.api().stream_create(&stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
}

Stream::~Stream() {
  if (stream_) driver_->api().stream_destroy(stream_);
}

void Stream::synchronize() const { driver_->check(driver_->api().stream_synchronize(stream_), "cuStreamSynchronize"); }

// ---- DeviceBuffer ----

DeviceBuffer::DeviceBuffer(const Driver& driver, size_t bytes) : driver_(&driver), bytes_(bytes) {
  if (bytes == 0) return;
  CUresult r = driver.api().mem_alloc(&ptr_, bytes);
  if (r != CUDA_SUCCESS) fail("cuMemAlloc({} bytes) failed: {}", bytes, driver.error_name(r));
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) driver_->api().mem_free(ptr_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : driver_(o.driver_), ptr_(std::exchange(o.ptr_, 0)), bytes_(std::exchange(o.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) driver_->api().mem_free(ptr_);
    driver_ = o.driver_;
    ptr_ = std::exchange(o.ptr_, 0);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::check_range(const char* what, size_t offset, size_t bytes) const {
  if (offset > bytes_ || bytes > bytes_ - offset)
    fail("{}: {} bytes at offset {} do not fit a device buffer of {} bytes", what, bytes, offset, bytes_);
}

void DeviceBuffer::upload(const void* host, size_t bytes, const Stream& stream, size_t offset) {
  check_range("upload", offset, bytes);
  if (bytes == 0) return;
  driver_->check(driver_->api().memcpy_htod_async(ptr_ + offset, host, bytes, stream.handle()),
                 "cuMemcpyHtoDAsync");
}

void DeviceBuffer::download(void* host, size_t bytes, const Stream& stream, size_t offset) const {
  check_range("download", offset, bytes);
  if (bytes == 0) return;
  driver_->check(driver_->api().memcpy_dtoh_async(host, ptr_ + offset, bytes, stream.handle()),
                 "cuMemcpyDtoHAsync");
}

void DeviceBuffer::copy_from(const DeviceBuffer& src, size_t bytes, const Stream& stream) {
  check_range("device copy (destination)", 0, bytes);
  src.check_range("device copy (source)", 0, bytes);
  if (bytes == 0) return;
  driver_->check(driver_->api().memcpy_dtod_async(ptr_, src.ptr_, bytes, stream.handle()), "cuMemcpyDtoDAsync");
}

void DeviceBuffer::fill_bytes(uint8_t value, const Stream& stream) { fill_bytes(value, stream, 0, bytes_); }

void DeviceBuffer::fill_bytes(uint8_t value, const Stream& stream, size_t offset, size_t bytes) {
  if (bytes == 0) return;
  check_range("fill_bytes", offset, bytes);
  driver_->check(driver_->api().memset_d8_async(ptr_ + offset, value, bytes, stream.handle()), "cuMemsetD8Async");
}

void DeviceBuffer::fill_u32(uint32_t value, const Stream& stream, size_t offset, size_t count) {
  if (count == 0) return;
  if (offset % 4) fail("fill_u32: offset {} is not a multiple of 4", offset);
  check_range("fill_u32", offset, count * 4);
  driver_->check(driver_->api().memset_d32_async(ptr_ + offset, value, count, stream.handle()), "cuMemsetD32Async");
}

// ---- PinnedBuffer ----

PinnedBuffer::PinnedBuffer(const Driver& driver, size_t bytes) : driver_(&driver), bytes_(bytes) {
  if (bytes == 0) return;
  CUresult r = driver.api().mem_host_alloc(&ptr_, bytes, 0);
  if (r != CUDA_SUCCESS) {
    ptr_ = nullptr;
    fail("cuMemHostAlloc({} bytes of pinned host memory) failed: {}", bytes, driver.error_name(r));
  }
}

PinnedBuffer::~PinnedBuffer() {
  if (ptr_) driver_->api().mem_free_host(ptr_);
}

PinnedBuffer::PinnedBuffer(PinnedBuffer&& o) noexcept
    : driver_(o.driver_), ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) driver_->api().mem_free_host(ptr_);
    driver_ = o.driver_;
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void copy_async(const Driver& driver, uint64_t dst, uint64_t src, size_t bytes, const Stream& stream) {
  if (bytes == 0) return;
  driver.check(driver.api().memcpy_async(CUdeviceptr(dst), CUdeviceptr(src), bytes, stream.handle()),
               "cuMemcpyAsync");
}

void copy_2d_async(const Driver& driver, uint64_t dst, size_t dst_pitch, uint64_t src, size_t src_pitch, size_t width,
                   size_t height, const Stream& stream) {
  if (width == 0 || height == 0) return;
  CUDA_MEMCPY2D c = {};
  c.srcMemoryType = CU_MEMORYTYPE_UNIFIED;
  c.srcDevice = CUdeviceptr(src);
  c.srcPitch = src_pitch;
  c.dstMemoryType = CU_MEMORYTYPE_UNIFIED;
  c.dstDevice = CUdeviceptr(dst);
  c.dstPitch = dst_pitch;
  c.WidthInBytes = width;
  c.Height = height;
  driver.check(driver.api().memcpy_2d_async(&c, stream.handle()), "cuMemcpy2DAsync");
}

void fill_async(const Driver& driver, uint64_t dst, uint8_t value, size_t bytes, const Stream& stream) {
  if (bytes == 0) return;
  driver.check(driver.api().memset_d8_async(CUdeviceptr(dst), value, bytes, stream.handle()), "cuMemsetD8Async");
}

// ---- Event ----

Event::Event(const Driver& driver) : driver_(&driver) {
  driver.check(driver.api().event_create(&event_, CU_EVENT_DEFAULT), "cuEventCreate");
}

Event::~Event() {
  if (event_) driver_->api().event_destroy(event_);
}

void Event::record(const Stream& stream) const {
  driver_->check(driver_->api().event_record(event_, stream.handle()), "cuEventRecord");
}

void Event::synchronize() const { driver_->check(driver_->api().event_synchronize(event_), "cuEventSynchronize"); }

float Event::elapsed_ms_since(const Event& start) const {
  float ms = 0;
  driver_->check(driver_->api().event_elapsed_time(&ms, start.event_, event_), "cuEventElapsedTime");
  return ms;
}

// ---- Module / Function ----

Module::Module(const Driver& driver, std::span<const uint8_t> image, std::string name)
    : driver_(&driver), name_(std::move(name)) {
  CUresult r = driver.api().module_load_data(&module_, image.data());
  if (r != CUDA_SUCCESS)
    fail("cuModuleLoadData({}, {} bytes) failed: {} (driver CUDA {}.{})", name_, image.size(),
         driver.error_name(r), driver.version() / 1000, driver.version() % 1000 / 10);
}

Module::~Module() {
  if (module_) driver_->api().module_unload(module_);
}

CUfunction Module::function(const std::string& symbol) const {
  CUfunction f = nullptr;
  CUresult r = driver_->api().module_get_function(&f, module_, symbol.c_str());
  if (r != CUDA_SUCCESS)
    fail("cuModuleGetFunction({}, symbol {}) failed: {}", name_, symbol, driver_->error_name(r));
  return f;
}

Function::Function(std::shared_ptr<const Module> module, const std::string& symbol)
    : module_(std::move(module)), function_(module_->function(symbol)), name_(module_->name()) {}

void Function::set_max_dynamic_smem(int bytes) const {
  const Driver& d = module_->driver();
  CUresult r = d.api().func_set_attribute(function_, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes);
  if (r != CUDA_SUCCESS)
    fail("cuFuncSetAttribute({}, MAX_DYNAMIC_SHARED_SIZE_BYTES = {}) failed: {}", name_, bytes, d.error_name(r));
}

int Function::attribute(CUfunction_attribute attr) const {
  int value = 0;
  module_->driver().check(module_->driver().api().func_get_attribute(&value, attr, function_), "cuFuncGetAttribute");
  return value;
}

int Function::max_active_blocks(int threads, size_t dynamic_smem) const {
  int blocks = 0;
  module_->driver().check(
      module_->driver().api().occupancy_max_active_blocks(&blocks, function_, threads, dynamic_smem),
      "cuOccupancyMaxActiveBlocksPerMultiprocessor");
  return blocks;
}

void Function::launch_raw(const LaunchConfig& cfg, const Stream& stream, void** params) const {
  CUlaunchAttribute attrs[1] = {};
  CUlaunchConfig lc = {};
  lc.gridDimX = cfg.grid.x;
  lc.gridDimY = cfg.grid.y;
  lc.gridDimZ = cfg.grid.z;
  lc.blockDimX = cfg.block.x;
  lc.blockDimY = cfg.block.y;
  lc.blockDimZ = cfg.block.z;
  lc.sharedMemBytes = cfg.smem_bytes;
  lc.hStream = stream.handle();
  if (cfg.pdl) {
    attrs[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[0].value.programmaticStreamSerializationAllowed = 1;
    lc.attrs = attrs;
    lc.numAttrs = 1;
  }
  const Driver& d = module_->driver();
  CUresult r = d.api().launch_kernel_ex(&lc, function_, params, nullptr);
  if (r != CUDA_SUCCESS)
    fail("cuLaunchKernelEx({}, grid [{}, {}, {}], block [{}, {}, {}], smem {} B) failed: {}", name_, cfg.grid.x,
         cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z, cfg.smem_bytes, d.error_name(r));
}

// ---- Graph ----

void Graph::begin_capture(const Driver& driver, const Stream& stream) {
  driver.check(driver.api().stream_begin_capture(stream.handle(), CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
               "cuStreamBeginCapture");
}

void Graph::abort_capture(const Driver& driver, const Stream& stream) noexcept {
  CUgraph partial = nullptr;
  if (driver.api().stream_end_capture(stream.handle(), &partial) == CUDA_SUCCESS && partial)
    driver.api().graph_destroy(partial);
}

Graph Graph::end_capture(const Driver& driver, const Stream& stream) {
  CUgraph graph = nullptr;
  driver.check(driver.api().stream_end_capture(stream.handle(), &graph), "cuStreamEndCapture");
  return Graph(driver, graph);
}

Graph::~Graph() {
  if (graph_) driver_->api().graph_destroy(graph_);
}

GraphExec Graph::instantiate() const {
  CUgraphExec exec = nullptr;
  driver_->check(driver_->api().graph_instantiate(&exec, graph_, 0), "cuGraphInstantiate");
  return GraphExec(*driver_, exec);
}

GraphNodeCounts Graph::node_counts() const {
  size_t n = 0;
  driver_->check(driver_->api().graph_get_nodes(graph_, nullptr, &n), "cuGraphGetNodes");
  std::vector<CUgraphNode> nodes(n);
  if (n) driver_->check(driver_->api().graph_get_nodes(graph_, nodes.data(), &n), "cuGraphGetNodes");
  GraphNodeCounts c;
  for (size_t i = 0; i < n; ++i) {
    CUgraphNodeType type{};
    driver_->check(driver_->api().graph_node_get_type(nodes[i], &type), "cuGraphNodeGetType");
    switch (type) {
      case CU_GRAPH_NODE_TYPE_KERNEL: ++c.kernels; break;
      case CU_GRAPH_NODE_TYPE_MEMCPY: ++c.memcpys; break;
      case CU_GRAPH_NODE_TYPE_MEMSET: ++c.memsets; break;
      default: ++c.other; break;
    }
  }
  return c;
}

GraphExec::~GraphExec() {
  if (exec_) driver_->api().graph_exec_destroy(exec_);
}

void GraphExec::launch(const Stream& stream) const {
  driver_->check(driver_->api().graph_launch(exec_, stream.handle()), "cuGraphLaunch");
}

}  // namespace q35
