using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.KvSelect;

namespace KernelLM.Models.Llama;

/// <summary>Called with each named activation when set (dumping and diffing against a reference);
/// values: [tokens, width] fp32.</summary>
public delegate void ActivationObserver(string name, int layer, int tokens, ReadOnlySpan<float> values);

/// <summary>
/// One sequence on a <see cref="LlamaModel"/>: the KV cache and every activation buffer, allocated once at
/// creation for <see cref="Capacity"/> tokens and chunks of up to <c>chunk</c> prompt tokens. Forward
/// allocates nothing. Activation names: embed, attn_norm, q, k, v, attn, attn_out (residual after
/// attention), mlp_norm, mlp (gated product), out (residual after the MLP), final_norm.
/// </summary>
public sealed class LlamaSession : IDecoderSession, ISessionRollback
{
    private readonly LlamaModel _model;
    private readonly CpuDevice _device;
    private readonly KvCache _cache;
    private readonly int _chunk;
    private readonly NativeBuffer<float> _x;        // [chunk, hidden] residual stream
    private readonly NativeBuffer<float> _norm;     // [chunk, hidden]
    private readonly NativeBuffer<float> _q;        // [chunk, heads * head_dim]
    private readonly NativeBuffer<float> _k;        // [chunk, kv_heads * head_dim]
    private readonly NativeBuffer<float> _v;        // [chunk, kv_heads * head_dim]
    private readonly NativeBuffer<float> _attention; // [chunk, heads * head_dim]
    private readonly NativeBuffer<float> _gate;     // [chunk, intermediate]
    private readonly NativeBuffer<float> _up;       // [chunk, intermediate]
    private readonly NativeBuffer<float> _scratch;  // [chunk, intermediate]
    private readonly NativeBuffer<float>[] _buffers;
    private readonly KvSelector? _selector;         // TokenSelect (null: full attention)
    private readonly bool _compacted;               // TokenSelect's compacted positions: keys cached before RoPE

    internal LlamaSession(LlamaModel model, int capacity, int chunk)
    {
        _model = model;
        _device = model.Device;
        var c = model.Config;
        _chunk = Math.Min(model.Options.KvSelect?.Chunk ?? chunk, capacity);
        _selector = model.Options.KvSelect is { } select ? new KvSelector(select, c.Layers, c.Heads, c.KvHeads, c.HeadDim, capacity, _device.Pool) : null;
        _compacted = model.Options.KvSelect?.Positions == KvSelectPositions.Compacted;
        var buffers = new List<NativeBuffer<float>>();
        NativeBuffer<float> Allocate(long length)
        {
            var buffer = new NativeBuffer<float>(length);
            buffers.Add(buffer);
            return buffer;
        }
        try
        {
            _cache = new KvCache(c.Layers, c.KvHeads, c.HeadDim, capacity);
            _x = Allocate((long)_chunk * c.HiddenSize);
            _norm = Allocate((long)_chunk * c.HiddenSize);
            _q = Allocate((long)_chunk * c.Heads * c.HeadDim);
            _k = Allocate((long)_chunk * c.KvHeads * c.HeadDim);
            _v = Allocate((long)_chunk * c.KvHeads * c.HeadDim);
            _attention = Allocate((long)_chunk * c.Heads * c.HeadDim);
            _gate = Allocate((long)_chunk * c.IntermediateSize);
            _up = Allocate((long)_chunk * c.IntermediateSize);
            _scratch = Allocate((long)_chunk * c.IntermediateSize);
        }
        catch
        {
            _cache?.Dispose();
            buffers.ForEach(buffer => buffer.Dispose());
            throw;
        }
        _buffers = [.. buffers];
    }

    public int VocabularySize => _model.Config.VocabularySize;
    public int Capacity => _cache.Capacity;
    public int Length => _cache.Length;
    public KvCache Cache => _cache;

    /// <summary>Bytes this session holds: KV cache plus activations.</summary>
    public long ByteLength => _cache.ByteLength + _buffers.Sum(buffer => buffer.ByteLength) + (_selector?.ByteLength ?? 0);

    public ActivationObserver? Observer { get; set; }

    /// <summary>TokenSelect counts since the last reset, or null without selection.</summary>
    public KvSelectStatistics? KvSelectStatistics => _selector?.Statistics;

    public void Reset()
    {
        _cache.Length = 0;
        _selector?.Reset();
    }

    /// <summary>Rollback: positions [0, length) are kept as they are; the next Forward writes from there.</summary>
    public void Truncate(int length)
    {
        RollbackChecks.Length(length, Length);
        _cache.Length = length;
        _selector?.Invalidate();   // cached selections may list positions that are gone
    }

    public void Forward(ReadOnlySpan<int> tokens, Span<float> logits, bool allPositions = false)
    {
        var config = _model.Config;
        int vocabulary = config.VocabularySize;
        DecoderChecks.Tokens(tokens, Length, Capacity, vocabulary);
        DecoderChecks.Logits(logits.Length, tokens.Length, vocabulary, allPositions);

        int hidden = config.HiddenSize;
        int last = 0;
        // With selection, scoring (every position's logits) runs a token at a time: each position gets the selection
        // its own query would get in decoding.
        int step = _selector is not null && allPositions ? 1 : _chunk;
        for (int start = 0; start < tokens.Length; start += step)
        {
            int count = Math.Min(step, tokens.Length - start);
            ForwardChunk(tokens.Slice(start, count));
            last = count - 1;
            if (allPositions)
            {
                var norm = _norm.Span[..(count * hidden)];
                CpuDevice.RmsNorm(_x.Span, _model.FinalNorm, (float)config.RmsNormEpsilon, norm, count);
                Observe("final_norm", -1, count, norm);
                _device.Linear(norm, count, _model.LmHead, default, logits.Slice(start * vocabulary, count * vocabulary));
            }
        }
        if (!allPositions)
        {
            var row = _x.Span.Slice(last * hidden, hidden);
            var norm = _norm.Span[..hidden];
            CpuDevice.RmsNorm(row, _model.FinalNorm, (float)config.RmsNormEpsilon, norm, 1);
            Observe("final_norm", -1, 1, norm);
            _device.Linear(norm, 1, _model.LmHead, default, logits[..vocabulary]);
        }
    }

    private void ForwardChunk(ReadOnlySpan<int> tokens)
    {
        var config = _model.Config;
        int count = tokens.Length;
        int hidden = config.HiddenSize;
        int start = _cache.Length;
        float epsilon = (float)config.RmsNormEpsilon;
        var x = _x.Span[..(count * hidden)];
        var norm = _norm.Span[..(count * hidden)];
        var q = _q.Span[..(count * config.Heads * config.HeadDim)];
        var k = _k.Span[..(count * config.KvHeads * config.HeadDim)];
        var v = _v.Span[..(count * config.KvHeads * config.HeadDim)];
        var attention = _attention.Span[..(count * config.Heads * config.HeadDim)];
        var gate = _gate.Span[..(count * config.IntermediateSize)];
        var up = _up.Span[..(count * config.IntermediateSize)];

        for (int t = 0; t < count; t++)
        {
            CpuDevice.Embedding(_model.Embedding, tokens[t], x.Slice(t * hidden, hidden));
        }
        Observe("embed", -1, count, x);
        _cache.Length = start + count;

        for (int layer = 0; layer < config.Layers; layer++)
        {
            var weights = _model.Layers[layer];

            CpuDevice.RmsNorm(x, weights.AttentionNorm, epsilon, norm, count);
            Observe("attn_norm", layer, count, norm);
            _device.Linear(norm, count, weights.Query, weights.QueryBias, q);
            _device.Linear(norm, count, weights.Key, weights.KeyBias, k);
            _device.Linear(norm, count, weights.Value, weights.ValueBias, v);
            // Compacted positions (TokenSelect): q and the cached keys stay unrotated, selection scores them so, and
            // attention rotates both by their slots in the selected list.
            if (!_compacted)
            {
                CpuDevice.Rope(q, count, config.Heads, config.HeadDim, start, _model.RopeCos, _model.RopeSin);
                CpuDevice.Rope(k, count, config.KvHeads, config.HeadDim, start, _model.RopeCos, _model.RopeSin);
            }
            Observe("q", layer, count, q);
            Observe("k", layer, count, k);
            Observe("v", layer, count, v);
            _cache.Write(layer, start, count, k, v);
            // TokenSelect: a decode step selects for its own query (context: the cache with it), a prefill chunk for its
            // mean query over the prefix before it.
            ReadOnlySpan<int> selected = default;
            bool selects = _selector is not null && _selector.Select(layer, q, count, _cache, count == 1 ? start + 1 : start, useCache: count == 1, out selected);
            var hook = selects ? new AttentionHook { SelectedPositions = selected } : default;
            if (_compacted)
            {
                hook = hook with { RopeCos = _model.RopeCos, RopeSin = _model.RopeSin };
            }
            _device.Attention(q, _cache, layer, config.Heads, start, count, config.SlidingWindow, attention, hook);
            Observe("attn", layer, count, attention);
            _device.Linear(attention, count, weights.Output, weights.OutputBias, x, accumulate: true);
            Observe("attn_out", layer, count, x);

            CpuDevice.RmsNorm(x, weights.MlpNorm, epsilon, norm, count);
            Observe("mlp_norm", layer, count, norm);
            _device.Linear(norm, count, weights.Gate, default, gate);
            _device.Linear(norm, count, weights.Up, default, up);
            CpuDevice.SiluMultiply(gate, up, _scratch.Span);
            Observe("mlp", layer, count, gate);
            _device.Linear(gate, count, weights.Down, default, x, accumulate: true);
            Observe("out", layer, count, x);
        }
    }

    private void Observe(string name, int layer, int tokens, ReadOnlySpan<float> values) => Observer?.Invoke(name, layer, tokens, values);

    public void Dispose()
    {
        _cache.Dispose();
        foreach (var buffer in _buffers)
        {
            buffer.Dispose();
        }
    }
}
