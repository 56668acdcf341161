using BenchmarkDotNet.Attributes;
using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;

namespace KernelLM.Bench;

/// <summary>Llama-3.2-1B MLP weight shapes, [rows = out_features, cols = in_features].</summary>
public enum GemvShape
{
    /// <summary>gate_proj / up_proj: [8192, 2048].</summary>
    UpGate8192x2048,

    /// <summary>down_proj: [2048, 8192].</summary>
    Down2048x8192,
}

/// <summary>
/// One decode-time matrix-vector product: one op = <see cref="CpuDevice.Linear"/> with tokens = 1 on a
/// Llama-3.2-1B MLP-shaped weight (uniform random values of std ~0.02, stored in DType in a 64-byte-aligned
/// NativeBuffer), no bias. Column: GB/s = weight bytes / time (the activations, 8-32 KB, stay in L1/L2).
/// Real decode never finds a weight in cache (a 1B model streams 2.5 GB per token), but a single 32-64 MiB
/// matrix multiplied back to back partly stays in this CPU's L3 (Sum over 32 MiB runs at 1.5x the DRAM
/// rate here). So each op uses the next of <see cref="Copies"/> copies of the matrix, at least
/// <see cref="ColdBytes"/> in all: the weights come from DRAM, as in real decode.
/// </summary>
public unsafe class GemvBenchmark : IDisposable
{
    /// <summary>Bytes of weight copies cycled through, so that no op finds its matrix in the last-level cache.</summary>
    public const long ColdBytes = 256L << 20;

    private NativeBuffer<byte>? _weights;
    private NativeBuffer<float>? _x;
    private NativeBuffer<float>? _y;
    private CpuDevice? _device;
    private WeightMatrix[] _matrices = [];
    private int _next;

    [Params(GemvShape.UpGate8192x2048, GemvShape.Down2048x8192)]
    public GemvShape Shape { get; set; }

    [Params(DType.BF16, DType.F16, DType.F32)]
    public DType DType { get; set; }

    [Params(1, 2)]
    public int Threads { get; set; }

    public static (int Rows, int Cols) Dimensions(GemvShape shape) => shape switch
    {
        GemvShape.UpGate8192x2048 => (8192, 2048),
        GemvShape.Down2048x8192 => (2048, 8192),
        _ => throw new ArgumentOutOfRangeException(nameof(shape), shape, null),
    };

    public static long WeightBytes(GemvShape shape, DType dtype)
    {
        var (rows, cols) = Dimensions(shape);
        return (long)rows * cols * dtype.SizeOf();
    }

    /// <summary>Copies of the matrix cycled through: at least <see cref="ColdBytes"/> in all.</summary>
    public static int Copies(GemvShape shape, DType dtype) => (int)Math.Max(1, (ColdBytes + WeightBytes(shape, dtype) - 1) / WeightBytes(shape, dtype));

    [GlobalSetup]
    public void Setup()
    {
        var (rows, cols) = Dimensions(Shape);
        var random = new Random(20250101);
        long count = (long)rows * cols;
        long bytes = WeightBytes(Shape, DType);
        int copies = Copies(Shape, DType);
        _weights = new NativeBuffer<byte>(bytes * copies);
        byte* data = _weights.Data;
        for (long i = 0; i < count; i++)
        {
            float value = (random.NextSingle() - 0.5f) * 0.07f;
            switch (DType)
            {
                case DType.F32:
                    ((float*)data)[i] = value;
                    break;
                case DType.F16:
                    ((Half*)data)[i] = (Half)value;
                    break;
                default:
                    ((ushort*)data)[i] = BFloat16.FromSingle(value);
                    break;
            }
        }
        _matrices = new WeightMatrix[copies];
        for (int copy = 0; copy < copies; copy++)
        {
            if (copy > 0)
            {
                Buffer.MemoryCopy(data, data + copy * bytes, bytes, bytes);
            }
            _matrices[copy] = new WeightMatrix($"gemv {Shape} #{copy}", DType, rows, cols, data + copy * bytes);
        }
        _x = new NativeBuffer<float>(cols);
        foreach (ref float value in _x.Span)
        {
            value = random.NextSingle() * 2 - 1;
        }
        _y = new NativeBuffer<float>(rows);
        _device = new CpuDevice(Threads, scratchFloats: cols);
        _next = 0;
    }

    [Benchmark(Description = "Linear, 1 token")]
    public void Linear()
    {
        int next = _next;
        _next = next + 1 == _matrices.Length ? 0 : next + 1;
        _device!.Linear(_x!.Span, 1, _matrices[next], default, _y!.Span);
    }

    [GlobalCleanup]
    public void Dispose()
    {
        _device?.Dispose();
        _weights?.Dispose();
        _x?.Dispose();
        _y?.Dispose();
        _device = null;
        _weights = null;
        _x = null;
        _y = null;
        _matrices = [];
        GC.SuppressFinalize(this);
    }
}
