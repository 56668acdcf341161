using KernelLM.Native;
using static KernelLM.Native.Cublas;
using static KernelLM.Runtime.Cuda.Check;

namespace KernelLM.Runtime.Cuda.Driver;

// Prefill GEMMs through cuBLAS: one handle per backend, created on first use with the context current and
// destroyed with the backend. Row-major y = x W^T is column-major y^T = W x^T: cublasGemmEx(OP_T, OP_N, m = rows,
// n = tokens, k = cols, A = W (lda = cols), B = x (ldb = cols), C = y (ldc = rows)), fp32 compute, alpha = 1.
public sealed partial class DriverBackend : ICublasBackend
{
    private readonly Lock _cublasLock = new();
    private nint _cublas;
    private string? _cublasState;

    public bool HasCublas => CublasHandle() != 0;

    public string CublasDescription
    {
        get
        {
            _ = CublasHandle();
            return _cublasState!;
        }
    }

    /// <summary>The handle, or 0 when cuBLAS is not usable (the reason in <see cref="_cublasState"/>).</summary>
    private nint CublasHandle()
    {
        lock (_cublasLock)
        {
            if (_cublasState is not null)
            {
                return _cublas;
            }
            if (Environment.GetEnvironmentVariable("KERNELLM_CUBLAS") == "0")
            {
                _cublasState = "off (KERNELLM_CUBLAS=0): the built-in GEMM kernel";
                return 0;
            }
            var info = CublasInfo.Query();
            if (!info.Library.Found)
            {
                _cublasState = $"{info.Library.Describe()}: the built-in GEMM kernel";
                return 0;
            }
            MakeCurrent();
            var status = cublasCreate_v2(out nint handle);
            if (status != cublasStatus_t.CUBLAS_STATUS_SUCCESS)
            {
                _cublasState = $"cublasCreate returned {status}: the built-in GEMM kernel";
                return 0;
            }
            _cublas = handle;
            _cublasState = $"cuBLAS {info.Version}";
            return handle;
        }
    }

    public unsafe void MatmulTransposed(DType dtype, ulong weight, ulong x, ulong y, int rows, int cols, int tokens, float beta, nint stream)
    {
        nint handle = CublasHandle();
        if (handle == 0)
        {
            throw new CudaException($"cuBLAS is not usable: {_cublasState}");
        }
        var type = dtype switch
        {
            DType.F32 => cudaDataType_t.CUDA_R_32F,
            DType.BF16 => cudaDataType_t.CUDA_R_16BF,
            DType.F16 => cudaDataType_t.CUDA_R_16F,
            _ => throw new ArgumentException($"cuBLAS GEMM: {dtype} is not F32, BF16 or F16", nameof(dtype)),
        };
        MakeCurrent();
        float alpha = 1;
        lock (_cublasLock)
        {
            ThrowIfFailed(cublasSetStream_v2(handle, stream));
            ThrowIfFailed(cublasGemmEx(handle, cublasOperation_t.CUBLAS_OP_T, cublasOperation_t.CUBLAS_OP_N, rows, tokens, cols,
                &alpha, weight, type, cols, x, type, cols, &beta, y, type, rows, cublasComputeType_t.CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t.CUBLAS_GEMM_DEFAULT));
        }
        if (SynchronizeAfterLaunch)
        {
            ThrowIfFailed(CudaDriver.cuStreamSynchronize(stream));
        }
    }

    /// <summary>Destroys the cuBLAS handle (from Dispose, with the context current).</summary>
    private void DestroyCublas()
    {
        lock (_cublasLock)
        {
            if (_cublas != 0)
            {
                cublasDestroy_v2(_cublas);
                _cublas = 0;
            }
            _cublasState = "disposed";
        }
    }
}
