using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.KvSelect;

namespace KernelLM.Models.Llama;

/// <summary>
/// One sequence on a <see cref="CudaLlamaModel"/>: the device KV cache and every activation buffer, allocated
/// once for <see cref="Capacity"/> tokens and prefill chunks of up to <c>chunk</c> tokens. The same block as the
/// CPU session (LlamaSession), in the model's dtype with fp32 accumulation in every kernel:
///
///   x = embed(ids)
///   per layer:  h = rms_norm(x);  q, k, v = h Wq^T (+b), h Wk^T (+b), h Wv^T (+b);  q = rope(q)
///               kv_append(k (rope at write), v);  a = attention(q, cache);  x = x + a Wo^T
///               h = rms_norm(x);  x = x + (silu(h Wg^T) * (h Wu^T)) Wd^T
///   logits = rms_norm(x) Wlm^T
///
/// Decode (one token) uses the GEMVs (gate and up fused with SwiGLU) and flash-decoding; prefill chunks use the
/// GEMM and the tiled prefill attention. The views a decode step uses are made once, so a decode step
/// allocates nothing on the host or the device; logits are widened to fp32 on the device and copied back.
///
/// The decode step (embedding to last logits) is captured once as a CUDA graph and replayed: its only host input
/// is one 12-byte copy of (token id, position, length) into device memory, which every kernel of the step reads
/// there. Decode attention is launched for a bound on the context length rather than the length itself: the
/// bound doubles from <see cref="DecodeBucketMin"/> up to the capacity, one graph per bound, captured when first
/// reached (so at most log2(capacity / 128) + 1 captures per session). The same bounds are used without graphs,
/// so the two paths compute the same numbers bit for bit. KERNELLM_CUDA_GRAPHS=0 (or <c>cudaGraphs: false</c>)
/// turns graphs off.
/// </summary>
public sealed class CudaLlamaSession : IDecoderSession, IDeviceReduction, IDeviceSampler, ISessionRollback, KernelLM.Runtime.Composition.IDeviceLogits
{
    private readonly CudaLlamaModel _model;
    private readonly CudaDevice _device;
    private readonly int _chunk;
    private readonly List<DeviceTensor> _owned = [];
    private readonly DeviceTensor[] _keyCache;   // per layer [1, kv_heads, capacity, head_dim]
    private readonly DeviceTensor[] _valueCache; // per layer [1, kv_heads, capacity, head_dim]
    private readonly DeviceTensor _ids;          // [chunk] i32
    private readonly DeviceTensor _embedded;     // [chunk, hidden] f32 (embedding output; x itself when the model is f32)
    private readonly DeviceTensor _x;            // [chunk, hidden] residual stream
    private readonly DeviceTensor _norm;         // [chunk, hidden]
    private readonly DeviceTensor _q;            // [chunk, heads * head_dim]
    private readonly DeviceTensor _k;            // [chunk, kv_heads * head_dim]
    private readonly DeviceTensor _v;            // [chunk, kv_heads * head_dim]
    private readonly DeviceTensor _attention;    // [chunk, heads * head_dim]
    private readonly DeviceTensor _gate;         // [chunk, intermediate]
    private readonly DeviceTensor _up;           // [chunk, intermediate]
    private readonly DeviceTensor _logits;       // [chunk, vocab] model dtype
    private readonly DeviceTensor? _logitsF32;   // [chunk, vocab] f32 (when the model dtype is not f32)
    private readonly DeviceTensor _starts;       // [1] i32: position of the chunk's first token
    private readonly DeviceTensor _lengths;      // [1] i32: valid positions after the chunk
    private readonly DeviceTensor _step;         // [4] i32: a decode step's (token id, position, length, unused)
    private readonly DeviceTensor _stepId, _stepStart, _stepLength; // views of _step
    private readonly CudaGraph?[]? _graphs;      // per decode bound (DecodeBound), captured when first needed
    private readonly nint _stream;               // the graphs' stream (a created, blocking stream), or 0
    private readonly DeviceTensor? _workspace;   // flash-decoding partials
    private readonly Views _decode;              // views for one token, made once
    private readonly DeviceTensor? _targets;     // [chunk] i32: the next ids, for the reduction
    private readonly DeviceTensor? _stats;       // [chunk, VocabStats.FieldCount] f32
    private readonly DeviceTensor? _topIds;      // [chunk, MaxTopK] i32
    private readonly DeviceTensor? _topLogProbs; // [chunk, MaxTopK] f32
    private readonly DeviceTensor? _reduceWorkspace; // vocab_stats partials
    private readonly DeviceRowSampler? _sampler; // penalty history, draw counter and the sampled row's numbers
    private readonly CudaKvSelector? _selector;  // TokenSelect (null: full attention)
    private readonly DeviceTensor? _unrotated;   // [head_dim / 2] f32 zeros: kv_append's inv_freq in compacted mode (keys stored before RoPE)
    private readonly int[] _drawLengths;          // [capacity]: the length at each random draw since Reset (rollback of _counters)
    private int _draws;
    private int _length;
    private bool _disposed;

    /// <summary>Smallest context bound a decode step's attention is launched for (it doubles from here).</summary>
    public const int DecodeBucketMin = 128;

    internal CudaLlamaSession(CudaLlamaModel model, int capacity, int chunk, bool cudaGraphs, KvSelectOptions? kvSelect = null)
    {
        _model = model;
        _device = model.Device;
        var c = model.Config;
        var dtype = model.DType;
        Capacity = capacity;
        _chunk = Math.Max(1, Math.Min(kvSelect?.Chunk ?? chunk, capacity));
        _keyCache = new DeviceTensor[c.Layers];
        _valueCache = new DeviceTensor[c.Layers];
        _drawLengths = new int[capacity];
        try
        {
            for (int layer = 0; layer < c.Layers; layer++)
            {
                _keyCache[layer] = Allocate($"k_cache.{layer}", dtype, 1, c.KvHeads, capacity, c.HeadDim);
                _valueCache[layer] = Allocate($"v_cache.{layer}", dtype, 1, c.KvHeads, capacity, c.HeadDim);
            }
            _ids = Allocate("ids", DType.I32, _chunk);
            _x = Allocate("x", dtype, _chunk, c.HiddenSize);
            _embedded = dtype == DType.F32 ? _x : Allocate("embed", DType.F32, _chunk, c.HiddenSize);
            _norm = Allocate("norm", dtype, _chunk, c.HiddenSize);
            _q = Allocate("q", dtype, _chunk, c.Heads * c.HeadDim);
            _k = Allocate("k", dtype, _chunk, c.KvHeads * c.HeadDim);
            _v = Allocate("v", dtype, _chunk, c.KvHeads * c.HeadDim);
            _attention = Allocate("attn", dtype, _chunk, c.Heads * c.HeadDim);
            _gate = Allocate("gate", dtype, _chunk, c.IntermediateSize);
            _up = Allocate("up", dtype, _chunk, c.IntermediateSize);
            _logits = Allocate("logits", dtype, _chunk, c.VocabularySize);
            _logitsF32 = dtype == DType.F32 ? null : Allocate("logits_f32", DType.F32, _chunk, c.VocabularySize);
            _starts = Allocate("starts", DType.I32, 1);
            _lengths = Allocate("lengths", DType.I32, 1);
            _step = Allocate("decode_step", DType.I32, 4);
            _stepId = _step.View("decode_step.id", DType.I32, 0, 1);
            _stepStart = _step.View("decode_step.start", DType.I32, sizeof(int), 1);
            _stepLength = _step.View("decode_step.length", DType.I32, 2 * sizeof(int), 1);
            if (cudaGraphs)
            {
                _stream = _device.Backend.CreateStream();
                _graphs = new CudaGraph?[BucketIndex(capacity) + 1];
            }
            int splits = CudaOps.AttentionDecodeSplits(_device, 1, c.Heads, c.KvHeads, c.HeadDim, capacity);
            long workspace = CudaOps.AttentionDecodeWorkspaceElements(1, c.Heads, c.HeadDim, splits);
            _workspace = workspace > 0 ? Allocate("attn_workspace", DType.F32, checked((int)workspace)) : null;
            _decode = new Views(this, 1);
            if (kvSelect is { } select)
            {
                _selector = new CudaKvSelector(_device, select, 1, c.Layers, c.Heads, c.HeadDim, capacity);
                if (select.Positions == KvSelectPositions.Compacted)
                {
                    _unrotated = Allocate("kv_append.inv_freq_zero", DType.F32, c.HeadDim / 2);
                    _unrotated.Upload<float>(new float[c.HeadDim / 2]);
                }
            }
            if (dtype is DType.F32 or DType.BF16)
            {
                const int maxTopK = KernelLM.Runtime.Signals.VocabStats.MaxTopK;
                _targets = Allocate("targets", DType.I32, _chunk);
                _stats = Allocate("stats", DType.F32, _chunk, KernelLM.Runtime.Signals.VocabStats.FieldCount);
                _topIds = Allocate("top_ids", DType.I32, _chunk, maxTopK);
                _topLogProbs = Allocate("top_log_probs", DType.F32, _chunk, maxTopK);
                long bytes = 0;
                for (int rows = 1; rows <= _chunk; rows++)
                {
                    bytes = Math.Max(bytes, CudaOps.VocabStatsWorkspaceBytes(rows, c.VocabularySize));
                }
                _reduceWorkspace = Allocate("vocab_stats_workspace", DType.I32, checked((int)((bytes + 3) / 4)));
                _sampler = new DeviceRowSampler(_device, dtype, c.VocabularySize, capacity, (name, type, shape) => Allocate(name, type, shape));
            }
        }
        catch
        {
            FreeAll();
            throw;
        }
    }

    public int VocabularySize => _model.Config.VocabularySize;
    public int Capacity { get; }

    /// <summary>Whether decode steps replay captured CUDA graphs.</summary>
    public bool UsesCudaGraphs => _graphs is not null;

    /// <summary>Decode-step graphs captured so far (one per context bound reached).</summary>
    public int CapturedGraphs => _graphs?.Count(graph => graph is not null) ?? 0;
    public int Length => _length;

    /// <summary>Device bytes this session holds: KV cache, activations and workspace.</summary>
    public long ByteLength => _owned.Sum(t => t.ByteLength) + (_selector?.ByteLength ?? 0);

    /// <summary>TokenSelect counts since the last reset (reads them back from the device), or null without selection.</summary>
    public KvSelectStatistics? KvSelectStatistics => _selector?.Statistics();

    /// <summary>Device bytes of the KV cache alone.</summary>
    public long KvCacheBytes => _keyCache.Sum(t => t.ByteLength) + _valueCache.Sum(t => t.ByteLength);

    public void Reset()
    {
        _length = 0;
        _selector?.Reset();
        _draws = 0;
        _sampler?.SetDrawCounter(0);
    }

    /// <summary>
    /// Rollback: keeps positions [0, length). The device token history needs nothing (ForwardSample writes a feed
    /// at its positions and uploads the length); the draw counter goes back to the draws made at lengths up to
    /// <paramref name="length"/>, so that a rolled-back run draws what a plain run of the kept tokens would.
    /// </summary>
    public void Truncate(int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        RollbackChecks.Length(length, _length);
        _length = length;
        _selector?.Invalidate();   // cached selections may list positions that are gone
        int draws = _draws;
        while (_draws > 0 && _drawLengths[_draws - 1] > length)
        {
            _draws--;
        }
        if (_draws != draws)
        {
            _sampler!.SetDrawCounter((ulong)_draws);
        }
    }

    private DeviceTensor Allocate(string name, DType dtype, params int[] shape)
    {
        var tensor = DeviceMemory.Allocate(_device, name, dtype, shape, $"after {ByteLength:N0} bytes of this session (weights: {_model.WeightBytes:N0} bytes)");
        _owned.Add(tensor);
        return tensor;
    }

    /// <summary>The activation buffers seen as tensors of <c>tokens</c> rows (non-owning views).</summary>
    private sealed class Views
    {
        public Views(CudaLlamaSession s, int tokens)
        {
            var c = s._model.Config;
            var dtype = s._model.DType;
            Tokens = tokens;
            Ids = s._ids.View("ids", DType.I32, 0, tokens);
            Embedded = s._embedded.View("embed", s._embedded.DType, 0, tokens, c.HiddenSize);
            X = s._x.View("x", dtype, 0, tokens, c.HiddenSize);
            Norm = s._norm.View("norm", dtype, 0, tokens, c.HiddenSize);
            LastNorm = s._norm.View("final_norm", dtype, (long)(tokens - 1) * c.HiddenSize * dtype.SizeOf(), 1, c.HiddenSize);
            Q = s._q.View("q", dtype, 0, tokens, c.Heads * c.HeadDim);
            QHeads = s._q.View("q", dtype, 0, 1, tokens, c.Heads, c.HeadDim);
            QDecode = s._q.View("q", dtype, 0, 1, c.Heads, c.HeadDim);
            K = s._k.View("k", dtype, 0, tokens, c.KvHeads * c.HeadDim);
            KHeads = s._k.View("k", dtype, 0, 1, tokens, c.KvHeads, c.HeadDim);
            V = s._v.View("v", dtype, 0, tokens, c.KvHeads * c.HeadDim);
            VHeads = s._v.View("v", dtype, 0, 1, tokens, c.KvHeads, c.HeadDim);
            Attention = s._attention.View("attn", dtype, 0, tokens, c.Heads * c.HeadDim);
            AttentionHeads = s._attention.View("attn", dtype, 0, 1, tokens, c.Heads, c.HeadDim);
            AttentionDecode = s._attention.View("attn", dtype, 0, 1, c.Heads, c.HeadDim);
            Gate = s._gate.View("gate", dtype, 0, tokens, c.IntermediateSize);
            Up = s._up.View("up", dtype, 0, tokens, c.IntermediateSize);
            Logits = s._logits.View("logits", dtype, 0, tokens, c.VocabularySize);
            LastLogits = s._logits.View("logits", dtype, 0, 1, c.VocabularySize);
            LogitsF32 = s._logitsF32?.View("logits_f32", DType.F32, 0, tokens, c.VocabularySize);
            LastLogitsF32 = s._logitsF32?.View("logits_f32", DType.F32, 0, 1, c.VocabularySize);
        }

        public int Tokens { get; }
        public DeviceTensor Ids { get; }
        public DeviceTensor Embedded { get; }
        public DeviceTensor X { get; }
        public DeviceTensor Norm { get; }
        public DeviceTensor LastNorm { get; }
        public DeviceTensor Q { get; }
        public DeviceTensor QHeads { get; }
        public DeviceTensor QDecode { get; }
        public DeviceTensor K { get; }
        public DeviceTensor KHeads { get; }
        public DeviceTensor V { get; }
        public DeviceTensor VHeads { get; }
        public DeviceTensor Attention { get; }
        public DeviceTensor AttentionHeads { get; }
        public DeviceTensor AttentionDecode { get; }
        public DeviceTensor Gate { get; }
        public DeviceTensor Up { get; }
        public DeviceTensor Logits { get; }
        public DeviceTensor LastLogits { get; }
        public DeviceTensor? LogitsF32 { get; }
        public DeviceTensor? LastLogitsF32 { get; }
    }

    public void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var config = _model.Config;
        int vocabulary = config.VocabularySize;
        DecoderChecks.Tokens(tokens, _length, Capacity, vocabulary);
        DecoderChecks.Logits(logits.Length, tokens.Length, vocabulary, allPositions);
        // With selection, scoring runs a token at a time: each position gets the selection its decode step would get.
        int step = _selector is not null && allPositions ? 1 : _chunk;
        for (int start = 0; start < tokens.Length; start += step)
        {
            int count = Math.Min(step, tokens.Length - start);
            bool wanted = allPositions || start + count == tokens.Length;
            if (count == 1)
            {
                Decode(tokens[start]);
                if (wanted)
                {
                    Download(_decode.LastLogits, _decode.LastLogitsF32, logits.Slice(allPositions ? start * vocabulary : 0, vocabulary));
                }
                continue;
            }
            var views = new Views(this, count);
            ForwardChunk(tokens.Slice(start, count), views);
            if (allPositions)
            {
                Head(views, allRows: true, logits.Slice(start * vocabulary, count * vocabulary));
            }
            else if (wanted)
            {
                Head(views, allRows: false, logits[..vocabulary]);
            }
        }
    }

    public CudaDevice LogitsDevice => _device;
    public DType LogitsDType => _model.DType;
    public int LogitsChunk => _chunk;

    /// <summary>The forward of a composition member (IDeviceLogits): the logits stay in <c>_logits</c>, in the model dtype.</summary>
    public DeviceTensor ForwardToDevice(ReadOnlySpan<int> tokens, bool allPositions)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        DecoderChecks.Tokens(tokens, _length, Capacity, _model.Config.VocabularySize);
        if (allPositions)
        {
            if (tokens.Length > _chunk)
            {
                throw new ArgumentException($"every position's logits on the device: at most {_chunk} tokens at once, not {tokens.Length}", nameof(tokens));
            }
            return AllLogits(tokens);
        }
        for (int start = 0; start < tokens.Length; start += _chunk)
        {
            int count = Math.Min(_chunk, tokens.Length - start);
            if (count == 1)
            {
                Decode(tokens[start]);   // leaves the logits in _decode.LastLogits
                continue;
            }
            var views = new Views(this, count);
            ForwardChunk(tokens.Slice(start, count), views);
            if (start + count == tokens.Length)
            {
                LastRowLogits(views);
            }
        }
        return _decode.LastLogits;
    }

    public bool CanReduce => _stats is not null;

    public void ForwardReduce(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int topK, Span<float> stats, Span<int> topIds, Span<float> topLogProbs)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!CanReduce)
        {
            throw new InvalidOperationException($"the device reduction needs f32 or bf16 logits; this model runs in {_model.DType}");
        }
        var config = _model.Config;
        int vocabulary = config.VocabularySize;
        int fields = KernelLM.Runtime.Signals.VocabStats.FieldCount;
        if (targets.Length != tokens.Length || stats.Length < tokens.Length * fields
            || topIds.Length < tokens.Length * topK || topLogProbs.Length < tokens.Length * topK)
        {
            throw new ArgumentException($"reduce: {tokens.Length} tokens need {tokens.Length} targets, stats [{tokens.Length}, {fields}] and top [{tokens.Length}, {topK}]");
        }
        if ((uint)topK > KernelLM.Runtime.Signals.VocabStats.MaxTopK)
        {
            throw new ArgumentOutOfRangeException(nameof(topK), topK, $"top-k must be in 0..{KernelLM.Runtime.Signals.VocabStats.MaxTopK}");
        }
        DecoderChecks.Tokens(tokens, _length, Capacity, vocabulary);
        int step = _selector is not null ? 1 : _chunk;
        for (int start = 0; start < tokens.Length; start += step)
        {
            int count = Math.Min(step, tokens.Length - start);
            var logits = AllLogits(tokens.Slice(start, count));
            ReduceOnDevice(logits, null, targets.Slice(start, count), topK, stats[(start * fields)..], topIds[(start * topK)..], topLogProbs[(start * topK)..]);
        }
    }

    public bool CanSample => _sampler is not null;

    public int ForwardSample(ReadOnlySpan<int> feed, KernelLM.Runtime.Sampling.SamplingOptions options, ulong seed, int topK, Span<float> stats,
        Span<int> topIds, Span<float> topLogProbs)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(options);
        if (!CanSample)
        {
            throw new InvalidOperationException($"sampling on the device needs f32 or bf16 logits; this model runs in {_model.DType}");
        }
        DeviceRowSampler.CheckOutputs(topK, stats, topIds, topLogProbs);
        DecoderChecks.Tokens(feed, _length, Capacity, _model.Config.VocabularySize);
        for (int start = 0; start < feed.Length; start += _chunk)
        {
            int count = Math.Min(_chunk, feed.Length - start);
            if (count == 1)
            {
                Decode(feed[start]);   // leaves the logits in _decode.LastLogits
                continue;
            }
            var views = new Views(this, count);
            ForwardChunk(feed.Slice(start, count), views);
            if (start + count == feed.Length)
            {
                LastRowLogits(views);
            }
        }

        // The history the penalty reads: every token fed so far, on the device.
        _sampler!.Record(_length - feed.Length, feed);
        int chosen = _sampler.Sample(_decode.LastLogits, options, seed, topK, stats, topIds, topLogProbs);
        if (!options.IsGreedy)
        {
            _drawLengths[_draws++] = _length; // the kernel advanced the counter (greedy does not)
        }
        return chosen;
    }

    /// <summary>The last position's logits into <c>_logits</c>' first row (the model dtype), on the device.</summary>
    private void LastRowLogits(Views views)
    {
        var config = _model.Config;
        var last = views.Tokens == 1 ? views.X : _x.View("x", _model.DType, (long)(views.Tokens - 1) * config.HiddenSize * _model.DType.SizeOf(), 1, config.HiddenSize);
        CudaOps.RmsNorm(_device, last, _model.FinalNorm, (float)config.RmsNormEpsilon, views.LastNorm);
        CudaOps.Linear(_device, _model.LmHead, views.LastNorm, views.LastLogits);
    }

    // With selection the scored positions run one at a time; the paired reduction takes whole chunks, so such a pair
    // is reduced on the host (Scorer's fallback).
    public bool CanReduceWith(IDeviceReduction reference) =>
        CanReduce && _selector is null && reference is CudaLlamaSession { _selector: null } other && other.CanReduce && ReferenceEquals(other._device, _device)
        && other._model.DType == _model.DType && other._model.Config.VocabularySize == _model.Config.VocabularySize;

    public void ForwardReduce(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, IDeviceReduction reference, int topK, Span<float> stats,
        Span<int> topIds, Span<float> topLogProbs)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(reference);
        if (!CanReduceWith(reference))
        {
            throw new InvalidOperationException("the reference session must be a CUDA session on the same device, in the same dtype, with the same vocabulary");
        }
        var other = (CudaLlamaSession)reference;
        int count = tokens.Length;
        int vocabulary = _model.Config.VocabularySize;
        int fields = KernelLM.Runtime.Signals.VocabStats.FieldCount;
        if (count > _chunk || count > other._chunk || targets.Length != count || stats.Length < count * fields
            || topIds.Length < count * topK || topLogProbs.Length < count * topK || (uint)topK > KernelLM.Runtime.Signals.VocabStats.MaxTopK)
        {
            throw new ArgumentException($"reduce with a reference: {count} tokens (at most {Math.Min(_chunk, other._chunk)}) need {count} targets, stats [{count}, {fields}] and top [{count}, {topK}]");
        }
        DecoderChecks.Tokens(tokens, _length, Capacity, vocabulary);
        DecoderChecks.Tokens(tokens, other._length, other.Capacity, vocabulary);
        var logits = AllLogits(tokens);
        var referenceLogits = other.AllLogits(tokens);
        ReduceOnDevice(logits, referenceLogits, targets, topK, stats, topIds, topLogProbs);
    }

    /// <summary>Runs one chunk and leaves every position's logits on the device ([count, vocab], model dtype).</summary>
    private DeviceTensor AllLogits(ReadOnlySpan<int> tokens)
    {
        if (tokens.Length == 1)
        {
            Decode(tokens[0]);
            return _decode.Logits;
        }
        var views = new Views(this, tokens.Length);
        ForwardChunk(tokens, views);
        RowsLogits(views);
        return views.Logits;
    }

    /// <summary>Every row's logits into <c>_logits</c> ([tokens, vocab], the model dtype), on the device.</summary>
    private void RowsLogits(Views views)
    {
        CudaOps.RmsNorm(_device, views.X, _model.FinalNorm, (float)_model.Config.RmsNormEpsilon, views.Norm);
        CudaOps.Linear(_device, _model.LmHead, views.Norm, views.Logits);
    }

    /// <summary>vocab_stats over the rows of <paramref name="logits"/> against the targets; only the numbers come back.</summary>
    private void ReduceOnDevice(DeviceTensor logits, DeviceTensor? reference, ReadOnlySpan<int> targets, int topK, Span<float> stats, Span<int> topIds,
        Span<float> topLogProbs)
    {
        int count = targets.Length;
        int fields = KernelLM.Runtime.Signals.VocabStats.FieldCount;
        var targetView = _targets!.View("targets", DType.I32, 0, count);
        targetView.Upload(targets);
        var statsView = _stats!.View("stats", DType.F32, 0, count, fields);
        var idsView = topK > 0 ? _topIds!.View("top_ids", DType.I32, 0, count, topK) : null;
        var logProbsView = topK > 0 ? _topLogProbs!.View("top_log_probs", DType.F32, 0, count, topK) : null;
        CudaOps.VocabStats(_device, logits, _model.Config.VocabularySize, targetView, reference, topK, _reduceWorkspace!, statsView, idsView, logProbsView);
        statsView.Download(stats[..(count * fields)]);
        if (topK > 0)
        {
            idsView!.Download(topIds[..(count * topK)]);
            logProbsView!.Download(topLogProbs[..(count * topK)]);
        }
    }

    private void Head(Views views, bool allRows, Span<float> destination)
    {
        if (allRows)
        {
            RowsLogits(views);
            Download(views.Logits, views.LogitsF32, destination);
        }
        else
        {
            LastRowLogits(views);
            Download(views.LastLogits, views.LastLogitsF32, destination);
        }
    }

    private void Download(DeviceTensor logits, DeviceTensor? widened, Span<float> destination)
    {
        if (widened is null)
        {
            logits.Download(destination);
            return;
        }
        CudaOps.Convert(_device, logits, widened);
        widened.Download(destination);
    }

    /// <summary>One prefill chunk (two or more tokens) at positions Length.., eagerly on the default stream.</summary>
    private void ForwardChunk(ReadOnlySpan<int> tokens, Views views)
    {
        int count = tokens.Length;
        int start = _length;
        views.Ids.Upload(tokens);
        Span<int> position = [start];
        _starts.Upload<int>(position);
        position[0] = start + count;
        _lengths.Upload<int>(position);
        Enqueue(views, views.Ids, _starts, _lengths, maxLength: start + count, stream: 0);
        _length = start + count;
    }

    /// <summary>The context bound a decode step at <paramref name="position"/> launches attention for: a power-of-two
    /// multiple of <see cref="DecodeBucketMin"/>, at most the capacity.</summary>
    private int DecodeBound(int position) => Math.Min(Capacity, DecodeBucketMin << BucketIndex(position + 1));

    private static int BucketIndex(int length)
    {
        int index = 0;
        while ((long)DecodeBucketMin << index < length)
        {
            index++;
        }
        return index;
    }

    /// <summary>One decode step: the token at position Length, through the last logits (left in <c>_decode.LastLogits</c>),
    /// by replaying the step's CUDA graph or, without graphs, launching the same kernels with the same bounds.</summary>
    private void Decode(int token)
    {
        int start = _length;
        Span<int> step = [token, start, start + 1, 0];
        _step.Upload<int>(step);
        int bucket = BucketIndex(start + 1);
        if (_graphs is null)
        {
            EnqueueDecode(DecodeBound(start), 0);
        }
        else
        {
            var graph = _graphs[bucket] ??= CudaGraph.Capture(_device, _stream, (this, DecodeBound(start)),
                static (state, stream) => state.Item1.EnqueueDecode(state.Item2, stream));
            graph.Launch(_stream);
        }
        _length = start + 1;
    }

    /// <summary>Every kernel of a decode step, reading the token, position and length from <c>_step</c>.</summary>
    private void EnqueueDecode(int maxLength, nint stream)
    {
        Enqueue(_decode, _stepId, _stepStart, _stepLength, maxLength, stream);
        var config = _model.Config;
        CudaOps.RmsNorm(_device, _decode.X, _model.FinalNorm, (float)config.RmsNormEpsilon, _decode.LastNorm, stream);
        CudaOps.Linear(_device, _model.LmHead, _decode.LastNorm, _decode.LastLogits, stream: stream);
    }

    /// <summary>The blocks for views.Tokens tokens whose ids, first position and valid length are in device memory;
    /// every host value passed here is the same for each replay of a captured decode step.</summary>
    private void Enqueue(Views views, DeviceTensor ids, DeviceTensor starts, DeviceTensor lengths, int maxLength, nint stream)
    {
        var config = _model.Config;
        int count = views.Tokens;
        float epsilon = (float)config.RmsNormEpsilon;
        CudaOps.Embedding(_device, _model.Embedding, ids, views.Embedded, stream);
        if (!ReferenceEquals(_embedded, _x))
        {
            CudaOps.Convert(_device, views.Embedded, views.X, stream);
        }
        for (int layer = 0; layer < config.Layers; layer++)
        {
            var weights = _model.Layers[layer];
            CudaOps.RmsNorm(_device, views.X, weights.AttentionNorm, epsilon, views.Norm, stream);
            CudaOps.Linear(_device, weights.Query, views.Norm, views.Q, weights.QueryBias, stream: stream);
            CudaOps.Linear(_device, weights.Key, views.Norm, views.K, weights.KeyBias, stream: stream);
            CudaOps.Linear(_device, weights.Value, views.Norm, views.V, weights.ValueBias, stream: stream);
            // Compacted positions (TokenSelect): q and the cached keys stay unrotated (kv_append with a zero inv_freq copies
            // them), selection scores them so, and attention rotates both by their slots in the selected list.
            if (_unrotated is null)
            {
                CudaOps.Rope(_device, views.Q, config.Heads, _model.InverseFrequencies, starts, 0, stream);
            }
            CudaOps.KvAppend(_device, views.KHeads, views.VHeads, starts, _unrotated ?? _model.InverseFrequencies, _keyCache[layer], _valueCache[layer], stream);
            // TokenSelect: a decode step selects for its own query over the cache with it (device lengths, bounded by the
            // step's maxLength), a prefill chunk for its mean query over the prefix before it (device starts, bound
            // maxLength - count = its start). Everything it reads and writes is device memory: it captures with the step.
            var hook = _selector?.Select(layer, count == 1 ? views.QDecode : views.QHeads, _keyCache[layer], count == 1 ? lengths : starts,
                count == 1 ? maxLength : maxLength - count, useCache: count == 1, stream) ?? default;
            if (_unrotated is not null)
            {
                hook = hook with { RopeInverseFrequencies = _model.InverseFrequencies };
            }
            if (count == 1)
            {
                CudaOps.AttentionDecode(_device, views.QDecode, _keyCache[layer], _valueCache[layer], lengths, maxLength, config.SlidingWindow,
                    _workspace, views.AttentionDecode, hook, stream: stream);
            }
            else
            {
                CudaOps.AttentionPrefill(_device, views.QHeads, _keyCache[layer], _valueCache[layer], starts, config.SlidingWindow, views.AttentionHeads,
                    hook, stream: stream);
            }
            CudaOps.Linear(_device, weights.Output, views.Attention, views.X, weights.OutputBias, residual: views.X, stream: stream);

            CudaOps.RmsNorm(_device, views.X, weights.MlpNorm, epsilon, views.Norm, stream);
            if (count <= CudaOps.GemvMaxTokens)
            {
                CudaOps.GemvSilu(_device, weights.Gate, weights.Up, views.Norm, views.Gate, stream);
            }
            else
            {
                CudaOps.Gemm(_device, weights.Gate, views.Norm, views.Gate, stream: stream);
                CudaOps.Gemm(_device, weights.Up, views.Norm, views.Up, stream: stream);
                CudaOps.SiluMultiply(_device, views.Gate, views.Up, stream);
            }
            CudaOps.Linear(_device, weights.Down, views.Gate, views.X, residual: views.X, stream: stream);
        }
    }

    /// <summary>Benchmarks: fills every layer's KV cache with seeded uniform values and takes the first
    /// <paramref name="length"/> positions as the context, without a prefill (long-context decode on random weights).</summary>
    internal void FillCacheForBenchmark(int length, ulong seed)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, Capacity);
        foreach (var tensor in _keyCache.Concat(_valueCache))
        {
            CudaOps.FillUniform(_device, tensor, seed++, 1f);
        }
        _length = length;
    }

    private void FreeAll()
    {
        _selector?.Dispose();
        if (_graphs is not null)
        {
            for (int i = 0; i < _graphs.Length; i++)
            {
                _graphs[i]?.Dispose();
                _graphs[i] = null;
            }
        }
        if (_stream != 0)
        {
            _device.Backend.DestroyStream(_stream);
        }
        foreach (var tensor in _owned)
        {
            tensor.Dispose();
        }
        _owned.Clear();
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        FreeAll();
    }
}
