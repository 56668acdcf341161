namespace KernelLM.Runtime.Cuda.Ops;

/// <summary>
/// The attention hook on the CUDA device (docs/conventions.md, "Attention hook"; the CPU twin is
/// <see cref="AttentionHook"/>). Every part is optional; <c>default</c> is off.
/// </summary>
/// <param name="KeyBias">[batch, heads, capacity] F32 added to the scaled score of (head, key position); -inf masks.</param>
/// <param name="Indices">[batch, max_indices] I32: per sequence, ascending cache positions shared by all heads.</param>
/// <param name="IndexCounts">[batch] I32: how many entries of each sequence's row of <paramref name="Indices"/> are used.
/// Given together with Indices or not at all.</param>
/// <param name="RopeInverseFrequencies">[head_dim / 2] F32: compacted RoPE (TokenSelect's compacted position mode). The cache holds
/// keys before RoPE and q is unrotated; attention rotates each key by its slot index in the list (the position without a list)
/// and the query by its own slot (attention.cu's header). Null: keys and queries are used as given.</param>
public readonly record struct DeviceAttentionHook(DeviceTensor? KeyBias = null, DeviceTensor? Indices = null, DeviceTensor? IndexCounts = null,
    DeviceTensor? RopeInverseFrequencies = null);

/// <summary>Launchers of attention.cu: kv_append, attention_decode (+ its merge), attention_prefill.</summary>
public static partial class CudaOps
{
    /// <summary>head_dim bound of the kernels (register arrays are sized for it).</summary>
    public const int AttentionMaxHeadDim = 256;

    /// <summary>Keys per warp tile of the decode kernel and per tile of the prefill kernel.</summary>
    private const int AttentionTile = 32;

    /// <summary>Query heads one decode block serves (a larger GQA group is cut into equal parts): 8 in the head_dim
    /// 64 / 128 variants, 4 in the any-head_dim one, whose lanes hold up to 8 dimensions per head.</summary>
    private static int DecodeMaxHeads(int headDim) => HeadDimVariant(headDim).Length > 0 ? 8 : 4;

    /// <summary>Split count ceiling: the merge kernel reads every split's state per output element.</summary>
    private const int DecodeMaxSplits = 64;

    /// <summary>Fewest slots a split gets: one 32-key tile for each of the block's four warps.</summary>
    private const int DecodeMinSlotsPerSplit = 4 * AttentionTile;

    /// <summary>Dynamic shared memory a decode block may use: 2 blocks per SM on an H100/H200 (227 KB), 1 on an
    /// A100 (163 KB). Fewer warps per block when the K/V tiles would exceed it (head_dim 256 in f32).</summary>
    private const int DecodeSharedBudget = 100 * 1024;

    /// <summary>
    /// Writes a chunk's keys (after RoPE, rotate-half, angle = position x inv_freq in fp32) and values into one
    /// layer's device KV cache at positions starts[b] + t. k, v: [batch, tokens, kv_heads, head_dim];
    /// keyCache, valueCache: [batch, kv_heads, capacity, head_dim], all the same dtype; starts: [batch] I32;
    /// inverseFrequencies: [head_dim / 2] F32. Positions outside [0, capacity) are skipped on the device (the
    /// caller keeps starts[b] + tokens within the capacity).
    /// </summary>
    public static void KvAppend(CudaDevice device, DeviceTensor k, DeviceTensor v, DeviceTensor starts, DeviceTensor inverseFrequencies,
        DeviceTensor keyCache, DeviceTensor valueCache, nint stream = 0)
    {
        const string op = "kv_append";
        var cache = CacheShape(op, keyCache, valueCache);
        RequireDType(k, op, DType.F32, DType.BF16, DType.F16);
        RequireSameDType(k, keyCache, op);
        RequireSameDType(v, keyCache, op);
        RequireShape(k, op, cache.Batch, -1, cache.KvHeads, cache.HeadDim);
        int tokens = k.Shape[1];
        RequireShape(v, op, cache.Batch, tokens, cache.KvHeads, cache.HeadDim);
        RequireDType(starts, op, DType.I32);
        RequireShape(starts, op, cache.Batch);
        RequireDType(inverseFrequencies, op, DType.F32);
        RequireShape(inverseFrequencies, op, cache.HeadDim / 2);
        LaunchKvAppend(device, KernelName("kv_append", Suffix(k.DType)), k.Address, v.Address, starts.Address, inverseFrequencies.Address,
            keyCache.Address, valueCache.Address, cache.Batch, tokens, cache.KvHeads, cache.HeadDim, cache.Capacity, stream);
    }

    /// <summary>
    /// Flash-decoding: one query per sequence against one layer's cache. q, output: [batch, heads, head_dim];
    /// keyCache, valueCache: [batch, kv_heads, capacity, head_dim], all the same dtype; lengths: [batch] I32
    /// (valid positions including the new token: the query is at lengths[b] - 1). <paramref name="maxLength"/>
    /// bounds lengths[b] on the host and sizes the split (a low bound costs balance, not correctness).
    /// <paramref name="workspace"/>: F32 of at least <see cref="AttentionDecodeWorkspaceElements"/> elements for
    /// the split count used (may be null when that is 0). <paramref name="splits"/>: 0 chooses
    /// (<see cref="AttentionDecodeSplits"/>); a positive value forces it (tests, tuning).
    /// </summary>
    public static void AttentionDecode(CudaDevice device, DeviceTensor q, DeviceTensor keyCache, DeviceTensor valueCache, DeviceTensor lengths,
        int maxLength, int slidingWindow, DeviceTensor? workspace, DeviceTensor output, DeviceAttentionHook hook = default, int splits = 0,
        nint stream = 0)
    {
        const string op = "attention_decode";
        var cache = CacheShape(op, keyCache, valueCache);
        RequireSameDType(q, keyCache, op);
        RequireSameDType(output, keyCache, op);
        RequireShape(q, op, cache.Batch, -1, cache.HeadDim);
        int heads = q.Shape[1];
        RequireHeads(op, q, heads, keyCache, cache.KvHeads);
        RequireShape(output, op, cache.Batch, heads, cache.HeadDim);
        RequireDType(lengths, op, DType.I32);
        RequireShape(lengths, op, cache.Batch);
        ArgumentOutOfRangeException.ThrowIfNegative(maxLength);
        ArgumentOutOfRangeException.ThrowIfNegative(slidingWindow);
        ArgumentOutOfRangeException.ThrowIfNegative(splits);
        int maxIndices = RequireHook(op, hook, cache.Batch, heads, cache.Capacity);
        RequireRope(op, hook, cache.HeadDim);
        int keys = DecodeKeyBound(Math.Min(maxLength, cache.Capacity), slidingWindow, hook.Indices is null ? -1 : maxIndices);
        int chosen = splits > 0 ? splits : AttentionDecodeSplits(device, cache.Batch, heads, cache.KvHeads, cache.HeadDim, keys);
        long needed = AttentionDecodeWorkspaceElements(cache.Batch, heads, cache.HeadDim, chosen);
        if (needed > 0)
        {
            if (workspace is null || workspace.DType != DType.F32 || workspace.ElementCount < needed)
            {
                throw new ArgumentException($"{op}: workspace {(workspace is null ? "null" : $"'{workspace.Name}' {workspace.ShapeText} {workspace.DType}")} " +
                                            $"must be F32 with at least {needed} elements for {chosen} splits");
            }
        }
        int slotsPerSplit = (keys + chosen - 1) / chosen;
        LaunchAttentionDecode(device, Suffix(q.DType), q.Address, keyCache.Address, valueCache.Address, lengths.Address, Address(hook.KeyBias),
            Address(hook.Indices), Address(hook.IndexCounts), Address(hook.RopeInverseFrequencies), workspace?.Address ?? 0, output.Address, cache.Batch, heads, cache.KvHeads,
            cache.HeadDim, cache.Capacity, slidingWindow, maxIndices, chosen, slotsPerSplit, stream);
    }

    /// <summary>
    /// Causal attention of a chunk of <c>tokens</c> queries per sequence at positions starts[b] + t, whose keys and
    /// values are already appended. q, output: [batch, tokens, heads, head_dim]; keyCache, valueCache:
    /// [batch, kv_heads, capacity, head_dim], all the same dtype; starts: [batch] I32.
    /// </summary>
    public static void AttentionPrefill(CudaDevice device, DeviceTensor q, DeviceTensor keyCache, DeviceTensor valueCache, DeviceTensor starts,
        int slidingWindow, DeviceTensor output, DeviceAttentionHook hook = default, nint stream = 0)
    {
        const string op = "attention_prefill";
        var cache = CacheShape(op, keyCache, valueCache);
        RequireSameDType(q, keyCache, op);
        RequireSameDType(output, keyCache, op);
        RequireShape(q, op, cache.Batch, -1, -1, cache.HeadDim);
        int tokens = q.Shape[1], heads = q.Shape[2];
        RequireHeads(op, q, heads, keyCache, cache.KvHeads);
        RequireShape(output, op, cache.Batch, tokens, heads, cache.HeadDim);
        RequireDType(starts, op, DType.I32);
        RequireShape(starts, op, cache.Batch);
        ArgumentOutOfRangeException.ThrowIfNegative(slidingWindow);
        int maxIndices = RequireHook(op, hook, cache.Batch, heads, cache.Capacity);
        RequireRope(op, hook, cache.HeadDim);
        LaunchAttentionPrefill(device, Suffix(q.DType), q.Address, keyCache.Address, valueCache.Address, starts.Address, Address(hook.KeyBias),
            Address(hook.Indices), Address(hook.IndexCounts), Address(hook.RopeInverseFrequencies), output.Address, cache.Batch, tokens, heads, cache.KvHeads, cache.HeadDim,
            cache.Capacity, slidingWindow, maxIndices, stream);
    }

    /// <summary>
    /// The decode split count for sequences attending to at most <paramref name="keys"/> keys: enough blocks for two
    /// per SM, at least <see cref="DecodeMinSlotsPerSplit"/> keys per split, at most <see cref="DecodeMaxSplits"/>.
    /// Non-decreasing in <paramref name="keys"/>, so a workspace sized for the cache capacity fits every call.
    /// </summary>
    public static int AttentionDecodeSplits(CudaDevice device, int batch, int heads, int kvHeads, int headDim, int keys)
    {
        int blocks = batch * kvHeads * DecodeHeadBlocks(heads, kvHeads, headDim).PerKvHead;
        int wanted = (2 * device.MultiprocessorCount + blocks - 1) / Math.Max(1, blocks);
        int mostUseful = Math.Max(1, (keys + DecodeMinSlotsPerSplit - 1) / DecodeMinSlotsPerSplit);
        return Math.Clamp(wanted, 1, Math.Min(mostUseful, DecodeMaxSplits));
    }

    /// <summary>F32 elements of the decode workspace: [batch, heads, splits, 2] (max, sum) and
    /// [batch, heads, splits, head_dim] (accumulators); 0 for one split, which writes the output directly.</summary>
    public static long AttentionDecodeWorkspaceElements(int batch, int heads, int headDim, int splits) =>
        splits <= 1 ? 0 : (long)batch * heads * splits * (headDim + 2);

    // ---------------------------------------------------------------- launchers

    private static void LaunchKvAppend(CudaDevice device, string kernel, ulong k, ulong v, ulong starts, ulong inverseFrequencies,
        ulong keyCache, ulong valueCache, int batch, int tokens, int kvHeads, int headDim, int capacity, nint stream)
    {
        if (batch == 0 || tokens == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(k);
        arguments.Add(v);
        arguments.Add(starts);
        arguments.Add(inverseFrequencies);
        arguments.Add(keyCache);
        arguments.Add(valueCache);
        arguments.Add(tokens);
        arguments.Add(kvHeads);
        arguments.Add(headDim);
        arguments.Add(capacity);
        // One thread per rotated pair.
        int threads = (headDim / 2 + 31) / 32 * 32;
        device.Backend.Launch(device.Function(kernel), new Dim3(tokens, kvHeads, batch), new Dim3(threads), 0, stream, arguments.Pointers);
    }

    private static void LaunchAttentionDecode(CudaDevice device, string suffix, ulong q, ulong keyCache, ulong valueCache, ulong lengths,
        ulong bias, ulong indices, ulong indexCounts, ulong ropeInverseFrequencies, ulong workspace, ulong output, int batch, int heads, int kvHeads, int headDim,
        int capacity, int window, int maxIndices, int splits, int slotsPerSplit, nint stream)
    {
        if (batch == 0)
        {
            return;
        }
        var (blocksPerKvHead, headsPerBlock) = DecodeHeadBlocks(heads, kvHeads, headDim);
        int elementSize = suffix == "f32" ? 4 : 2;
        // Per warp: K and V tiles of 32 rows (head_dim + 16 bytes of padding), 32 probabilities per head, 32 positions.
        int warpBytes = 2 * AttentionTile * (headDim * elementSize + 16) + headsPerBlock * AttentionTile * 4 + AttentionTile * 4;
        int queryBytes = headsPerBlock * headDim * 4;
        int warps = Math.Clamp((DecodeSharedBudget - queryBytes) / warpBytes, 1, 4);
        int sharedBytes = queryBytes + warps * warpBytes;
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(q);
        arguments.Add(keyCache);
        arguments.Add(valueCache);
        arguments.Add(lengths);
        arguments.Add(bias);
        arguments.Add(indices);
        arguments.Add(indexCounts);
        arguments.Add(ropeInverseFrequencies);
        arguments.Add(splits > 1 ? workspace : 0UL);
        arguments.Add(splits > 1 ? 0UL : output);     // one split normalises and writes the output itself
        arguments.Add(heads);
        arguments.Add(kvHeads);
        arguments.Add(headDim);
        arguments.Add(capacity);
        arguments.Add(window);
        arguments.Add(maxIndices);
        arguments.Add(slotsPerSplit);
        arguments.Add(1f / MathF.Sqrt(headDim));
        device.Backend.Launch(device.Function(KernelName("attention_decode", suffix, HeadDimVariant(headDim))), new Dim3(kvHeads * blocksPerKvHead, splits, batch),
            new Dim3(warps * 32), sharedBytes, stream, arguments.Pointers);
        if (splits > 1)
        {
            Span<byte> mergeValues = stackalloc byte[KernelArguments.ValueBytes];
            Span<nint> mergePointers = stackalloc nint[KernelArguments.MaxArguments];
            var merge = new KernelArguments(mergeValues, mergePointers);
            merge.Add(workspace);
            merge.Add(output);
            merge.Add(heads);
            merge.Add(headDim);
            merge.Add(splits);
            // One thread per output dimension.
            device.Backend.Launch(device.Function(KernelName("attention_decode_merge", suffix)), new Dim3(heads, batch), new Dim3((headDim + 31) / 32 * 32),
                0, stream, merge.Pointers);
        }
    }

    private static void LaunchAttentionPrefill(CudaDevice device, string suffix, ulong q, ulong keyCache, ulong valueCache, ulong starts,
        ulong bias, ulong indices, ulong indexCounts, ulong ropeInverseFrequencies, ulong output, int batch, int tokens, int heads, int kvHeads, int headDim, int capacity,
        int window, int maxIndices, nint stream)
    {
        if (batch == 0 || tokens == 0)
        {
            return;
        }
        string variant = HeadDimVariant(headDim);
        // 4 warps x 8 row groups x rows per lane (2 in the head_dim 64/128 variants, else 1).
        int blockRows = variant.Length > 0 ? 64 : 32;
        int rows = tokens * (heads / kvHeads);
        // Q tile and K, V tiles as f32 with 4 floats of padding per row, a 32 (+4) column P strip per row, 32 positions.
        int sharedBytes = (blockRows + 2 * AttentionTile) * (headDim + 4) * 4 + blockRows * (AttentionTile + 4) * 4 + AttentionTile * 4;
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(q);
        arguments.Add(keyCache);
        arguments.Add(valueCache);
        arguments.Add(starts);
        arguments.Add(bias);
        arguments.Add(indices);
        arguments.Add(indexCounts);
        arguments.Add(ropeInverseFrequencies);
        arguments.Add(output);
        arguments.Add(tokens);
        arguments.Add(heads);
        arguments.Add(kvHeads);
        arguments.Add(headDim);
        arguments.Add(capacity);
        arguments.Add(window);
        arguments.Add(maxIndices);
        arguments.Add(1f / MathF.Sqrt(headDim));
        device.Backend.Launch(device.Function(KernelName("attention_prefill", suffix, variant)), new Dim3(Blocks(rows, blockRows), kvHeads, batch),
            new Dim3(128), sharedBytes, stream, arguments.Pointers);
    }

    // ---------------------------------------------------------------- shape checks and grid maths

    private readonly record struct KvCacheShape(int Batch, int KvHeads, int Capacity, int HeadDim);

    private static KvCacheShape CacheShape(string op, DeviceTensor keyCache, DeviceTensor valueCache)
    {
        RequireDType(keyCache, op, DType.F32, DType.BF16, DType.F16);
        RequireSameDType(valueCache, keyCache, op);
        if (keyCache.Shape.Length != 4)
        {
            throw new ArgumentException($"{op}: key cache '{keyCache.Name}' has shape {keyCache.ShapeText}; expected [batch, kv_heads, capacity, head_dim]");
        }
        if (!keyCache.Shape.AsSpan().SequenceEqual(valueCache.Shape))
        {
            throw new ArgumentException($"{op}: value cache '{valueCache.Name}' {valueCache.ShapeText} must have the key cache '{keyCache.Name}' shape {keyCache.ShapeText}");
        }
        int headDim = keyCache.Shape[3];
        if (headDim % 8 != 0 || headDim < 8 || headDim > AttentionMaxHeadDim)
        {
            throw new ArgumentException($"{op}: key cache '{keyCache.Name}' has head_dim {headDim}; the kernels take multiples of 8 up to {AttentionMaxHeadDim}");
        }
        return new KvCacheShape(keyCache.Shape[0], keyCache.Shape[1], keyCache.Shape[2], headDim);
    }

    /// <summary>Rank and dimensions (-1: any) of a tensor, naming it and the expected shape.</summary>
    private static void RequireShape(DeviceTensor tensor, string op, params ReadOnlySpan<int> expected)
    {
        bool matches = tensor.Shape.Length == expected.Length;
        for (int i = 0; matches && i < expected.Length; i++)
        {
            matches = expected[i] < 0 || tensor.Shape[i] == expected[i];
        }
        if (!matches)
        {
            string text = "[" + string.Join(", ", expected.ToArray().Select(d => d < 0 ? "*" : d.ToString(System.Globalization.CultureInfo.InvariantCulture))) + "]";
            throw new ArgumentException($"{op}: tensor '{tensor.Name}' has shape {tensor.ShapeText}; expected {text}");
        }
        // The attention kernels load rows 16 bytes at a time (views may start anywhere the dtype allows).
        if (tensor.DType.IsSupported() && tensor.Address % 16 != 0)
        {
            throw new ArgumentException($"{op}: tensor '{tensor.Name}' {tensor.ShapeText} starts at a device address that is not 16-byte aligned (the kernel's vector loads need it)");
        }
    }

    private static void RequireHeads(string op, DeviceTensor q, int heads, DeviceTensor keyCache, int kvHeads)
    {
        if (heads <= 0 || kvHeads <= 0 || heads % kvHeads != 0)
        {
            throw new ArgumentException($"{op}: '{q.Name}' has {heads} query heads, not a multiple of the {kvHeads} KV heads of '{keyCache.Name}'");
        }
    }

    /// <summary>Checks the hook's tensors; returns max_indices (0 without an index list).</summary>
    private static int RequireHook(string op, DeviceAttentionHook hook, int batch, int heads, int capacity)
    {
        if (hook.KeyBias is { } bias)
        {
            RequireDType(bias, op, DType.F32);
            RequireShape(bias, op, batch, heads, capacity);
        }
        if ((hook.Indices is null) != (hook.IndexCounts is null))
        {
            throw new ArgumentException($"{op}: the index list needs both indices and index counts (got only '{(hook.Indices ?? hook.IndexCounts)!.Name}')");
        }
        if (hook.Indices is not { } indices)
        {
            return 0;
        }
        RequireDType(indices, op, DType.I32);
        RequireShape(indices, op, batch, -1);
        RequireDType(hook.IndexCounts!, op, DType.I32);
        RequireShape(hook.IndexCounts!, op, batch);
        return indices.Shape[1];
    }

    private static void RequireRope(string op, DeviceAttentionHook hook, int headDim)
    {
        if (hook.RopeInverseFrequencies is { } frequencies)
        {
            RequireDType(frequencies, op, DType.F32);
            RequireShape(frequencies, op, headDim / 2);
        }
    }

    /// <summary>Keys any decode query can see: its length, cut by the window and by the index list's width.</summary>
    private static int DecodeKeyBound(int maxLength, int window, int maxIndices)
    {
        int keys = maxLength;
        if (window > 0)
        {
            keys = Math.Min(keys, window);
        }
        if (maxIndices >= 0)
        {
            keys = Math.Min(keys, maxIndices);
        }
        return Math.Max(keys, 1);
    }

    /// <summary>Blocks per KV head and query heads per block: the GQA group, cut into equal parts of at most
    /// <see cref="DecodeMaxHeads"/> (the kernel computes the same from heads and kv_heads).</summary>
    private static (int PerKvHead, int HeadsPerBlock) DecodeHeadBlocks(int heads, int kvHeads, int headDim)
    {
        int group = heads / kvHeads;
        int blocks = (group + DecodeMaxHeads(headDim) - 1) / DecodeMaxHeads(headDim);
        return (blocks, (group + blocks - 1) / blocks);
    }

    private static string HeadDimVariant(int headDim) => headDim switch
    {
        64 => "_hd64",
        128 => "_hd128",
        _ => "",
    };

    private static ulong Address(DeviceTensor? tensor) => tensor?.Address ?? 0;
}
