using System.Runtime.InteropServices;

namespace KernelLM.Runtime;

/// <summary>
/// A 64-byte-aligned block of unmanaged memory for activations, KV caches and scratch: its address never
/// moves, so parallel jobs can hold raw pointers without pinning. Freed by <see cref="Dispose"/>; live
/// buffers are counted so that tests can assert nothing leaked.
/// </summary>
public sealed unsafe class NativeBuffer<T> : IDisposable where T : unmanaged
{
    private T* _pointer;

    public NativeBuffer(long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        Length = length;
        ByteLength = checked(length * sizeof(T));
        _pointer = (T*)NativeMemory.AlignedAlloc((nuint)Math.Max(ByteLength, 64), 64);
        NativeMemory.Clear(_pointer, (nuint)ByteLength);
        NativeMemoryCounters.Add(ByteLength, 1);
    }

    public long Length { get; }
    public long ByteLength { get; }

    public T* Data
    {
        get
        {
            ObjectDisposedException.ThrowIf(_pointer == null, this);
            return _pointer;
        }
    }

    public Span<T> Span => new(Data, checked((int)Length));

    public Span<T> Slice(long start, int length)
    {
        if (start < 0 || length < 0 || start + length > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(start), $"slice [{start}, {start + length}) outside buffer of {Length}");
        }
        return new Span<T>(Data + start, length);
    }

    public void Clear() => NativeMemory.Clear(Data, (nuint)ByteLength);

    public void Dispose()
    {
        if (_pointer != null)
        {
            NativeMemory.AlignedFree(_pointer);
            _pointer = null;
            NativeMemoryCounters.Add(-ByteLength, -1);
        }
    }
}

/// <summary>Unmanaged memory held by <see cref="NativeBuffer{T}"/>s not yet disposed, process-wide:
/// tests assert these return to their starting values.</summary>
public static class NativeMemoryCounters
{
    private static long s_liveBytes;
    private static int s_liveCount;

    public static long LiveBytes => Interlocked.Read(ref s_liveBytes);
    public static int LiveCount => Volatile.Read(ref s_liveCount);

    internal static void Add(long bytes, int count)
    {
        Interlocked.Add(ref s_liveBytes, bytes);
        Interlocked.Add(ref s_liveCount, count);
    }
}
