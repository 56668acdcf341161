using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;

namespace KernelLM.Runtime.Cuda;

/// <summary>
/// Chooses the next token from one row of logits on the device, the way every device sampler does it: the repetition
/// penalty over the device token history (on a copy of the row), the seeded draw (splitmix64 of the seed and the draw
/// counter), then vocab_stats of the raw row against the chosen id; only the id and the reduced numbers come back.
/// Its buffers are allocated once through the owner's allocator (which counts and frees them), so a step allocates nothing.
/// </summary>
public sealed class DeviceRowSampler
{
    private readonly CudaDevice _device;
    private readonly int _width;
    private readonly DeviceTensor _history;       // [1, capacity] i32: every token fed
    private readonly DeviceTensor _historyLength; // [1] i32
    private readonly DeviceTensor _flags;         // [1, width] i32 zeroed scratch of the repetition penalty
    private readonly DeviceTensor _penalized;     // [1, width] row dtype: the row after the penalty
    private readonly DeviceTensor _sampled;       // [1] i32
    private readonly DeviceTensor _counters;      // [1] u64: draws so far
    private readonly DeviceTensor _stats;         // [1, VocabStats.FieldCount] f32
    private readonly DeviceTensor _topIds;        // [1, MaxTopK] i32
    private readonly DeviceTensor _topLogProbs;   // [1, MaxTopK] f32
    private readonly DeviceTensor _workspace;     // vocab_stats partials of one row
    private readonly DeviceTensor?[] _rowTopIds = new DeviceTensor?[VocabStats.MaxTopK + 1];
    private readonly DeviceTensor?[] _rowTopLogProbs = new DeviceTensor?[VocabStats.MaxTopK + 1];

    /// <param name="allocate">The owner's allocator (name, dtype, shape): the owner counts and frees what it returns.</param>
    public DeviceRowSampler(CudaDevice device, DType rowDType, int width, int capacity, Func<string, DType, int[], DeviceTensor> allocate)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(allocate);
        _device = device;
        _width = width;
        _history = allocate("history", DType.I32, [1, capacity]);
        _historyLength = allocate("history_length", DType.I32, [1]);
        _flags = allocate("penalty_flags", DType.I32, [1, width]);
        _flags.Upload<int>(new int[width]);
        _penalized = allocate("penalized_logits", rowDType, [1, width]);
        _sampled = allocate("sampled", DType.I32, [1]);
        _counters = allocate("draw_counters", DType.U64, [1]);
        _stats = allocate("sample_stats", DType.F32, [1, VocabStats.FieldCount]);
        _topIds = allocate("sample_top_ids", DType.I32, [1, VocabStats.MaxTopK]);
        _topLogProbs = allocate("sample_top_log_probs", DType.F32, [1, VocabStats.MaxTopK]);
        _workspace = allocate("sample_vocab_stats_workspace", DType.I32, [checked((int)((CudaOps.VocabStatsWorkspaceBytes(1, width) + 3) / 4))]);
        SetDrawCounter(0);
    }

    /// <summary>Sets the number of draws made so far (0 after a reset; fewer after a rollback).</summary>
    public void SetDrawCounter(ulong draws)
    {
        Span<ulong> counter = [draws];
        _counters.Upload<ulong>(counter);
    }

    /// <summary>Writes <paramref name="tokens"/> into the history at positions <paramref name="first"/>.. (cut at its
    /// capacity) and sets the history's length to the end of them.</summary>
    public void Record(int first, ReadOnlySpan<int> tokens)
    {
        var kept = tokens[..Math.Max(0, Math.Min(tokens.Length, _history.Shape[1] - first))];
        if (!kept.IsEmpty)
        {
            _device.Backend.CopyHostToDevice(_history.Address + (ulong)first * sizeof(int), System.Runtime.InteropServices.MemoryMarshal.AsBytes(kept), 0);
        }
        Span<int> length = [first + kept.Length];
        _historyLength.Upload<int>(length);
    }

    /// <summary>Throws unless the outputs hold the stats and top-k (0..MaxTopK) a sample writes.</summary>
    public static void CheckOutputs(int topK, Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        int fields = VocabStats.FieldCount;
        if ((uint)topK > VocabStats.MaxTopK || stats.Length < fields || topIds.Length < topK || topLogProbs.Length < topK)
        {
            throw new ArgumentException($"sample: stats need {fields} values and top-{topK} (0..{VocabStats.MaxTopK}) ids and log-probs");
        }
    }

    /// <summary>The chosen id from <paramref name="row"/> ([1, width], f32 or bf16) with <paramref name="options"/>;
    /// stats and top-k of the raw row (before penalty and temperature) for that id.</summary>
    public int Sample(DeviceTensor row, SamplingOptions options, ulong seed, int topK, Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        ArgumentNullException.ThrowIfNull(row);
        ArgumentNullException.ThrowIfNull(options);
        CheckOutputs(topK, stats, topIds, topLogProbs);
        var source = row;
        if (options.RepetitionPenalty != 1f)
        {
            _device.Backend.CopyDeviceToDevice(_penalized.Address, row.Address, row.ByteLength, 0);
            CudaOps.RepetitionPenalty(_device, _penalized, _width, _history, _historyLength, options.RepetitionPenalty, _flags);
            source = _penalized;
        }
        CudaOps.Sample(_device, source, _width, options, _sampled, uniforms: null, _counters, seed);
        var rowIds = topK > 0 ? _rowTopIds[topK] ??= _topIds.View("sample_top_ids", DType.I32, 0, 1, topK) : null;
        var rowLogProbs = topK > 0 ? _rowTopLogProbs[topK] ??= _topLogProbs.View("sample_top_log_probs", DType.F32, 0, 1, topK) : null;
        CudaOps.VocabStats(_device, row, _width, _sampled, null, topK, _workspace, _stats, rowIds, rowLogProbs);
        Span<int> chosen = [0];
        _sampled.Download(chosen);
        _stats.Download(stats[..VocabStats.FieldCount]);
        if (topK > 0)
        {
            rowIds!.Download(topIds[..topK]);
            rowLogProbs!.Download(topLogProbs[..topK]);
        }
        return chosen[0];
    }
}
