namespace KernelLM.Runtime.Cuda;

/// <summary>
/// An executable CUDA graph recorded by stream capture: the work a callback enqueues on a created stream is
/// recorded once (kernel argument values as they were then) and replayed by <see cref="Launch"/> with one call.
/// Everything a replay must see change has to live in device memory (positions, lengths, token ids); host values
/// passed to launchers are frozen at capture. On the emulated device capture follows the driver's rules, so a
/// capture that would fail on a GPU (a host copy, a synchronisation, an allocation, work on stream 0) fails there.
/// </summary>
public sealed class CudaGraph : IDisposable
{
    private readonly ICudaBackend _backend;
    private nint _graph;

    private CudaGraph(ICudaBackend backend, nint graph)
    {
        _backend = backend;
        _graph = graph;
    }

    /// <summary>Captures what <paramref name="record"/> enqueues on <paramref name="stream"/>. When it throws the
    /// capture is ended and discarded and the exception propagates; the stream is usable again.</summary>
    public static CudaGraph Capture<TState>(CudaDevice device, nint stream, TState state, Action<TState, nint> record)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(record);
        var backend = device.Backend;
        backend.BeginCapture(stream);
        try
        {
            record(state, stream);
        }
        catch
        {
            try
            {
                backend.DestroyGraph(backend.EndCapture(stream));
            }
            catch (CudaException)
            {
                // The capture was invalidated by what failed: EndCapture ended it and there is nothing to destroy.
            }
            throw;
        }
        return new CudaGraph(backend, backend.EndCapture(stream));
    }

    /// <summary>Enqueues the recorded work on <paramref name="stream"/>.</summary>
    public void Launch(nint stream)
    {
        ObjectDisposedException.ThrowIf(_graph == 0, this);
        _backend.LaunchGraph(_graph, stream);
    }

    public void Dispose()
    {
        if (_graph != 0)
        {
            _backend.DestroyGraph(_graph);
            _graph = 0;
        }
    }
}
