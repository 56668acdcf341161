using KernelLM.Native;
using static KernelLM.Native.CudaDriver;
using static KernelLM.Runtime.Cuda.Check;

namespace KernelLM.Runtime.Cuda.Driver;

// Stream capture into CUDA graphs: cuStreamBeginCapture_v2 (thread-local mode: other threads' work is not
// disturbed), cuStreamEndCapture + cuGraphInstantiateWithFlags (the graph template is destroyed once instantiated),
// cuGraphLaunch, cuGraphExecDestroy. Instantiated graphs still live when the backend is disposed are destroyed then.
public sealed partial class DriverBackend
{
    private readonly HashSet<nint> _capturing = [];
    private readonly HashSet<nint> _graphs = [];

    private bool IsCapturing(nint stream)
    {
        lock (_lock)
        {
            return _capturing.Contains(stream);
        }
    }

    public void BeginCapture(nint stream)
    {
        if (stream == 0)
        {
            throw new CudaException("BeginCapture: the legacy default stream (0) cannot be captured; capture a created stream",
                nameof(CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED));
        }
        MakeCurrent();
        ThrowIfFailed(cuStreamBeginCapture_v2(stream, CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
        lock (_lock)
        {
            _capturing.Add(stream);
        }
    }

    public nint EndCapture(nint stream)
    {
        MakeCurrent();
        lock (_lock)
        {
            _capturing.Remove(stream);
        }
        ThrowIfFailed(cuStreamEndCapture(stream, out nint graph));
        try
        {
            ThrowIfFailed(cuGraphInstantiateWithFlags(out nint executable, graph, 0));
            lock (_lock)
            {
                _graphs.Add(executable);
            }
            return executable;
        }
        finally
        {
            cuGraphDestroy(graph);
        }
    }

    public void LaunchGraph(nint graph, nint stream)
    {
        MakeCurrent();
        ThrowIfFailed(cuGraphLaunch(graph, stream));
        if (SynchronizeAfterLaunch)
        {
            ThrowIfFailed(cuStreamSynchronize(stream));
        }
    }

    public void DestroyGraph(nint graph)
    {
        lock (_lock)
        {
            if (!_graphs.Remove(graph))
            {
                throw new CudaException($"DestroyGraph(0x{graph:x}): not a live graph of this backend");
            }
        }
        MakeCurrent();
        ThrowIfFailed(cuGraphExecDestroy(graph));
    }

    /// <summary>Destroys the graphs still alive (from Dispose, with the context current).</summary>
    private void DestroyGraphs()
    {
        nint[] graphs;
        lock (_lock)
        {
            graphs = [.. _graphs];
            _graphs.Clear();
        }
        foreach (nint graph in graphs)
        {
            cuGraphExecDestroy(graph);
        }
    }
}
