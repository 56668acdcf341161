namespace KernelLM.Runtime.Cuda.Emulator;

/// <summary>Settings of an <see cref="EmulatorBackend"/>; the defaults suit tests and CI.</summary>
public sealed record EmulatorOptions
{
    /// <summary>The device memory budget (<see cref="ICudaBackend.TotalMemoryBytes"/>): live allocations, each
    /// rounded up to 256 bytes, may not exceed it (CUDA_ERROR_OUT_OF_MEMORY). Guards are not counted.</summary>
    public long MemoryBytes { get; init; } = 1L << 30;

    /// <summary>OS threads that start a block's CUDA threads. More join as CUDA threads wait at barriers or
    /// warp operations, up to one per CUDA thread (1024).</summary>
    public int Threads { get; init; } = Math.Max(2, Environment.ProcessorCount);

    /// <summary>The C++ compiler (g++ 12 or newer): <c>$KERNELLM_CXX</c>, else <c>g++</c> on the PATH.</summary>
    public string Compiler { get; init; } = Environment.GetEnvironmentVariable("KERNELLM_CXX") is { Length: > 0 } compiler ? compiler : "g++";

    /// <summary>Where compiled modules are cached: <c>$KERNELLM_CACHE_DIR/emulator</c>, else
    /// <c>~/.cache/kernellm/emulator</c>.</summary>
    public string CacheDirectory { get; init; } = DefaultCacheDirectory();

    /// <summary>Bytes of guard region before and after every allocation (a multiple of 256): filled with a
    /// pattern, checked after every launch and on free, and not addressable by kernels.</summary>
    public int GuardBytes { get; init; } = 4096;

    /// <summary>Largest dynamic shared memory of one launch: 227 KB, the H100/H200 limit once a kernel has
    /// opted in with cuFuncSetAttribute (the real backend must opt in above 48 KB).</summary>
    public int MaxDynamicSharedBytes { get; init; } = 227 * 1024;

    /// <summary>A launch that runs longer fails with CUDA_ERROR_LAUNCH_TIMEOUT (an endless loop).</summary>
    public TimeSpan LaunchTimeout { get; init; } = TimeSpan.FromMinutes(5);

    /// <summary>Reported as <see cref="ICudaBackend.ComputeCapability"/> (sm_90, like the H200).</summary>
    public int ComputeCapability { get; init; } = 90;

    /// <summary>Reported as <see cref="ICudaBackend.MultiprocessorCount"/>. Small on purpose: blocks run one after
    /// another here, so grids sized for a 132-SM GPU would only cost time; tests that need a particular grid
    /// (a split count) ask for it explicitly.</summary>
    public int Multiprocessors { get; init; } = 4;

    public static string DefaultCacheDirectory() =>
        Environment.GetEnvironmentVariable("KERNELLM_CACHE_DIR") is { Length: > 0 } root
            ? Path.Combine(root, "emulator")
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "kernellm", "emulator");
}
