namespace KernelLM.Runtime.Cuda.Emulator;

// Stream capture and graphs, as the driver does them (cuStreamBeginCapture_v2 in thread-local mode,
// cuStreamEndCapture + cuGraphInstantiateWithFlags, cuGraphLaunch, cuGraphExecDestroy): while a stream captures,
// launches, device-to-device copies and memsets enqueued on it are recorded (each launch's argument values are
// copied, as cuLaunchKernel copies them), not run; a graph launch replays them in order. What the driver refuses
// during a capture, the emulator refuses with the driver's error name, so that a capture that would fail on a GPU
// fails here too: a host copy or a synchronisation of the capturing stream (pageable host memory cannot be
// captured), work on the legacy default stream (it would join the capturing blocking stream), and allocating or
// freeing device memory on the capturing thread. Any refused call invalidates the capture, as on the driver.
public sealed unsafe partial class EmulatorBackend
{
    private readonly Dictionary<nint, Capture> _captures = [];
    private readonly Dictionary<nint, GraphNode[]> _graphs = [];
    private long _nextGraph;

    private sealed class Capture(int thread)
    {
        public int Thread { get; } = thread;
        public List<GraphNode> Nodes { get; } = [];
        public string? Invalidated { get; set; }
    }

    private sealed class GraphNode
    {
        private GraphNode() { }

        public EmulatedKernel? Kernel { get; private init; }
        public Dim3 Grid { get; private init; }
        public Dim3 Block { get; private init; }
        public int SharedBytes { get; private init; }
        public byte[] Values { get; private init; } = [];
        public int[] Offsets { get; private init; } = [];
        public ulong Destination { get; private init; }
        public ulong Source { get; private init; }
        public long Bytes { get; private init; }
        public byte FillValue { get; private init; }
        public bool IsMemset { get; private init; }

        public static GraphNode Launch(EmulatedKernel kernel, Dim3 grid, Dim3 block, int sharedBytes, ReadOnlySpan<nint> arguments)
        {
            var offsets = new int[arguments.Length];
            int total = 0;
            for (int i = 0; i < arguments.Length; i++)
            {
                offsets[i] = total;
                total += (kernel.ParameterSizes[i] + 7) / 8 * 8;
            }
            var values = new byte[Math.Max(total, 8)];
            for (int i = 0; i < arguments.Length; i++)
            {
                new ReadOnlySpan<byte>((void*)arguments[i], kernel.ParameterSizes[i]).CopyTo(values.AsSpan(offsets[i]));
            }
            return new GraphNode { Kernel = kernel, Grid = grid, Block = block, SharedBytes = sharedBytes, Values = values, Offsets = offsets };
        }

        public static GraphNode Copy(ulong destination, ulong source, long bytes) =>
            new() { Destination = destination, Source = source, Bytes = bytes };

        public static GraphNode Fill(ulong destination, byte value, long bytes) =>
            new() { Destination = destination, FillValue = value, Bytes = bytes, IsMemset = true };
    }

    /// <summary>Live captures and instantiated graphs (for tests).</summary>
    public int LiveGraphs
    {
        get
        {
            lock (_lock)
            {
                return _graphs.Count;
            }
        }
    }

    public void BeginCapture(nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            if (stream == 0)
            {
                throw new CudaException("BeginCapture: the legacy default stream (0) cannot be captured; capture a created stream",
                    EmulatorErrors.StreamCaptureUnsupported);
            }
            if (_captures.ContainsKey(stream))
            {
                throw new CudaException($"BeginCapture: stream 0x{stream:x} is already capturing", EmulatorErrors.IllegalState);
            }
            _captures.Add(stream, new Capture(Environment.CurrentManagedThreadId));
        }
    }

    public nint EndCapture(nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            if (!_captures.Remove(stream, out var capture))
            {
                throw new CudaException($"EndCapture: stream 0x{stream:x} is not capturing", EmulatorErrors.IllegalState);
            }
            if (capture.Invalidated is string why)
            {
                throw new CudaException($"EndCapture: the capture on stream 0x{stream:x} was invalidated by {why}",
                    EmulatorErrors.StreamCaptureInvalidated);
            }
            nint graph = (nint)(++_nextGraph);
            _graphs.Add(graph, [.. capture.Nodes]);
            return graph;
        }
    }

    public void LaunchGraph(nint graph, nint stream)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            CheckStream(stream);
            RefuseDuringCapture(stream, "LaunchGraph");
            DrainCopies();
            if (!_graphs.TryGetValue(graph, out var nodes))
            {
                throw new CudaException($"LaunchGraph: 0x{graph:x} is not a live graph of this device", EmulatorErrors.InvalidHandle);
            }
            Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
            foreach (var node in nodes)
            {
                if (node.Kernel is { } kernel)
                {
                    if (kernel.Module.IsDisposed)
                    {
                        throw new CudaException($"LaunchGraph: kernel '{kernel.Name}' belongs to {kernel.Module.FileName}, which was unloaded",
                            EmulatorErrors.InvalidHandle, fileName: kernel.Module.FileName);
                    }
                    fixed (byte* values = node.Values)
                    {
                        int count = node.Offsets.Length;
                        for (int i = 0; i < count; i++)
                        {
                            pointers[i] = (nint)(values + node.Offsets[i]);
                        }
                        Run(kernel, node.Grid, node.Block, node.SharedBytes, pointers[..count]);
                    }
                }
                else if (node.IsMemset)
                {
                    System.Runtime.InteropServices.NativeMemory.Fill(_heap.Resolve(node.Destination, node.Bytes, "Memset (graph)"), (nuint)node.Bytes, node.FillValue);
                }
                else
                {
                    byte* origin = _heap.Resolve(node.Source, node.Bytes, "CopyDeviceToDevice (graph, source)");
                    byte* target = _heap.Resolve(node.Destination, node.Bytes, "CopyDeviceToDevice (graph, destination)");
                    Buffer.MemoryCopy(origin, target, node.Bytes, node.Bytes);
                }
            }
        }
    }

    public void DestroyGraph(nint graph)
    {
        lock (_lock)
        {
            ThrowIfDisposed();
            if (!_graphs.Remove(graph))
            {
                throw new CudaException($"DestroyGraph: 0x{graph:x} is not a live graph of this device", EmulatorErrors.InvalidHandle);
            }
        }
    }

    /// <summary>The capture recording <paramref name="stream"/>'s work, or null when it runs now. Throws (and invalidates
    /// every capture) for work on the legacy stream while a capture is open.</summary>
    private List<GraphNode>? Captured(nint stream, string operation)
    {
        if (_captures.Count == 0)
        {
            return null;
        }
        if (_captures.TryGetValue(stream, out var capture))
        {
            return capture.Nodes;
        }
        if (stream == 0)
        {
            Invalidate($"{operation} on the legacy default stream");
            throw new CudaException($"{operation} on the legacy default stream (0) while a stream captures: it would make the legacy " +
                                    "stream wait for the capturing stream", EmulatorErrors.StreamCaptureImplicit);
        }
        return null;
    }

    /// <summary>Host copies, synchronisations and graph launches cannot be captured.</summary>
    private void RefuseDuringCapture(nint stream, string operation)
    {
        if (_captures.Count == 0)
        {
            return;
        }
        if (_captures.ContainsKey(stream))
        {
            Invalidate(operation);
            throw new CudaException($"{operation} on stream 0x{stream:x}, which is capturing: not permitted in a stream capture",
                EmulatorErrors.StreamCaptureUnsupported);
        }
        _ = Captured(stream, operation);
    }

    /// <summary>Device allocation and free are refused on a thread that is capturing (thread-local capture mode).</summary>
    private void RefuseAllocationDuringCapture(string operation)
    {
        foreach (var capture in _captures.Values)
        {
            if (capture.Thread == Environment.CurrentManagedThreadId)
            {
                Invalidate(operation);
                throw new CudaException($"{operation} while this thread captures a stream: not permitted in a stream capture",
                    EmulatorErrors.StreamCaptureUnsupported);
            }
        }
    }

    private void Invalidate(string why)
    {
        foreach (var capture in _captures.Values)
        {
            capture.Invalidated ??= why;
        }
    }
}
