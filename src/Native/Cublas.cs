using System.Runtime.InteropServices;

namespace KernelLM.Native;

// cuBLAS (libcublas.so) and cuBLASLt (libcublasLt.so), as cublas_api.h, cublasLt.h and library_types.h declare
// them. Handles are pointers (nint); device pointers are CUdeviceptr values (ulong); alpha/beta point at host
// scalars of the compute type (CUBLAS_POINTER_MODE_HOST, the default).
// cuBLASLt: only the handle and version for now; the Lt matmul (descriptors, layouts, heuristics) comes with
// the GEMM ops that need it.

/// <summary>cublas_api.h's cublasStatus_t (cuBLASLt returns the same codes).</summary>
public enum cublasStatus_t
{
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16,
}

/// <summary>cublas_api.h's cublasOperation_t.</summary>
public enum cublasOperation_t
{
    CUBLAS_OP_N = 0,
    CUBLAS_OP_T = 1,
    CUBLAS_OP_C = 2,
}

/// <summary>library_types.h's cudaDataType_t: the element types KernelLM uses.</summary>
public enum cudaDataType_t
{
    CUDA_R_32F = 0,
    CUDA_R_64F = 1,
    CUDA_R_16F = 2,
    CUDA_R_8I = 3,
    CUDA_R_32I = 10,
    CUDA_R_16BF = 14,
}

/// <summary>cublas_api.h's cublasComputeType_t.</summary>
public enum cublasComputeType_t
{
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_64F_PEDANTIC = 71,
    CUBLAS_COMPUTE_32I = 72,
    CUBLAS_COMPUTE_32I_PEDANTIC = 73,
}

/// <summary>cublas_api.h's cublasGemmAlgo_t (the two values that matter on Ampere and later).</summary>
public enum cublasGemmAlgo_t
{
    CUBLAS_GEMM_DEFAULT = -1,
    CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99,
}

/// <summary>library_types.h's libraryPropertyType (for cublasGetProperty, which needs no handle or device).</summary>
public enum libraryPropertyType
{
    MAJOR_VERSION = 0,
    MINOR_VERSION = 1,
    PATCH_LEVEL = 2,
}

/// <summary>libcublas's exports.</summary>
internal static unsafe partial class Cublas
{
    private const string Library = NativeLibraries.Cublas;

    static Cublas() => NativeLibraries.RegisterResolver();

    [LibraryImport(Library)] public static partial cublasStatus_t cublasCreate_v2(out nint handle);
    [LibraryImport(Library)] public static partial cublasStatus_t cublasDestroy_v2(nint handle);
    [LibraryImport(Library)] public static partial cublasStatus_t cublasSetStream_v2(nint handle, nint streamId);
    [LibraryImport(Library)] public static partial cublasStatus_t cublasGetVersion_v2(nint handle, out int version);
    [LibraryImport(Library)] public static partial cublasStatus_t cublasGetProperty(libraryPropertyType type, out int value);
    /// <summary>Returns a static NUL-terminated string owned by cuBLAS (cuBLAS 11.4.2 and later).</summary>
    [LibraryImport(Library)] public static partial nint cublasGetStatusName(cublasStatus_t status);
    /// <summary>Returns a static NUL-terminated string owned by cuBLAS (cuBLAS 11.4.2 and later).</summary>
    [LibraryImport(Library)] public static partial nint cublasGetStatusString(cublasStatus_t status);

    /// <summary>Column-major C = alpha op(A) op(B) + beta C; A, B, C are device addresses.</summary>
#pragma warning disable CA1711 // the C name, verbatim
    [LibraryImport(Library)]
    public static partial cublasStatus_t cublasGemmEx(nint handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
        void* alpha, ulong A, cudaDataType_t Atype, int lda, ulong B, cudaDataType_t Btype, int ldb,
        void* beta, ulong C, cudaDataType_t Ctype, int ldc, cublasComputeType_t computeType, cublasGemmAlgo_t algo);
#pragma warning restore CA1711
}

/// <summary>libcublasLt's exports (handle and version; the matmul API is not bound yet).</summary>
internal static partial class CublasLt
{
    private const string Library = NativeLibraries.CublasLt;

    static CublasLt() => NativeLibraries.RegisterResolver();

    [LibraryImport(Library)] public static partial cublasStatus_t cublasLtCreate(out nint lightHandle);
    [LibraryImport(Library)] public static partial cublasStatus_t cublasLtDestroy(nint lightHandle);
    /// <summary>The cuBLASLt version as one number (CUBLAS_VERSION's encoding, which changed between CUDA 11 and 12).</summary>
    [LibraryImport(Library)] public static partial nuint cublasLtGetVersion();
}
