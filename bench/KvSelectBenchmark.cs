using BenchmarkDotNet.Attributes;
using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Runtime.KvSelect;

namespace KernelLM.Bench;

/// <summary>What one op of <see cref="KvSelectBenchmark"/> does.</summary>
public enum KvSelectMode
{
    /// <summary>Attention over every cached position.</summary>
    Full,

    /// <summary>A new selection (scores, softmax, vote, top-k) then attention over the list: a cache miss.</summary>
    SelectMiss,

    /// <summary>The layer's cached selection reused (the cosine test only) then attention over the list: a cache hit.</summary>
    SelectHit,
}

/// <summary>
/// TokenSelect on the CPU device: one op = one layer's decode attention step with the Llama-3.1-8B attention shape
/// (32 query heads, 8 KV heads, head_dim 128; the CPU cache is fp32) at <see cref="Context"/> cached positions, with
/// full attention, with selection on a cache miss and on a cache hit (default options: k = 2048, init 128, local 512).
/// The selection's own GB/s: a miss reads every key once (context x 8 x 128 x 4 bytes) and the listed keys and values.
/// </summary>
public class KvSelectBenchmark : IDisposable
{
    private const int Heads = 32, KvHeads = 8, HeadDim = 128;

    private CpuDevice? _device;
    private KvCache? _cache;
    private KvSelector? _selector;
    private float[] _q = [];
    private float[] _output = [];

    [Params(8192, 32768)]
    public int Context { get; set; }

    [Params(KvSelectMode.Full, KvSelectMode.SelectMiss, KvSelectMode.SelectHit)]
    public KvSelectMode Mode { get; set; }

    [Params(2)]
    public int Threads { get; set; }

    [GlobalSetup]
    public unsafe void Setup()
    {
        _device = new CpuDevice(Threads, scratchFloats: Context + 16);
        _cache = new KvCache(1, KvHeads, HeadDim, Context) { Length = Context };
        var random = new Random(Context);
        for (int h = 0; h < KvHeads; h++)
        {
            var keys = new Span<float>(_cache.Keys(0, h), Context * HeadDim);
            var values = new Span<float>(_cache.Values(0, h), Context * HeadDim);
            for (int i = 0; i < keys.Length; i++)
            {
                keys[i] = (float)(random.NextDouble() * 2 - 1);
                values[i] = (float)(random.NextDouble() * 2 - 1);
            }
        }
        _q = Enumerable.Range(0, Heads * HeadDim).Select(_ => (float)(random.NextDouble() * 2 - 1)).ToArray();
        _output = new float[Heads * HeadDim];
        var options = new KvSelectOptions { CacheThreshold = Mode == KvSelectMode.SelectHit ? -1f : 1f };
        _selector = new KvSelector(options, 1, Heads, KvHeads, HeadDim, Context, _device.Pool);
        // The hit mode needs a selection to reuse.
        _selector.Select(0, _q, 1, _cache, Context, useCache: true, out _);
    }

    [Benchmark(Description = "decode attention, one layer")]
    public void Step()
    {
        if (Mode == KvSelectMode.Full)
        {
            _device!.Attention(_q, _cache!, 0, Heads, Context - 1, 1, 0, _output);
            return;
        }
        _selector!.Select(0, _q, 1, _cache!, Context, useCache: true, out var positions);
        _device!.Attention(_q, _cache!, 0, Heads, Context - 1, 1, 0, _output, new AttentionHook { SelectedPositions = positions });
    }

    [GlobalCleanup]
    public void Dispose()
    {
        _cache?.Dispose();
        _device?.Dispose();
        _cache = null;
        _device = null;
        GC.SuppressFinalize(this);
    }
}
