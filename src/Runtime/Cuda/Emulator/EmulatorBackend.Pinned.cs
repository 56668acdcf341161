using System.Runtime.InteropServices;

namespace KernelLM.Runtime.Cuda.Emulator;

// Page-locked buffers, asynchronous copies from them and events. The emulator keeps the asynchrony that matters
// to a caller: a copy from pinned memory is only queued, and reads its source when the queue is drained - at the
// next synchronisation, event wait, or other device operation - so host code that rewrites a pinned buffer before
// waiting for the copy that reads it uploads the wrong bytes here too, as it would on a GPU.
public sealed unsafe partial class EmulatorBackend
{
    private readonly Dictionary<nint, long> _pinnedBuffers = [];
    private readonly List<(ulong Destination, nint Source, long Bytes)> _pendingCopies = [];
    private readonly HashSet<nint> _events = [];
    private long _nextEvent;

    /// <summary>Pinned buffers not yet freed (for tests).</summary>
    public int LivePinnedBuffers
    {
        get
        {
            lock (_lock)
            {
                return _pinnedBuffers.Count;
            }
        }
    }

    public nint AllocatePinned(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytes);
        lock (_lock)
        {
            ThrowIfDisposed();
            nint host = (nint)NativeMemory.AlignedAlloc((nuint)bytes, 4096);
            _pinnedBuffers.Add(host, bytes);
            return host;
        }
    }

    public void FreePinned(nint host)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            DrainCopies();   // as cuMemFreeHost, which waits for the work that reads the buffer
            if (!_pinnedBuffers.Remove(host))
            {
                throw new CudaException($"FreePinned(0x{host:x}): not page-locked memory of this device", EmulatorErrors.InvalidValue);
            }
            NativeMemory.AlignedFree((void*)host);
        }
    }

    public void CopyPinnedToDevice(ulong destination, nint source, long bytes, nint stream)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            RefuseDuringCapture(stream, "CopyPinnedToDevice");
            if (!IsPinned(source, bytes))
            {
                throw new CudaException($"CopyPinnedToDevice: 0x{source:x} + {bytes} bytes is not inside a page-locked buffer of this device",
                    EmulatorErrors.InvalidValue);
            }
            _ = _heap.Resolve(destination, bytes, "CopyPinnedToDevice");
            _pendingCopies.Add((destination, source, bytes));
        }
    }

    public nint RecordEvent(nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            nint @event = (nint)(++_nextEvent);
            _events.Add(@event);
            return @event;
        }
    }

    public void SynchronizeEvent(nint @event)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (!_events.Remove(@event))
            {
                throw new CudaException($"SynchronizeEvent: 0x{@event:x} is not a live event of this device", EmulatorErrors.InvalidHandle);
            }
            DrainCopies();
        }
    }

    private bool IsPinned(nint source, long bytes)
    {
        foreach (var (start, length) in _pinnedBuffers)
        {
            if (source >= start && bytes <= length && source - start <= length - bytes)
            {
                return true;
            }
        }
        return false;
    }

    /// <summary>Performs the queued pinned copies, in order (the caller holds the lock).</summary>
    private void DrainCopies()
    {
        if (_pendingCopies.Count == 0)
        {
            return;
        }
        foreach (var (destination, source, bytes) in _pendingCopies)
        {
            byte* target = _heap.Resolve(destination, bytes, "CopyPinnedToDevice");
            Buffer.MemoryCopy((void*)source, target, bytes, bytes);
        }
        _pendingCopies.Clear();
    }

    /// <summary>Frees the pinned buffers still allocated (from Dispose).</summary>
    private void FreePinnedBuffers()
    {
        _pendingCopies.Clear();
        foreach (nint host in _pinnedBuffers.Keys)
        {
            NativeMemory.AlignedFree((void*)host);
        }
        _pinnedBuffers.Clear();
    }
}
