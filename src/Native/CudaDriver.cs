using System.Runtime.InteropServices;

namespace KernelLM.Native;

// The CUDA driver API (libcuda.so.1), as cuda.h declares it. Names, parameter names and values are cuda.h's,
// verbatim; the `_v2` suffixes are the exported symbols that cuda.h's macros map the plain names to.
// Handle types are pointers (CUcontext, CUmodule, CUfunction, CUstream, CUevent, CUgraph, CUgraphExec: nint),
// CUdevice is an int and CUdeviceptr a 64-bit integer (ulong). Checking results is the caller's job
// (KernelLM.Runtime.Cuda.Check).

/// <summary>cuda.h's CUresult. The values listed are every code a 535 driver names through cuGetErrorName;
/// newer drivers may return codes not listed here (ask cuGetErrorName for their names).</summary>
public enum CUresult
{
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_DEINITIALIZED = 4,
    CUDA_ERROR_PROFILER_DISABLED = 5,
    CUDA_ERROR_PROFILER_NOT_INITIALIZED = 6,
    CUDA_ERROR_PROFILER_ALREADY_STARTED = 7,
    CUDA_ERROR_PROFILER_ALREADY_STOPPED = 8,
    CUDA_ERROR_STUB_LIBRARY = 34,
    CUDA_ERROR_DEVICE_UNAVAILABLE = 46,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_DEVICE_NOT_LICENSED = 102,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_CONTEXT_ALREADY_CURRENT = 202,
    CUDA_ERROR_MAP_FAILED = 205,
    CUDA_ERROR_UNMAP_FAILED = 206,
    CUDA_ERROR_ARRAY_IS_MAPPED = 207,
    CUDA_ERROR_ALREADY_MAPPED = 208,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_ALREADY_ACQUIRED = 210,
    CUDA_ERROR_NOT_MAPPED = 211,
    CUDA_ERROR_NOT_MAPPED_AS_ARRAY = 212,
    CUDA_ERROR_NOT_MAPPED_AS_POINTER = 213,
    CUDA_ERROR_ECC_UNCORRECTABLE = 214,
    CUDA_ERROR_UNSUPPORTED_LIMIT = 215,
    CUDA_ERROR_CONTEXT_ALREADY_IN_USE = 216,
    CUDA_ERROR_PEER_ACCESS_UNSUPPORTED = 217,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_GRAPHICS_CONTEXT = 219,
    CUDA_ERROR_NVLINK_UNCORRECTABLE = 220,
    CUDA_ERROR_JIT_COMPILER_NOT_FOUND = 221,
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    CUDA_ERROR_JIT_COMPILATION_DISABLED = 223,
    CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY = 224,
    CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC = 225,
    CUDA_ERROR_INVALID_SOURCE = 300,
    CUDA_ERROR_FILE_NOT_FOUND = 301,
    CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND = 302,
    CUDA_ERROR_SHARED_OBJECT_INIT_FAILED = 303,
    CUDA_ERROR_OPERATING_SYSTEM = 304,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_TIMEOUT = 702,
    CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING = 703,
    CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED = 704,
    CUDA_ERROR_PEER_ACCESS_NOT_ENABLED = 705,
    CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE = 708,
    CUDA_ERROR_CONTEXT_IS_DESTROYED = 709,
    CUDA_ERROR_ASSERT = 710,
    CUDA_ERROR_TOO_MANY_PEERS = 711,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_HARDWARE_STACK_ERROR = 714,
    CUDA_ERROR_ILLEGAL_INSTRUCTION = 715,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_INVALID_ADDRESS_SPACE = 717,
    CUDA_ERROR_INVALID_PC = 718,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE = 720,
    CUDA_ERROR_NOT_PERMITTED = 800,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_SYSTEM_NOT_READY = 802,
    CUDA_ERROR_SYSTEM_DRIVER_MISMATCH = 803,
    CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE = 804,
    CUDA_ERROR_MPS_CONNECTION_FAILED = 805,
    CUDA_ERROR_MPS_RPC_FAILURE = 806,
    CUDA_ERROR_MPS_SERVER_NOT_READY = 807,
    CUDA_ERROR_MPS_MAX_CLIENTS_REACHED = 808,
    CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED = 809,
    CUDA_ERROR_MPS_CLIENT_TERMINATED = 810,
    CUDA_ERROR_CDP_NOT_SUPPORTED = 811,
    CUDA_ERROR_CDP_VERSION_MISMATCH = 812,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_MERGE = 902,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_UNJOINED = 904,
    CUDA_ERROR_STREAM_CAPTURE_ISOLATION = 905,
    CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906,
    CUDA_ERROR_CAPTURED_EVENT = 907,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
    CUDA_ERROR_TIMEOUT = 909,
    CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE = 910,
    CUDA_ERROR_EXTERNAL_DEVICE = 911,
    CUDA_ERROR_INVALID_CLUSTER_SIZE = 912,
    CUDA_ERROR_UNKNOWN = 999,
}

/// <summary>cuda.h's CUdevice_attribute: the attributes KernelLM reads (values from cuda.h).</summary>
public enum CUdevice_attribute
{
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY = 9,
    CU_DEVICE_ATTRIBUTE_WARP_SIZE = 10,
    CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK = 12,
    CU_DEVICE_ATTRIBUTE_CLOCK_RATE = 13,
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CU_DEVICE_ATTRIBUTE_INTEGRATED = 18,
    CU_DEVICE_ATTRIBUTE_COMPUTE_MODE = 20,
    CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS = 31,
    CU_DEVICE_ATTRIBUTE_ECC_ENABLED = 32,
    CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33,
    CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34,
    CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE = 36,
    CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH = 37,
    CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38,
    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR = 39,
    CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING = 41,
    CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81,
    CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR = 82,
    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
    CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR = 106,
}

/// <summary>cuda.h's CUfunction_attribute.</summary>
public enum CUfunction_attribute
{
    CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0,
    CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1,
    CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES = 2,
    CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3,
    CU_FUNC_ATTRIBUTE_NUM_REGS = 4,
    CU_FUNC_ATTRIBUTE_PTX_VERSION = 5,
    CU_FUNC_ATTRIBUTE_BINARY_VERSION = 6,
    CU_FUNC_ATTRIBUTE_CACHE_MODE_CA = 7,
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9,
}

/// <summary>cuda.h's CUstreamCaptureMode.</summary>
public enum CUstreamCaptureMode
{
    CU_STREAM_CAPTURE_MODE_GLOBAL = 0,
    CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1,
    CU_STREAM_CAPTURE_MODE_RELAXED = 2,
}

/// <summary>Flags of cuStreamCreate, cuEventCreate, cuMemHostAlloc and cuGraphInstantiateWithFlags (cuda.h's #defines and enums).</summary>
public static class CudaFlags
{
    public const uint CU_STREAM_DEFAULT = 0x0;
    public const uint CU_STREAM_NON_BLOCKING = 0x1;

    public const uint CU_EVENT_DEFAULT = 0x0;
    public const uint CU_EVENT_BLOCKING_SYNC = 0x1;
    public const uint CU_EVENT_DISABLE_TIMING = 0x2;

    public const uint CU_MEMHOSTALLOC_PORTABLE = 0x01;
    public const uint CU_MEMHOSTALLOC_DEVICEMAP = 0x02;
    public const uint CU_MEMHOSTALLOC_WRITECOMBINED = 0x04;

    public const ulong CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH = 1;
    public const ulong CUDA_GRAPH_INSTANTIATE_FLAG_UPLOAD = 2;
    public const ulong CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH = 4;
    public const ulong CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY = 8;
}

/// <summary>libcuda's exports. Every function returns a <see cref="CUresult"/>.</summary>
internal static unsafe partial class CudaDriver
{
    private const string Library = NativeLibraries.Cuda;

    static CudaDriver() => NativeLibraries.RegisterResolver();

    // ---------------------------------------------------------------- initialisation, errors

    [LibraryImport(Library)] public static partial CUresult cuInit(uint Flags);
    [LibraryImport(Library)] public static partial CUresult cuDriverGetVersion(out int driverVersion);
    /// <summary>pStr: a static NUL-terminated string owned by the driver (never freed).</summary>
    [LibraryImport(Library)] public static partial CUresult cuGetErrorName(CUresult error, out nint pStr);
    /// <summary>pStr: a static NUL-terminated string owned by the driver (never freed).</summary>
    [LibraryImport(Library)] public static partial CUresult cuGetErrorString(CUresult error, out nint pStr);

    // ---------------------------------------------------------------- devices, contexts

    [LibraryImport(Library)] public static partial CUresult cuDeviceGetCount(out int count);
    [LibraryImport(Library)] public static partial CUresult cuDeviceGet(out int device, int ordinal);
    [LibraryImport(Library)] public static partial CUresult cuDeviceGetName(byte* name, int len, int dev);
    [LibraryImport(Library)] public static partial CUresult cuDeviceGetAttribute(out int pi, CUdevice_attribute attrib, int dev);
    [LibraryImport(Library)] public static partial CUresult cuDeviceTotalMem_v2(out nuint bytes, int dev);
    [LibraryImport(Library)] public static partial CUresult cuDevicePrimaryCtxRetain(out nint pctx, int dev);
    [LibraryImport(Library)] public static partial CUresult cuDevicePrimaryCtxRelease_v2(int dev);
    [LibraryImport(Library)] public static partial CUresult cuCtxSetCurrent(nint ctx);
    [LibraryImport(Library)] public static partial CUresult cuCtxSynchronize();

    // ---------------------------------------------------------------- memory

    [LibraryImport(Library)] public static partial CUresult cuMemAlloc_v2(out ulong dptr, nuint bytesize);
    [LibraryImport(Library)] public static partial CUresult cuMemFree_v2(ulong dptr);
    [LibraryImport(Library)] public static partial CUresult cuMemGetInfo_v2(out nuint free, out nuint total);
    [LibraryImport(Library)] public static partial CUresult cuMemHostAlloc(out nint pp, nuint bytesize, uint Flags);
    [LibraryImport(Library)] public static partial CUresult cuMemFreeHost(nint p);
    [LibraryImport(Library)] public static partial CUresult cuMemcpyHtoD_v2(ulong dstDevice, void* srcHost, nuint ByteCount);
    [LibraryImport(Library)] public static partial CUresult cuMemcpyDtoH_v2(void* dstHost, ulong srcDevice, nuint ByteCount);
    [LibraryImport(Library)] public static partial CUresult cuMemcpyDtoD_v2(ulong dstDevice, ulong srcDevice, nuint ByteCount);
    [LibraryImport(Library)] public static partial CUresult cuMemcpyHtoDAsync_v2(ulong dstDevice, void* srcHost, nuint ByteCount, nint hStream);
    [LibraryImport(Library)] public static partial CUresult cuMemcpyDtoHAsync_v2(void* dstHost, ulong srcDevice, nuint ByteCount, nint hStream);
    [LibraryImport(Library)] public static partial CUresult cuMemcpyDtoDAsync_v2(ulong dstDevice, ulong srcDevice, nuint ByteCount, nint hStream);
    [LibraryImport(Library)] public static partial CUresult cuMemsetD8_v2(ulong dstDevice, byte uc, nuint N);
    [LibraryImport(Library)] public static partial CUresult cuMemsetD8Async(ulong dstDevice, byte uc, nuint N, nint hStream);

    // ---------------------------------------------------------------- streams, events

    [LibraryImport(Library)] public static partial CUresult cuStreamCreate(out nint phStream, uint Flags);
    [LibraryImport(Library)] public static partial CUresult cuStreamDestroy_v2(nint hStream);
    [LibraryImport(Library)] public static partial CUresult cuStreamSynchronize(nint hStream);
    [LibraryImport(Library)] public static partial CUresult cuEventCreate(out nint phEvent, uint Flags);
    [LibraryImport(Library)] public static partial CUresult cuEventRecord(nint hEvent, nint hStream);
    [LibraryImport(Library)] public static partial CUresult cuEventSynchronize(nint hEvent);
    [LibraryImport(Library)] public static partial CUresult cuEventElapsedTime(out float pMilliseconds, nint hStart, nint hEnd);
    [LibraryImport(Library)] public static partial CUresult cuEventDestroy_v2(nint hEvent);

    // ---------------------------------------------------------------- modules, launches

    /// <summary>image: a CUBIN, or NUL-terminated PTX text.</summary>
    [LibraryImport(Library)] public static partial CUresult cuModuleLoadData(out nint module, void* image);
    [LibraryImport(Library)] public static partial CUresult cuModuleUnload(nint hmod);
    [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)] public static partial CUresult cuModuleGetFunction(out nint hfunc, nint hmod, string name);
    [LibraryImport(Library)] public static partial CUresult cuFuncSetAttribute(nint hfunc, CUfunction_attribute attrib, int value);
    [LibraryImport(Library)] public static partial CUresult cuFuncGetAttribute(out int pi, CUfunction_attribute attrib, nint hfunc);

    /// <summary>kernelParams: one pointer per kernel argument, pointing at the argument's value; extra: null.</summary>
    [LibraryImport(Library)]
    public static partial CUresult cuLaunchKernel(nint f, uint gridDimX, uint gridDimY, uint gridDimZ, uint blockDimX, uint blockDimY, uint blockDimZ,
        uint sharedMemBytes, nint hStream, void** kernelParams, void** extra);

    // ---------------------------------------------------------------- CUDA graphs (stream capture)

    [LibraryImport(Library)] public static partial CUresult cuStreamBeginCapture_v2(nint hStream, CUstreamCaptureMode mode);
    [LibraryImport(Library)] public static partial CUresult cuStreamEndCapture(nint hStream, out nint phGraph);
    [LibraryImport(Library)] public static partial CUresult cuGraphInstantiateWithFlags(out nint phGraphExec, nint hGraph, ulong flags);
    [LibraryImport(Library)] public static partial CUresult cuGraphLaunch(nint hGraphExec, nint hStream);
    [LibraryImport(Library)] public static partial CUresult cuGraphExecDestroy(nint hGraphExec);
    [LibraryImport(Library)] public static partial CUresult cuGraphDestroy(nint hGraph);
}
