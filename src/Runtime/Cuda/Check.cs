using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using KernelLM.Native;

namespace KernelLM.Runtime.Cuda;

/// <summary>
/// One ThrowIfFailed per native library: the enum name, the library's own error string and the failing
/// expression, as a <see cref="CudaException"/>. Use with `using static KernelLM.Runtime.Cuda.Check;`:
/// `ThrowIfFailed(cuMemAlloc_v2(out ulong address, size));`.
/// </summary>
public static class Check
{
    public static void ThrowIfFailed(CUresult result, [CallerArgumentExpression(nameof(result))] string expression = "")
    {
        if (result != CUresult.CUDA_SUCCESS)
        {
            throw Failure(result, expression);
        }
    }

    public static void ThrowIfFailed(nvrtcResult result, [CallerArgumentExpression(nameof(result))] string expression = "")
    {
        if (result != nvrtcResult.NVRTC_SUCCESS)
        {
            throw Failure(result, expression);
        }
    }

    public static void ThrowIfFailed(cublasStatus_t result, [CallerArgumentExpression(nameof(result))] string expression = "")
    {
        if (result != cublasStatus_t.CUBLAS_STATUS_SUCCESS)
        {
            throw Failure(result, expression);
        }
    }

    public static CudaException Failure(CUresult result, string expression)
    {
        string name = Name(result);
        return new CudaException($"{name} ({Describe(result)}) from {expression}", name);
    }

    public static CudaException Failure(nvrtcResult result, string expression)
    {
        string name = Enum.IsDefined(result) ? result.ToString() : $"nvrtcResult {(int)result}";
        string description = Describe(result);
        return new CudaException(description == name ? $"{name} from {expression}" : $"{name} ({description}) from {expression}", name);
    }

    public static CudaException Failure(cublasStatus_t result, string expression)
    {
        string name = Enum.IsDefined(result) ? result.ToString() : $"cublasStatus_t {(int)result}";
        return new CudaException($"{name} ({Describe(result)}) from {expression}", name);
    }

    /// <summary>The driver's name for a code (CUDA_ERROR_NO_DEVICE), also for codes newer than <see cref="CUresult"/>.</summary>
    public static string Name(CUresult result)
    {
        if (Enum.IsDefined(result))
        {
            return result.ToString();
        }
        return NativeLibraries.Load(NativeLibraries.Cuda).Found && CudaDriver.cuGetErrorName(result, out nint text) == CUresult.CUDA_SUCCESS && text != 0
            ? Marshal.PtrToStringUTF8(text)!
            : $"CUresult {(int)result}";
    }

    /// <summary>The driver's own error string ("no CUDA-capable device is detected").</summary>
    public static string Describe(CUresult result) =>
        NativeLibraries.Load(NativeLibraries.Cuda).Found && CudaDriver.cuGetErrorString(result, out nint text) == CUresult.CUDA_SUCCESS && text != 0
            ? Marshal.PtrToStringUTF8(text)!
            : "the driver has no description";

    /// <summary>NVRTC's own error string (NVRTC names its codes: "NVRTC_ERROR_COMPILATION").</summary>
    public static string Describe(nvrtcResult result)
    {
        nint text = NativeLibraries.Load(NativeLibraries.Nvrtc).Found ? Nvrtc.nvrtcGetErrorString(result) : 0;
        return text == 0 ? "NVRTC has no description" : Marshal.PtrToStringUTF8(text)!;
    }

    /// <summary>cuBLAS's own error string; cuBLAS before 11.4.2 has none.</summary>
    public static string Describe(cublasStatus_t result)
    {
        try
        {
            nint text = NativeLibraries.Load(NativeLibraries.Cublas).Found ? Cublas.cublasGetStatusString(result) : 0;
            return text == 0 ? "cuBLAS has no description" : Marshal.PtrToStringUTF8(text)!;
        }
        catch (EntryPointNotFoundException)
        {
            return "cuBLAS has no description";
        }
    }
}
