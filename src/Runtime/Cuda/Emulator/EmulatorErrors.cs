namespace KernelLM.Runtime.Cuda.Emulator;

/// <summary>
/// <see cref="CudaException.ErrorName"/>s the emulator raises. Faults a GPU also raises keep the driver's
/// name (an out-of-bounds access is CUDA_ERROR_ILLEGAL_ADDRESS on both); what only the emulator can see
/// (races, barrier and warp misuse) has an EMULATOR_ERROR_ name.
/// </summary>
public static class EmulatorErrors
{
    public const string OutOfMemory = "CUDA_ERROR_OUT_OF_MEMORY";
    public const string InvalidValue = "CUDA_ERROR_INVALID_VALUE";
    public const string InvalidHandle = "CUDA_ERROR_INVALID_HANDLE";
    public const string NotFound = "CUDA_ERROR_NOT_FOUND";
    public const string IllegalAddress = "CUDA_ERROR_ILLEGAL_ADDRESS";
    public const string MisalignedAddress = "CUDA_ERROR_MISALIGNED_ADDRESS";
    public const string LaunchFailed = "CUDA_ERROR_LAUNCH_FAILED";
    public const string LaunchOutOfResources = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    public const string Assert = "CUDA_ERROR_ASSERT";
    public const string LaunchTimeout = "CUDA_ERROR_LAUNCH_TIMEOUT";
    public const string Deinitialized = "CUDA_ERROR_DEINITIALIZED";
    public const string StreamCaptureUnsupported = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    public const string StreamCaptureInvalidated = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
    public const string StreamCaptureImplicit = "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT";
    public const string IllegalState = "CUDA_ERROR_ILLEGAL_STATE";

    /// <summary>Two threads access the same byte, at least one writes, with no barrier between them.</summary>
    public const string Race = "EMULATOR_ERROR_RACE";

    /// <summary>__syncthreads not reached by every thread of the block, or reached at different call sites.</summary>
    public const string Barrier = "EMULATOR_ERROR_BARRIER";

    /// <summary>A warp operation whose mask is wrong, whose lanes diverged, or that reads a lane outside the mask.</summary>
    public const string WarpSync = "EMULATOR_ERROR_WARP_SYNC";

    public const string Deadlock = "EMULATOR_ERROR_DEADLOCK";

    /// <summary>A write into a guard region that the access checks did not see (memset, for instance).</summary>
    public const string GuardCorrupted = "EMULATOR_ERROR_GUARD_CORRUPTED";

    public const string Compilation = "EMULATOR_ERROR_COMPILATION";
    public const string NoCompiler = "EMULATOR_ERROR_NO_COMPILER";
    public const string Internal = "EMULATOR_ERROR_INTERNAL";
}
