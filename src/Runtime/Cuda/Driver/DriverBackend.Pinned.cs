using KernelLM.Native;
using static KernelLM.Native.CudaDriver;
using static KernelLM.Runtime.Cuda.Check;

namespace KernelLM.Runtime.Cuda.Driver;

// Page-locked host buffers (cuMemHostAlloc / cuMemFreeHost), asynchronous copies from them, and one-shot events
// (cuEventCreate with timing disabled, cuEventRecord; cuEventSynchronize then cuEventDestroy_v2). Pinned buffers
// still allocated when the backend is disposed are freed then.
public sealed partial class DriverBackend
{
    private readonly HashSet<nint> _pinned = [];

    public nint AllocatePinned(long bytes)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytes);
        MakeCurrent();
        var result = cuMemHostAlloc(out nint host, (nuint)bytes, 0);
        if (result == CUresult.CUDA_ERROR_OUT_OF_MEMORY)
        {
            throw new CudaException($"cuMemHostAlloc: {bytes:N0} bytes of page-locked host memory are not available", Name(result));
        }
        ThrowIfFailed(result);
        lock (_lock)
        {
            _pinned.Add(host);
        }
        return host;
    }

    public void FreePinned(nint host)
    {
        lock (_lock)
        {
            if (!_pinned.Remove(host))
            {
                throw new CudaException($"FreePinned(0x{host:x}): not page-locked memory of this backend");
            }
        }
        MakeCurrent();
        ThrowIfFailed(cuMemFreeHost(host));
    }

    public unsafe void CopyPinnedToDevice(ulong destination, nint source, long bytes, nint stream)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        if (bytes == 0)
        {
            return;
        }
        MakeCurrent();
        ThrowIfFailed(cuMemcpyHtoDAsync_v2(destination, (void*)source, (nuint)bytes, stream));
    }

    public nint RecordEvent(nint stream)
    {
        MakeCurrent();
        ThrowIfFailed(cuEventCreate(out nint @event, CudaFlags.CU_EVENT_DISABLE_TIMING));
        var result = cuEventRecord(@event, stream);
        if (result != CUresult.CUDA_SUCCESS)
        {
            cuEventDestroy_v2(@event);
            ThrowIfFailed(result);
        }
        return @event;
    }

    public void SynchronizeEvent(nint @event)
    {
        MakeCurrent();
        var result = cuEventSynchronize(@event);
        cuEventDestroy_v2(@event);
        ThrowIfFailed(result);
    }

    /// <summary>Frees the pinned buffers still allocated (from Dispose).</summary>
    private void FreePinnedBuffers()
    {
        nint[] buffers;
        lock (_lock)
        {
            buffers = [.. _pinned];
            _pinned.Clear();
        }
        foreach (nint host in buffers)
        {
            cuMemFreeHost(host);
        }
    }
}
