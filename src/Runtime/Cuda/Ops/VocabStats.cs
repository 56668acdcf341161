namespace KernelLM.Runtime.Cuda.Ops;

/// <summary>
/// How kernels/vocab_stats.cu splits its rows (header comment there): each row is cut into <see cref="Splits"/>
/// slices of <see cref="SliceLength"/> elements (the last one shorter), one block of 256 threads per slice, and a
/// partial state per slice in the caller's workspace.
/// </summary>
public readonly record struct VocabStatsLayout(int Rows, int Vocabulary, int Splits, int SliceLength)
{
    /// <summary>Bytes of workspace the launch needs: one 192-byte partial per (row, slice).</summary>
    public long WorkspaceBytes => (long)Rows * Splits * CudaOps.VocabStatsPartialBytes;

    /// <summary>
    /// The n of <c>Tolerances.VocabSum</c> for this launch: the most roundings one fp32 sum of a row goes through.
    /// A thread adds its entries (at most one scalar head and one scalar tail entry besides its 128-bit loads, or
    /// ceil(slice / 256) scalar ones when the row is not 16-byte aligned), and may rescale its sums once per load step,
    /// about 5 roundings each (expf is within 2 ulp, then a product). The block merge adds 7 serial merges and a
    /// 5-level warp tree of sums after one rescale: 52. The merge of the slices is fp64.
    /// </summary>
    public int SumLength(DType dtype)
    {
        const int block = CudaOps.VocabStatsBlockSize;
        const int blockMerge = 7 * (1 + 5) + 5 + 5;   // 7 serial merges (a sum and a rescale each), 5 tree sums, the tree's one rescale
        int perVector = 16 / dtype.SizeOf();
        int vectors = (SliceLength / perVector + block - 1) / block;
        int vectorPath = vectors * perVector + 2 + 5 * (vectors + 2);
        int scalar = (SliceLength + block - 1) / block;
        int scalarPath = scalar + 5 * scalar;
        return Math.Max(vectorPath, scalarPath) + blockMerge;
    }
}

public static partial class CudaOps
{
    /// <summary>Threads of vocab_stats_f32 / _bf16 (VOCAB_STATS_BLOCK).</summary>
    internal const int VocabStatsBlockSize = 256;

    /// <summary>Threads of vocab_stats_merge (VOCAB_STATS_MERGE_BLOCK): one per slice, so also the most slices per row.</summary>
    internal const int VocabStatsMergeBlockSize = 128;

    /// <summary>sizeof(VocabStatsPartial) in kernels/vocab_stats.cu (static_assert there).</summary>
    public const int VocabStatsPartialBytes = 192;

    /// <summary>Elements per slice to aim for: 8 per thread (one 128-bit bf16 load, two f32 ones).</summary>
    private const int VocabStatsSliceTarget = VocabStatsBlockSize * 8;

    /// <summary>Blocks per launch beyond which rows are not split further: about 8 per SM of a 132-SM H100 / H200, enough
    /// resident loads to cover memory latency; more splitting would only add partials to merge.</summary>
    private const int VocabStatsTargetBlocks = 1024;

    /// <summary>The split of <paramref name="rows"/> rows of <paramref name="vocabulary"/> logits (see kernels/vocab_stats.cu).</summary>
    public static VocabStatsLayout VocabStatsLaunch(int rows, int vocabulary)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfLessThan(vocabulary, 1);
        int wanted = (int)(((long)vocabulary + VocabStatsSliceTarget - 1) / VocabStatsSliceTarget);
        int splits = Math.Min(wanted, Math.Min(VocabStatsMergeBlockSize, Math.Max(1, VocabStatsTargetBlocks / Math.Max(rows, 1))));
        // Slices are a multiple of 8 elements (16 bytes of bf16): every slice starts at the row's alignment modulo 16.
        long slice = ((long)vocabulary + splits - 1) / splits;
        slice = (slice + 7) / 8 * 8;
        splits = (int)((vocabulary + slice - 1) / slice);
        return new VocabStatsLayout(rows, vocabulary, splits, (int)Math.Min(slice, int.MaxValue));
    }

    /// <summary>Bytes of workspace <see cref="VocabStats"/> needs for <paramref name="rows"/> rows of <paramref name="vocabulary"/> logits.</summary>
    public static long VocabStatsWorkspaceBytes(int rows, int vocabulary) => VocabStatsLaunch(rows, vocabulary).WorkspaceBytes;

    /// <summary>
    /// The fused reduction over rows of vocabulary logits (device twin of <see cref="Signals.VocabStats"/>; fields in
    /// <see cref="Signals.VocabStatsField"/> order; arguments in the twin's order). Sources: <paramref name="logits"/>
    /// [rows, vocabulary] F32/BF16; <paramref name="tokens"/> [rows] I32 or null (an id &lt; 0: no token for that row; an id &gt;= vocabulary, which
    /// cannot be checked here without synchronising, gives NaN token fields); <paramref name="reference"/> logits like
    /// <paramref name="logits"/> or null. <paramref name="workspace"/>: any tensor of at least
    /// <see cref="VocabStatsWorkspaceBytes"/> bytes (no initialisation needed; not shared with a launch running
    /// concurrently). Destinations: <paramref name="stats"/> [rows, 9] F32; <paramref name="topIds"/> [rows, topK] I32
    /// and <paramref name="topLogProbs"/> [rows, topK] F32 (may be null when topK is 0). Enqueues two kernels; never synchronises.
    /// </summary>
    public static void VocabStats(CudaDevice device, DeviceTensor logits, int vocabulary, DeviceTensor? tokens, DeviceTensor? reference, int topK,
        DeviceTensor workspace, DeviceTensor stats, DeviceTensor? topIds, DeviceTensor? topLogProbs, nint stream = 0)
    {
        const string op = "vocab_stats";
        RequireDType(logits, op, DType.F32, DType.BF16);
        if (vocabulary <= 0 || logits.ElementCount % vocabulary != 0)
        {
            throw new ArgumentException($"{op}: tensor '{logits.Name}' {logits.ShapeText} is not a whole number of rows of {vocabulary}");
        }
        int rows = checked((int)(logits.ElementCount / vocabulary));
        if ((uint)topK > Signals.VocabStats.MaxTopK)
        {
            throw new ArgumentOutOfRangeException(nameof(topK), topK, $"{op}: top-k must be in 0..{Signals.VocabStats.MaxTopK}");
        }
        if (tokens is not null)
        {
            RequireDType(tokens, op, DType.I32);
            RequireElements(tokens, rows, op, $"[{rows}] (one id per row)");
        }
        if (reference is not null)
        {
            RequireSameDType(logits, reference, op);
            RequireElements(reference, logits.ElementCount, op, $"[{rows}, {vocabulary}] like '{logits.Name}'");
        }
        RequireDType(stats, op, DType.F32);
        RequireElements(stats, (long)rows * Signals.VocabStats.FieldCount, op, $"[{rows}, {Signals.VocabStats.FieldCount}]");
        if (topK > 0 && (topIds is null || topLogProbs is null))
        {
            throw new ArgumentException($"{op}: top-{topK} needs the tensors of top ids and top log-probs");
        }
        if (topIds is not null)
        {
            RequireDType(topIds, op, DType.I32);
            RequireElements(topIds, (long)rows * topK, op, $"[{rows}, {topK}]");
        }
        if (topLogProbs is not null)
        {
            RequireDType(topLogProbs, op, DType.F32);
            RequireElements(topLogProbs, (long)rows * topK, op, $"[{rows}, {topK}]");
        }
        var layout = VocabStatsLaunch(rows, vocabulary);
        if (workspace.ByteLength < layout.WorkspaceBytes)
        {
            throw new ArgumentException($"{op}: workspace '{workspace.Name}' holds {workspace.ByteLength} bytes; [{rows}, {vocabulary}] needs {layout.WorkspaceBytes} (CudaOps.VocabStatsWorkspaceBytes)");
        }
        LaunchVocabStats(device, Suffix(logits.DType), logits.Address, tokens?.Address ?? 0, reference?.Address ?? 0, layout, topK, workspace.Address,
            stats.Address, topIds?.Address ?? 0, topLogProbs?.Address ?? 0, stream);
    }

    private static void LaunchVocabStats(CudaDevice device, string suffix, ulong logits, ulong tokens, ulong reference, VocabStatsLayout layout, int topK,
        ulong workspace, ulong stats, ulong topIds, ulong topLogProbs, nint stream)
    {
        if (layout.Rows == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        // Kernel 1: one block of 256 threads per (row, slice), flattened row-major into grid x (no 65535 limit on rows).
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(logits);
        arguments.Add(reference);
        arguments.Add(tokens);
        arguments.Add(workspace);
        arguments.Add(layout.Vocabulary);
        arguments.Add(layout.SliceLength);
        arguments.Add(layout.Splits);
        arguments.Add(topK);
        device.Backend.Launch(device.Function(KernelName("vocab_stats", suffix)), new Dim3(checked(layout.Rows * layout.Splits)), new Dim3(VocabStatsBlockSize), 0,
            stream, arguments.Pointers);
        // Kernel 2: one block of 128 threads (>= splits) per row merges its partials and writes the outputs.
        arguments = new KernelArguments(values, pointers);
        arguments.Add(workspace);
        arguments.Add(tokens);
        arguments.Add(stats);
        arguments.Add(topIds);
        arguments.Add(topLogProbs);
        arguments.Add(layout.Vocabulary);
        arguments.Add(layout.SliceLength);
        arguments.Add(layout.Splits);
        arguments.Add(topK);
        arguments.Add(reference != 0 ? 1 : 0);
        device.Backend.Launch(device.Function("vocab_stats_merge"), new Dim3(layout.Rows), new Dim3(VocabStatsMergeBlockSize), 0, stream, arguments.Pointers);
    }
}
