using System.Runtime.InteropServices;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Emulator;

namespace KernelLM.Tests.Cuda.Emulator;

/// <summary>Options, kernel sources and launch helpers shared by the emulator tests.</summary>
internal static class EmulatorTestSupport
{
    /// <summary>One compile cache for all test runs on this machine (a fresh one only where a test needs it).</summary>
    public static string CacheDirectory => Path.Combine(Path.GetTempPath(), "kernellm-emulator-test-cache");

    public static EmulatorOptions Options => new()
    {
        CacheDirectory = CacheDirectory,
        MemoryBytes = 256L << 20,
        LaunchTimeout = TimeSpan.FromSeconds(60),
    };

    /// <summary>The headers of kernels/ as the engine embeds them (common.cuh).</summary>
    public static IReadOnlyDictionary<string, string> Headers { get; } = LoadHeaders();

    /// <summary>A kernel file written inside a test, with the real headers and its entry points found as the
    /// kernel library finds them.</summary>
    public static KernelSource Source(string fileName, string text) =>
        new(fileName, text, Headers) { EntryPoints = KernelSources.FindEntryPoints(text) };

    private static Dictionary<string, string> LoadHeaders()
    {
        var assembly = typeof(KernelSources).Assembly;
        var headers = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (string name in assembly.GetManifestResourceNames().Where(name => name.StartsWith("kernels/", StringComparison.Ordinal) &&
                                                                                name.EndsWith(".cuh", StringComparison.Ordinal)))
        {
            using var reader = new StreamReader(assembly.GetManifestResourceStream(name)!);
            headers[name["kernels/".Length..]] = reader.ReadToEnd();
        }
        return headers;
    }
}

/// <summary>A kernel argument as the 8 bytes it occupies: pointers, and 32-bit values in the low half
/// (little-endian, so a kernel parameter of type int or float reads the right bytes).</summary>
internal readonly record struct KernelArgument(ulong Bits)
{
    public static implicit operator KernelArgument(ulong address) => new(address);
    public static implicit operator KernelArgument(int value) => new((uint)value);
    public static implicit operator KernelArgument(uint value) => new(value);
    public static implicit operator KernelArgument(float value) => new(BitConverter.SingleToUInt32Bits(value));
    public static implicit operator KernelArgument(DeviceBuffer buffer) => new(buffer.Address);
}

/// <summary>A device allocation freed on dispose.</summary>
internal sealed class DeviceBuffer(ICudaBackend device, long bytes) : IDisposable
{
    public ulong Address { get; } = device.Allocate(bytes);
    public long Bytes { get; } = bytes;

    public static DeviceBuffer From<T>(ICudaBackend device, ReadOnlySpan<T> values) where T : unmanaged
    {
        var buffer = new DeviceBuffer(device, Math.Max(1, values.Length) * (long)Marshal.SizeOf<T>());
        device.CopyHostToDevice(buffer.Address, MemoryMarshal.AsBytes(values), stream: 0);
        return buffer;
    }

    public static DeviceBuffer Of<T>(ICudaBackend device, int count) where T : unmanaged =>
        new(device, count * (long)Marshal.SizeOf<T>());

    public T[] Read<T>(int count) where T : unmanaged
    {
        var values = new T[count];
        device.CopyDeviceToHost(MemoryMarshal.AsBytes(values.AsSpan()), Address, stream: 0);
        return values;
    }

    public void Dispose() => device.Free(Address);
}

internal static unsafe class EmulatorLaunch
{
    public static void Run(this ICudaBackend device, IKernelModule module, string kernel, Dim3 grid, Dim3 block, int dynamicSharedBytes,
        params ReadOnlySpan<KernelArgument> arguments)
    {
        ulong* slots = stackalloc ulong[Math.Max(1, arguments.Length)];
        nint* pointers = stackalloc nint[Math.Max(1, arguments.Length)];
        for (int i = 0; i < arguments.Length; i++)
        {
            slots[i] = arguments[i].Bits;
            pointers[i] = (nint)(slots + i);
        }
        device.Launch(module.GetFunction(kernel), grid, block, dynamicSharedBytes, stream: 0, new ReadOnlySpan<nint>(pointers, arguments.Length));
    }
}
