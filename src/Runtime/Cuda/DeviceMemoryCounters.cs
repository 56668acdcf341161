namespace KernelLM.Runtime.Cuda;

/// <summary>
/// Device allocations of every CUDA backend in the process (driver or emulator), like
/// <see cref="NativeMemoryCounters"/> for host memory. Live: allocated and not yet freed. Leaked: still live
/// when their backend was disposed (the backend frees them then, so that nothing on the device waits for
/// the GC, and counts them here). Tests assert that live counts return to their starting values and that
/// nothing leaked.
/// </summary>
public static class DeviceMemoryCounters
{
    private static long s_liveBytes;
    private static int s_liveCount;
    private static long s_leakedBytes;
    private static int s_leakedCount;

    public static long LiveBytes => Interlocked.Read(ref s_liveBytes);
    public static int LiveCount => Volatile.Read(ref s_liveCount);
    public static long LeakedBytes => Interlocked.Read(ref s_leakedBytes);
    public static int LeakedCount => Volatile.Read(ref s_leakedCount);

    internal static void Allocated(long bytes)
    {
        Interlocked.Add(ref s_liveBytes, bytes);
        Interlocked.Increment(ref s_liveCount);
    }

    internal static void Freed(long bytes)
    {
        Interlocked.Add(ref s_liveBytes, -bytes);
        Interlocked.Decrement(ref s_liveCount);
    }

    /// <summary>A backend freed an allocation its owner never freed.</summary>
    internal static void FreedAsLeak(long bytes)
    {
        Freed(bytes);
        Interlocked.Add(ref s_leakedBytes, bytes);
        Interlocked.Increment(ref s_leakedCount);
    }
}
