namespace KernelLM.Runtime.Cuda;

/// <summary>
/// A backend that can run dense matrix products through cuBLAS (the driver backend, when libcublas loads and a
/// handle can be created on its device). The emulated device has none: its prefill GEMMs are the built-in kernel.
/// </summary>
public interface ICublasBackend
{
    /// <summary>Whether cuBLAS is usable here (probed once; false when libcublas is missing or refuses the device).</summary>
    bool HasCublas { get; }

    /// <summary>"cuBLAS 12.4.5", or why it is not used.</summary>
    string CublasDescription { get; }

    /// <summary>
    /// Row-major y[tokens, rows] = x[tokens, cols] · W[rows, cols]^T + beta · y, all three in <paramref name="dtype"/>
    /// (F32, BF16 or F16), fp32 accumulation (CUBLAS_COMPUTE_32F), enqueued on <paramref name="stream"/>.
    /// </summary>
    void MatmulTransposed(DType dtype, ulong weight, ulong x, ulong y, int rows, int cols, int tokens, float beta, nint stream);
}
