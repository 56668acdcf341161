using KernelLM.Runtime.KvSelect;

namespace KernelLM.Runtime.Cuda.Ops;

/// <summary>
/// One layer's TokenSelect state on the device (kernels/kv_select.cu): the index list the attention hook reads and
/// the selection cache. Shapes: <see cref="Indices"/> [batch, max_indices] I32, <see cref="IndexCounts"/> [batch] I32,
/// <see cref="CachedQuery"/> [batch, heads * head_dim] F32, <see cref="State"/> [batch, 8] I32 (zeroed when a
/// sequence starts; counts of hits and selections at fields 5 and 6).
/// </summary>
public sealed record KvSelectLayerTensors(DeviceTensor Indices, DeviceTensor IndexCounts, DeviceTensor CachedQuery, DeviceTensor State)
{
    /// <summary>The hook that makes attention read this list.</summary>
    public DeviceAttentionHook Hook => new(null, Indices, IndexCounts);
}

/// <summary>
/// Scratch of the selection kernels, shared by every layer of a stream (each call consumes it before the next):
/// <see cref="Scores"/> [batch, heads, capacity] F32, <see cref="Partials"/> [batch, heads, max_tiles, 2] F32,
/// <see cref="Softmax"/> [batch, heads, 2] F32, <see cref="Votes"/> [batch, capacity] F32 (candidate c at c - init),
/// <see cref="Histogram"/> [batch, 256] I32, <see cref="TileCounts"/> [batch, count_tiles, 2] I32.
/// </summary>
public sealed record KvSelectScratch(DeviceTensor Scores, DeviceTensor Partials, DeviceTensor Softmax, DeviceTensor Votes, DeviceTensor Histogram,
    DeviceTensor TileCounts)
{
    /// <summary>Allocates the scratch for <paramref name="batch"/> sequences of up to <paramref name="capacity"/> positions;
    /// <paramref name="owned"/> receives every tensor (the caller disposes them).</summary>
    public static KvSelectScratch Allocate(CudaDevice device, int batch, int heads, int capacity, ICollection<DeviceTensor> owned)
    {
        DeviceTensor Add(string name, DType dtype, params int[] shape)
        {
            var tensor = DeviceMemory.Allocate(device, name, dtype, shape, "(kv_select scratch)");
            owned.Add(tensor);
            return tensor;
        }
        return new KvSelectScratch(
            Add("kv_select_scores", DType.F32, batch, heads, capacity),
            Add("kv_select_partials", DType.F32, batch, heads, CudaOps.KvSelectScoreTiles(capacity), 2),
            Add("kv_select_softmax", DType.F32, batch, heads, 2),
            Add("kv_select_votes", DType.F32, batch, capacity),
            Add("kv_select_histogram", DType.I32, batch, CudaOps.KvSelectBins),
            Add("kv_select_tile_counts", DType.I32, batch, CudaOps.KvSelectCountTiles(capacity), 2));
    }
}

/// <summary>Launchers of kv_select.cu (TokenSelect): the selection pipeline as one op entry.</summary>
public static partial class CudaOps
{
    /// <summary>KV_SELECT_TILE: candidates per score block.</summary>
    public const int KvSelectTile = 128;

    /// <summary>KV_SELECT_COUNT_TILE: candidates per count / emit / histogram block.</summary>
    public const int KvSelectCountTile = 1024;

    /// <summary>KV_SELECT_BINS: radix histogram bins (8 bits per pass).</summary>
    public const int KvSelectBins = 256;

    /// <summary>KV_SELECT_STATE: int32 fields of a sequence's state.</summary>
    public const int KvSelectStateFields = 8;

    /// <summary>State field of the cache hits / selections counts (KV_SELECT_HITS, KV_SELECT_SELECTIONS).</summary>
    public const int KvSelectHitsField = 5, KvSelectSelectionsField = 6;

    private const int KvSelectScoreThreads = 128;
    private const int KvSelectThreads = 256;

    public static int KvSelectScoreTiles(int capacity) => Math.Max(1, (capacity + KvSelectTile - 1) / KvSelectTile);

    public static int KvSelectCountTiles(int capacity) => Math.Max(1, (capacity + KvSelectCountTile - 1) / KvSelectCountTile);

    /// <summary>Allocates one layer's state for <paramref name="batch"/> sequences, zeroed; <paramref name="owned"/> receives the tensors.</summary>
    public static KvSelectLayerTensors KvSelectAllocateLayer(CudaDevice device, string name, int batch, int width, KvSelectOptions options,
        ICollection<DeviceTensor> owned)
    {
        DeviceTensor Add(string suffix, DType dtype, params int[] shape)
        {
            var tensor = DeviceMemory.Allocate(device, $"{name}.{suffix}", dtype, shape, "(kv_select state)");
            owned.Add(tensor);
            return tensor;
        }
        var layer = new KvSelectLayerTensors(Add("indices", DType.I32, batch, options.MaxIndices), Add("index_counts", DType.I32, batch),
            Add("cached_query", DType.F32, batch, width), Add("state", DType.I32, batch, KvSelectStateFields));
        KvSelectReset(layer);
        return layer;
    }

    /// <summary>Zeroes a layer's state (a new sequence: no cached selection, counts at 0). Synchronous upload.</summary>
    public static void KvSelectReset(KvSelectLayerTensors layer)
    {
        layer.State.Upload<int>(new int[layer.State.ElementCount]);
        layer.IndexCounts.Upload<int>(new int[layer.IndexCounts.ElementCount]);
    }

    /// <summary>
    /// TokenSelect for one layer (kernels/kv_select.cu): from the queries q [batch, tokens, heads, head_dim] (or
    /// [batch, heads, head_dim] for one token) and the layer's key cache [batch, kv_heads, capacity, head_dim] (the same
    /// dtype), over contexts [batch] I32 positions per sequence (decode: the length including the new token; prefill:
    /// the chunk's start), writes <paramref name="layer"/>'s index list for the attention hook. <paramref name="maxContext"/>
    /// bounds contexts[b] on the host and sizes the grids (a bound of the capacity serves a captured graph).
    /// <paramref name="useCache"/>: whether a query similar to the layer's last selection reuses it. Enqueues up to 12
    /// kernels; never synchronises. <paramref name="scoresOnly"/> (benchmarks) stops after the score kernel: the index list
    /// is then not written.
    /// </summary>
    public static void KvSelect(CudaDevice device, DeviceTensor q, DeviceTensor keyCache, DeviceTensor contexts, int maxContext, KvSelectOptions options,
        bool useCache, KvSelectScratch scratch, KvSelectLayerTensors layer, nint stream = 0, bool scoresOnly = false)
    {
        const string op = "kv_select";
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(scratch);
        ArgumentNullException.ThrowIfNull(layer);
        RequireDType(keyCache, op, DType.F32, DType.BF16, DType.F16);
        if (keyCache.Shape.Length != 4)
        {
            throw new ArgumentException($"{op}: key cache '{keyCache.Name}' has shape {keyCache.ShapeText}; expected [batch, kv_heads, capacity, head_dim]");
        }
        int batch = keyCache.Shape[0], kvHeads = keyCache.Shape[1], capacity = keyCache.Shape[2], headDim = keyCache.Shape[3];
        if (headDim % 8 != 0 || headDim > AttentionMaxHeadDim)
        {
            throw new ArgumentException($"{op}: key cache '{keyCache.Name}' has head_dim {headDim}; the kernel takes multiples of 8 up to {AttentionMaxHeadDim}");
        }
        RequireSameDType(q, keyCache, op);
        int tokens, heads;
        if (q.Shape.Length == 3)
        {
            RequireShape(q, op, batch, -1, headDim);
            (tokens, heads) = (1, q.Shape[1]);
        }
        else
        {
            RequireShape(q, op, batch, -1, -1, headDim);
            (tokens, heads) = (q.Shape[1], q.Shape[2]);
        }
        if (tokens < 1)
        {
            throw new ArgumentException($"{op}: '{q.Name}' {q.ShapeText} holds no query");
        }
        RequireHeads(op, q, heads, keyCache, kvHeads);
        RequireDType(contexts, op, DType.I32);
        RequireShape(contexts, op, batch);
        ArgumentOutOfRangeException.ThrowIfNegative(maxContext);
        maxContext = Math.Min(maxContext, capacity);
        RequireDType(layer.Indices, op, DType.I32);
        RequireShape(layer.Indices, op, batch, options.MaxIndices);
        RequireDType(layer.IndexCounts, op, DType.I32);
        RequireShape(layer.IndexCounts, op, batch);
        RequireDType(layer.CachedQuery, op, DType.F32);
        RequireShape(layer.CachedQuery, op, batch, heads * headDim);
        RequireDType(layer.State, op, DType.I32);
        RequireShape(layer.State, op, batch, KvSelectStateFields);
        RequireDType(scratch.Scores, op, DType.F32);
        RequireShape(scratch.Scores, op, batch, heads, capacity);
        RequireShape(scratch.Partials, op, batch, heads, KvSelectScoreTiles(capacity), 2);
        RequireShape(scratch.Softmax, op, batch, heads, 2);
        RequireShape(scratch.Votes, op, batch, capacity);
        RequireShape(scratch.Histogram, op, batch, KvSelectBins);
        RequireShape(scratch.TileCounts, op, batch, KvSelectCountTiles(capacity), 2);
        int groupBytes = heads / kvHeads * (headDim + KvSelectTile) * 4;
        if (groupBytes > DecodeSharedBudget)
        {
            throw new ArgumentException($"{op}: a GQA group of {heads / kvHeads} heads at head_dim {headDim} needs {groupBytes} bytes of shared memory (at most {DecodeSharedBudget})");
        }
        LaunchKvSelect(device, Suffix(q.DType), q.Address, keyCache.Address, contexts.Address, maxContext, options, useCache && options.UsesCache, scratch,
            layer, batch, tokens, heads, kvHeads, headDim, capacity, stream, scoresOnly);
    }

    private static void LaunchKvSelect(CudaDevice device, string suffix, ulong q, ulong keyCache, ulong contexts, int maxContext, KvSelectOptions options,
        bool useCache, KvSelectScratch scratch, KvSelectLayerTensors layer, int batch, int tokens, int heads, int kvHeads, int headDim, int capacity,
        nint stream, bool scoresOnly)
    {
        if (batch == 0)
        {
            return;
        }
        int width = heads * headDim;
        int maxCandidates = Math.Max(0, maxContext - options.Initial - options.Local);
        int scoreTiles = KvSelectScoreTiles(capacity);
        int countTiles = KvSelectCountTiles(capacity);
        // The score kernel walks its tiles grid-stride: at most about 8 blocks per SM over the whole grid, so a step that does
        // not select (a cache hit, a short sequence) costs one short wave.
        int gridTiles = Math.Clamp((maxCandidates + KvSelectTile - 1) / KvSelectTile, 1, Math.Max(1, 8 * device.MultiprocessorCount / (kvHeads * batch)));
        int gridCountTiles = Math.Max(1, (maxCandidates + KvSelectCountTile - 1) / KvSelectCountTile);
        int gridVotes = Math.Max(1, (maxCandidates + KvSelectThreads - 1) / KvSelectThreads);
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];

        var a = new KernelArguments(values, pointers);
        a.Add(q);
        a.Add(contexts);
        a.Add(layer.CachedQuery.Address);
        a.Add(layer.State.Address);
        a.Add(scratch.Histogram.Address);
        a.Add(tokens);
        a.Add(width);
        a.Add(options.Initial);
        a.Add(options.TopK);
        a.Add(options.Local);
        a.Add(options.CacheThreshold);
        a.Add(useCache ? 1 : 0);
        device.Backend.Launch(device.Function(KernelName("kv_select_begin", suffix)), new Dim3(batch), new Dim3(KvSelectThreads), 0, stream, a.Pointers);

        if (maxCandidates > options.TopK)
        {
            a = new KernelArguments(values, pointers);
            a.Add(q);
            a.Add(keyCache);
            a.Add(contexts);
            a.Add(layer.State.Address);
            a.Add(scratch.Scores.Address);
            a.Add(scratch.Partials.Address);
            a.Add(tokens);
            a.Add(heads);
            a.Add(kvHeads);
            a.Add(headDim);
            a.Add(capacity);
            a.Add(options.Initial);
            a.Add(options.Local);
            a.Add(scoreTiles);
            a.Add(1f / MathF.Sqrt(headDim));
            int shared = heads / kvHeads * (headDim + KvSelectTile) * 4;
            device.Backend.Launch(device.Function(KernelName("kv_select_score", suffix)), new Dim3(gridTiles, kvHeads, batch), new Dim3(KvSelectScoreThreads),
                shared, stream, a.Pointers);
            if (scoresOnly)
            {
                return;
            }

            a = new KernelArguments(values, pointers);
            a.Add(contexts);
            a.Add(layer.State.Address);
            a.Add(scratch.Partials.Address);
            a.Add(scratch.Softmax.Address);
            a.Add(heads);
            a.Add(options.Initial);
            a.Add(options.Local);
            a.Add(scoreTiles);
            device.Backend.Launch(device.Function("kv_select_softmax"), new Dim3(heads, batch), new Dim3(KvSelectThreads), 0, stream, a.Pointers);

            a = new KernelArguments(values, pointers);
            a.Add(contexts);
            a.Add(layer.State.Address);
            a.Add(scratch.Scores.Address);
            a.Add(scratch.Softmax.Address);
            a.Add(scratch.Votes.Address);
            a.Add(scratch.Histogram.Address);
            a.Add(heads);
            a.Add(capacity);
            a.Add(options.Initial);
            a.Add(options.Local);
            device.Backend.Launch(device.Function("kv_select_vote"), new Dim3(gridVotes, batch), new Dim3(KvSelectThreads), 0, stream, a.Pointers);

            for (int pass = 0; pass < 4; pass++)
            {
                if (pass > 0)
                {
                    a = new KernelArguments(values, pointers);
                    a.Add(contexts);
                    a.Add(layer.State.Address);
                    a.Add(scratch.Votes.Address);
                    a.Add(scratch.Histogram.Address);
                    a.Add(capacity);
                    a.Add(options.Initial);
                    a.Add(options.Local);
                    a.Add(pass);
                    device.Backend.Launch(device.Function("kv_select_histogram"), new Dim3(gridCountTiles, batch), new Dim3(KvSelectThreads), 0, stream,
                        a.Pointers);
                }
                a = new KernelArguments(values, pointers);
                a.Add(layer.State.Address);
                a.Add(scratch.Histogram.Address);
                a.Add(pass);
                device.Backend.Launch(device.Function("kv_select_radix"), new Dim3(batch), new Dim3(KvSelectBins), 0, stream, a.Pointers);
            }

            a = new KernelArguments(values, pointers);
            a.Add(contexts);
            a.Add(layer.State.Address);
            a.Add(scratch.Votes.Address);
            a.Add(scratch.TileCounts.Address);
            a.Add(capacity);
            a.Add(options.Initial);
            a.Add(options.Local);
            a.Add(countTiles);
            device.Backend.Launch(device.Function("kv_select_count"), new Dim3(gridCountTiles, batch), new Dim3(KvSelectThreads), 0, stream, a.Pointers);

            a = new KernelArguments(values, pointers);
            a.Add(contexts);
            a.Add(layer.State.Address);
            a.Add(scratch.Votes.Address);
            a.Add(scratch.TileCounts.Address);
            a.Add(layer.Indices.Address);
            a.Add(capacity);
            a.Add(options.Initial);
            a.Add(options.Local);
            a.Add(countTiles);
            a.Add(options.MaxIndices);
            device.Backend.Launch(device.Function("kv_select_emit"), new Dim3(gridCountTiles, batch), new Dim3(KvSelectThreads), 0, stream, a.Pointers);
        }

        a = new KernelArguments(values, pointers);
        a.Add(contexts);
        a.Add(layer.Indices.Address);
        a.Add(layer.IndexCounts.Address);
        a.Add(options.Initial);
        a.Add(options.TopK);
        a.Add(options.Local);
        a.Add(options.MaxIndices);
        device.Backend.Launch(device.Function("kv_select_frame"), new Dim3(batch), new Dim3(KvSelectThreads), 0, stream, a.Pointers);
    }
}
