using System.Globalization;
using KernelLM.Native;
using static KernelLM.Native.Cublas;

namespace KernelLM.Runtime.Cuda.Driver;

/// <summary>Which cuBLAS / cuBLASLt this process would use, and their versions (read without a device:
/// cublasGetProperty and cublasLtGetVersion need no handle).</summary>
public sealed record CublasInfo(NativeLibraryProbe Library, NativeLibraryProbe LtLibrary, string? Version, string? LtVersion)
{
    public static CublasInfo Query()
    {
        var lt = NativeLibraries.Load(NativeLibraries.CublasLt);
        var library = NativeLibraries.Load(NativeLibraries.Cublas);
        string? version = null;
        if (library.Found
            && cublasGetProperty(libraryPropertyType.MAJOR_VERSION, out int major) == cublasStatus_t.CUBLAS_STATUS_SUCCESS
            && cublasGetProperty(libraryPropertyType.MINOR_VERSION, out int minor) == cublasStatus_t.CUBLAS_STATUS_SUCCESS
            && cublasGetProperty(libraryPropertyType.PATCH_LEVEL, out int patch) == cublasStatus_t.CUBLAS_STATUS_SUCCESS)
        {
            version = string.Create(CultureInfo.InvariantCulture, $"{major}.{minor}.{patch}");
        }
        string? ltVersion = lt.Found ? CublasLt.cublasLtGetVersion().ToString(CultureInfo.InvariantCulture) : null;
        return new CublasInfo(library, lt, version, ltVersion);
    }
}
