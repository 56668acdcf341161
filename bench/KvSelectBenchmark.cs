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

    /// <summary>A cache hit in the compacted position mode: attention rotates every listed key by its slot and the query
    /// by the last slot (the RoPE tables) before the dot products; the cost of the rotation against <see cref="SelectHit"/>.</summary>
    SelectHitCompacted,
}

/// <summary>
/// TokenSelect on the CPU device: one op = one layer's decode attention step with the Llama-3.1-8B attention shape
/// (32 query heads, 8 KV heads, head_dim 128; the CPU cache is fp32) at <see cref="Context"/> cached positions, with
/// full attention, with selection on a cache miss and on a cache hit (default options: k = 2048, init 128, local 512).
/// SelectHitCompacted is a hit with compacted positions (keys rotated inside attention).
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
    private float[] _ropeCos = [];   // [context, head_dim / 2], theta 500000 (Llama 3), for the compacted mode
    private float[] _ropeSin = [];

    [Params(8192, 32768)]
    public int Context { get; set; }

    [Params(KvSelectMode.Full, KvSelectMode.SelectMiss, KvSelectMode.SelectHit, KvSelectMode.SelectHitCompacted)]
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
        bool hits = Mode is KvSelectMode.SelectHit or KvSelectMode.SelectHitCompacted;
        var options = new KvSelectOptions { CacheThreshold = hits ? -1f : 1f };
        if (Mode == KvSelectMode.SelectHitCompacted)
        {
            const int half = HeadDim / 2;
            _ropeCos = new float[Context * half];
            _ropeSin = new float[Context * half];
            for (int p = 0; p < Context; p++)
            {
                for (int i = 0; i < half; i++)
                {
                    float angle = p * (1f / MathF.Pow(500000f, (float)(2 * i) / HeadDim));
                    _ropeCos[p * half + i] = MathF.Cos(angle);
                    _ropeSin[p * half + i] = MathF.Sin(angle);
                }
            }
        }
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
        var hook = Mode == KvSelectMode.SelectHitCompacted
            ? new AttentionHook { SelectedPositions = positions, RopeCos = _ropeCos, RopeSin = _ropeSin }
            : new AttentionHook { SelectedPositions = positions };
        _device!.Attention(_q, _cache!, 0, Heads, Context - 1, 1, 0, _output, hook);
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
