namespace KernelLM.Runtime;

/// <summary>
/// Keys and values of every layer for one sequence, allocated once at its full capacity.
/// Layout (fp32): k, v: [layer, kv_head, position, head_dim] — one head's keys are contiguous, which is
/// what attention streams through. Keys are stored after RoPE.
/// </summary>
public sealed unsafe class KvCache : IDisposable
{
    private readonly NativeBuffer<float> _keys;
    private readonly NativeBuffer<float> _values;

    public KvCache(int layers, int kvHeads, int headDim, int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        Layers = layers;
        KvHeads = kvHeads;
        HeadDim = headDim;
        Capacity = capacity;
        long elements = (long)layers * kvHeads * capacity * headDim;
        _keys = new NativeBuffer<float>(elements);
        try
        {
            _values = new NativeBuffer<float>(elements);
        }
        catch
        {
            _keys.Dispose();
            throw;
        }
    }

    public int Layers { get; }
    public int KvHeads { get; }
    public int HeadDim { get; }
    public int Capacity { get; }

    /// <summary>Positions [0, Length) hold valid keys and values.</summary>
    public int Length { get; set; }

    public long ByteLength => _keys.ByteLength + _values.ByteLength;

    private long Offset(int layer, int kvHead, int position) => (((long)layer * KvHeads + kvHead) * Capacity + position) * HeadDim;

    public float* Keys(int layer, int kvHead) => _keys.Data + Offset(layer, kvHead, 0);
    public float* Values(int layer, int kvHead) => _values.Data + Offset(layer, kvHead, 0);

    /// <summary>Writes tokens' k and v rows ([tokens, kv_heads * head_dim]) at positions start.. .</summary>
    public void Write(int layer, int start, int tokens, ReadOnlySpan<float> k, ReadOnlySpan<float> v)
    {
        if (start < 0 || start + tokens > Capacity)
        {
            throw new ContextLengthException($"KV cache write at positions [{start}, {start + tokens}) exceeds its capacity of {Capacity} tokens");
        }
        int rowWidth = KvHeads * HeadDim;
        if (k.Length < tokens * rowWidth || v.Length < tokens * rowWidth)
        {
            throw new ArgumentException($"k/v must hold {tokens} x {rowWidth} values");
        }
        for (int t = 0; t < tokens; t++)
        {
            for (int h = 0; h < KvHeads; h++)
            {
                var keyRow = new Span<float>(Keys(layer, h) + (long)(start + t) * HeadDim, HeadDim);
                var valueRow = new Span<float>(Values(layer, h) + (long)(start + t) * HeadDim, HeadDim);
                k.Slice(t * rowWidth + h * HeadDim, HeadDim).CopyTo(keyRow);
                v.Slice(t * rowWidth + h * HeadDim, HeadDim).CopyTo(valueRow);
            }
        }
    }

    public void Dispose()
    {
        _keys.Dispose();
        _values.Dispose();
    }
}
