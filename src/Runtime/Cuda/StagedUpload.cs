namespace KernelLM.Runtime.Cuda;

/// <summary>
/// Uploads host bytes (typically a memory-mapped checkpoint) through page-locked staging buffers, so that reading
/// the next piece from the map (page faults, disk) overlaps the DMA of the previous one: piece i is copied into
/// buffer i mod N on the host, its device copy is enqueued on the upload stream and an event recorded; buffer
/// i mod N is written again only after that event. <see cref="Finish"/> waits for the last copies. Disposing frees
/// the buffers, the events and the stream (after waiting for pending copies).
/// </summary>
public sealed class StagedUpload : IDisposable
{
    /// <summary>Default staging buffer size: large enough for full-speed DMA, small enough to pin cheaply.</summary>
    public const long DefaultBufferBytes = 32L << 20;

    private readonly ICudaBackend _backend;
    private readonly nint[] _buffers;
    private readonly nint[] _events;   // the event after each buffer's last copy, or 0
    private readonly long _bufferBytes;
    private readonly nint _stream;
    private int _next;
    private bool _disposed;

    public StagedUpload(CudaDevice device, long bufferBytes = DefaultBufferBytes, int buffers = 2)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bufferBytes);
        ArgumentOutOfRangeException.ThrowIfLessThan(buffers, 1);
        _backend = device.Backend;
        _bufferBytes = bufferBytes;
        _buffers = new nint[buffers];
        _events = new nint[buffers];
        try
        {
            _stream = _backend.CreateStream();
            for (int i = 0; i < buffers; i++)
            {
                _buffers[i] = _backend.AllocatePinned(bufferBytes);
            }
        }
        catch
        {
            Release();
            throw;
        }
    }

    /// <summary>Bytes enqueued so far.</summary>
    public long Bytes { get; private set; }

    /// <summary>Pieces (staging buffer fills) so far.</summary>
    public int Pieces { get; private set; }

    /// <summary>Enqueues the upload of <paramref name="source"/> to <paramref name="destination"/>; returns once every
    /// byte of it has been read (the caller may unmap it), not once it is on the device (see <see cref="Finish"/>).</summary>
    public unsafe void Copy(ulong destination, ReadOnlySpan<byte> source)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        for (long offset = 0; offset < source.Length; offset += _bufferBytes)
        {
            int length = (int)Math.Min(_bufferBytes, source.Length - offset);
            int slot = _next;
            _next = (_next + 1) % _buffers.Length;
            if (_events[slot] != 0)
            {
                nint previous = _events[slot];
                _events[slot] = 0;
                _backend.SynchronizeEvent(previous);   // the DMA that read this buffer last is done
            }
            source.Slice((int)offset, length).CopyTo(new Span<byte>((void*)_buffers[slot], length));
            _backend.CopyPinnedToDevice(destination + (ulong)offset, _buffers[slot], length, _stream);
            _events[slot] = _backend.RecordEvent(_stream);
            Bytes += length;
            Pieces++;
        }
    }

    /// <summary>Waits until every enqueued copy is on the device.</summary>
    public void Finish()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        for (int i = 0; i < _events.Length; i++)
        {
            if (_events[i] != 0)
            {
                nint @event = _events[i];
                _events[i] = 0;
                _backend.SynchronizeEvent(@event);
            }
        }
        _backend.Synchronize(_stream);
    }

    private void Release()
    {
        for (int i = 0; i < _events.Length; i++)
        {
            if (_events[i] != 0)
            {
                try
                {
                    _backend.SynchronizeEvent(_events[i]);
                }
                catch (CudaException)
                {
                    // Releasing after a failure: the buffers are freed below either way.
                }
                _events[i] = 0;
            }
        }
        for (int i = 0; i < _buffers.Length; i++)
        {
            if (_buffers[i] != 0)
            {
                _backend.FreePinned(_buffers[i]);
                _buffers[i] = 0;
            }
        }
        if (_stream != 0)
        {
            _backend.DestroyStream(_stream);
        }
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        Release();
    }
}
