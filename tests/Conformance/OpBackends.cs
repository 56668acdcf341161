using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Tests.Conformance;

/// <summary>
/// One layer's KV cache and the attention over it, as the conformance suite hands it to every device: caches
/// [batch, kv_heads, capacity, head_dim] (keys after RoPE) with values representable in the dtype, the sliding
/// window (0 = none), and the optional hook: <see cref="Bias"/> [batch, heads, capacity] and, per sequence,
/// strictly ascending <see cref="Selected"/> positions.
/// </summary>
public sealed record AttentionProblem(int Batch, int Heads, int KvHeads, int HeadDim, int Capacity, float[] Keys, float[] Values, int Window)
{
    public float[]? Bias { get; init; }

    public int[][]? Selected { get; init; }

    /// <summary>[head_dim / 2]: compacted RoPE inside attention (the caches then hold keys before RoPE, q is unrotated).</summary>
    public float[]? RopeInverseFrequencies { get; init; }

    public int CacheElements => Batch * KvHeads * Capacity * HeadDim;
}

/// <summary>
/// One device as the conformance suite sees it: every op on host arrays in, host arrays out. Inputs are
/// given as fp32 values already representable in the op's dtype; outputs come back widened to fp32.
/// </summary>
public abstract class OpBackend : IDisposable
{
    public abstract string Name { get; }

    public abstract float[] Embedding(DType tableDType, float[] table, int rows, int cols, int[] ids);

    public abstract float[] RmsNorm(DType dtype, float[] x, float[] weight, float epsilon);

    public abstract float[] Rope(DType dtype, float[] x, int heads, int headDim, int start, float[] inverseFrequencies);

    public abstract float[] SiluMultiply(DType dtype, float[] gate, float[] up);

    public abstract float[] Add(DType dtype, float[] y, float[] x);

    public abstract float[] Convert(DType from, DType to, float[] x);

    public abstract int[] Argmax(DType dtype, float[] x, int cols);

    /// <summary>y = x W^T (+ bias) (+ residual): weight [rows, cols], x [tokens, cols], y [tokens, rows]; one dtype.</summary>
    public abstract float[] Gemv(DType dtype, float[] weight, int rows, int cols, float[] x, float[]? bias, float[]? residual);

    /// <summary>The prefill product: the same as <see cref="Gemv"/> for any number of tokens.</summary>
    public virtual float[] Gemm(DType dtype, float[] weight, int rows, int cols, float[] x, float[]? bias, float[]? residual) =>
        Gemv(dtype, weight, rows, cols, x, bias, residual);

    /// <summary>The product as model code runs it (CudaOps.Linear: the GEMV, cuBLAS on a GPU, or the built-in GEMM).</summary>
    public virtual float[] Linear(DType dtype, float[] weight, int rows, int cols, float[] x, float[]? bias, float[]? residual) =>
        Gemm(dtype, weight, rows, cols, x, bias, residual);

    /// <summary>y = silu(x G^T) * (x U^T): gate, up [rows, cols]; x [tokens, cols].</summary>
    public abstract float[] GemvSilu(DType dtype, float[] gate, float[] up, int rows, int cols, float[] x);

    /// <summary>The fused vocabulary reduction of [rows, vocabulary] logits (optional tokens and reference rows);
    /// outputs are checked for writes past their end (guard sentinels) before they are returned.</summary>
    public abstract VocabStatsOutput VocabStats(DType dtype, float[] logits, int vocabulary, int[]? tokens, float[]? reference, int topK);

    /// <summary>The most roundings one fp32 sum of <see cref="VocabStats"/> goes through on this device (the n of
    /// Tolerances.VocabSum): a CPU chunk, or a GPU thread's slice plus its block merge.</summary>
    public abstract int VocabStatsSumLength(DType dtype, int rows, int vocabulary);

    /// <summary>The sentinels the vocab_stats outputs' guard regions hold.</summary>
    protected const float GuardSentinel = -7.77e7f;
    protected const int GuardId = -777_777;

    protected static void AssertGuard<T>(ReadOnlySpan<T> values, int count, T sentinel, string output) where T : IEquatable<T>
    {
        for (int i = count; i < values.Length; i++)
        {
            if (!values[i].Equals(sentinel))
            {
                Assert.Fail($"vocab_stats wrote past the end of '{output}' ({count} elements) at element {i}: {values[i]}");
            }
        }
    }

    /// <summary>The caches after appending k, v ([batch, tokens, kv_heads, head_dim], k before RoPE) at positions
    /// starts[b].. (problem.Keys/Values are the caches before).</summary>
    public abstract (float[] Keys, float[] Values) KvAppend(DType dtype, AttentionProblem problem, float[] k, float[] v, int tokens, int[] starts,
        float[] inverseFrequencies);

    /// <summary>One query per sequence (q: [batch, heads, head_dim]) at position lengths[b] - 1. splits: 0 = the
    /// device's choice (the CUDA devices' split count; ignored by the CPU).</summary>
    public abstract float[] AttentionDecode(DType dtype, AttentionProblem problem, float[] q, int[] lengths, int splits);

    /// <summary>A chunk of queries per sequence (q: [batch, tokens, heads, head_dim]) at positions starts[b]..</summary>
    public abstract float[] AttentionPrefill(DType dtype, AttentionProblem problem, float[] q, int tokens, int[] starts);

    /// <summary>Elements of every output's guard region; a device that writes into it fails the case.</summary>
    public const int GuardElements = 67;

    public void Dispose()
    {
        Dispose(disposing: true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
    }

    /// <summary>Rounds fp32 values to what the dtype can hold (the inputs every device sees).</summary>
    public static float[] Representable(DType dtype, float[] values) => dtype switch
    {
        DType.F32 => values,
        DType.BF16 => values.Select(v => BFloat16.ToSingle(BFloat16.FromSingle(v))).ToArray(),
        DType.F16 => values.Select(v => (float)(Half)v).ToArray(),
        _ => throw new ArgumentException($"no activations in {dtype}"),
    };

    public static byte[] Encode(DType dtype, float[] values)
    {
        switch (dtype)
        {
            case DType.F32:
            {
                var bytes = new byte[values.Length * 4];
                Buffer.BlockCopy(values, 0, bytes, 0, bytes.Length);
                return bytes;
            }
            case DType.BF16:
                return values.SelectMany(v => BitConverter.GetBytes(BFloat16.FromSingle(v))).ToArray();
            case DType.F16:
                return values.SelectMany(v => BitConverter.GetBytes((Half)v)).ToArray();
            default:
                throw new ArgumentException($"cannot encode {dtype}");
        }
    }

    public static float[] Decode(DType dtype, byte[] bytes) => dtype switch
    {
        DType.F32 => Enumerable.Range(0, bytes.Length / 4).Select(i => BitConverter.ToSingle(bytes, i * 4)).ToArray(),
        DType.BF16 => Enumerable.Range(0, bytes.Length / 2).Select(i => BFloat16.ToSingle(BitConverter.ToUInt16(bytes, i * 2))).ToArray(),
        DType.F16 => Enumerable.Range(0, bytes.Length / 2).Select(i => (float)BitConverter.ToHalf(bytes, i * 2)).ToArray(),
        _ => throw new ArgumentException($"cannot decode {dtype}"),
    };
}

/// <summary>What <see cref="OpBackend.VocabStats"/> returns: stats [rows, 9], top ids and log-probs [rows, topK].</summary>
public sealed record VocabStatsOutput(float[] Stats, int[] TopIds, float[] TopLogProbs);

/// <summary>The CPU device: the engine's own CPU ops (fp32 activations).</summary>
public sealed unsafe class CpuOpBackend : OpBackend
{
    private const float Sentinel = -7.77e7f;

    private CpuDevice? _device;

    public override string Name => "cpu";

    /// <summary>The CPU device for the ops that need its jobs and scratch (attention).</summary>
    private CpuDevice Device => _device ??= new CpuDevice(CpuWorkerPool.Shared.ThreadCount, scratchFloats: 1 << 16);

    public override float[] Embedding(DType tableDType, float[] table, int rows, int cols, int[] ids)
    {
        byte[] bytes = Encode(tableDType, table);
        var output = new float[ids.Length * cols];
        fixed (byte* data = bytes)
        {
            var matrix = new WeightMatrix("table", tableDType, rows, cols, data);
            for (int t = 0; t < ids.Length; t++)
            {
                CpuDevice.Embedding(matrix, ids[t], output.AsSpan(t * cols, cols));
            }
        }
        return output;
    }

    public override float[] RmsNorm(DType dtype, float[] x, float[] weight, float epsilon)
    {
        var y = new float[x.Length];
        CpuDevice.RmsNorm(x, weight, epsilon, y, x.Length / weight.Length);
        return y;
    }

    public override float[] Rope(DType dtype, float[] x, int heads, int headDim, int start, float[] inverseFrequencies)
    {
        int half = headDim / 2;
        int tokens = x.Length / (heads * headDim);
        var cos = new float[(start + tokens) * half];
        var sin = new float[(start + tokens) * half];
        for (int p = 0; p < start + tokens; p++)
        {
            for (int i = 0; i < half; i++)
            {
                float angle = p * inverseFrequencies[i];
                cos[p * half + i] = (float)Math.Cos(angle);
                sin[p * half + i] = (float)Math.Sin(angle);
            }
        }
        var y = (float[])x.Clone();
        CpuDevice.Rope(y, tokens, heads, headDim, start, cos, sin);
        return y;
    }

    public override float[] SiluMultiply(DType dtype, float[] gate, float[] up)
    {
        var result = (float[])gate.Clone();
        CpuDevice.SiluMultiply(result, up, new float[gate.Length]);
        return result;
    }

    public override float[] Add(DType dtype, float[] y, float[] x)
    {
        var result = new float[y.Length];
        System.Numerics.Tensors.TensorPrimitives.Add(y, x, result);
        return result;
    }

    public override float[] Convert(DType from, DType to, float[] x) => Representable(to, Representable(from, x));

    public override int[] Argmax(DType dtype, float[] x, int cols) =>
        Enumerable.Range(0, x.Length / cols).Select(r => System.Numerics.Tensors.TensorPrimitives.IndexOfMax(x.AsSpan(r * cols, cols))).ToArray();

    /// <summary>RoPE on the CPU (fp32 tables as the engine builds them), then <see cref="KvCache.Write"/>.</summary>
    public override float[] Gemv(DType dtype, float[] weight, int rows, int cols, float[] x, float[]? bias, float[]? residual)
    {
        int tokens = x.Length / cols;
        var y = residual is null ? new float[tokens * rows] : (float[])residual.Clone();
        byte[] bytes = Encode(dtype, weight);
        fixed (byte* data = bytes)
        {
            Device.Linear(x, tokens, new WeightMatrix("weight", dtype, rows, cols, data), bias, y, accumulate: residual is not null);
        }
        return y;
    }

    public override float[] GemvSilu(DType dtype, float[] gate, float[] up, int rows, int cols, float[] x)
    {
        var g = Gemv(dtype, gate, rows, cols, x, null, null);
        var u = Gemv(dtype, up, rows, cols, x, null, null);
        CpuDevice.SiluMultiply(g, u, new float[g.Length]);
        return g;
    }

    /// <summary>The CPU twin, <see cref="Runtime.Signals.VocabStats"/>: fp32 rows, or bf16 rows as raw bit patterns.</summary>
    public override VocabStatsOutput VocabStats(DType dtype, float[] logits, int vocabulary, int[]? tokens, float[]? reference, int topK)
    {
        int rows = logits.Length / vocabulary;
        int statsCount = rows * Runtime.Signals.VocabStats.FieldCount;
        var stats = new float[statsCount + GuardElements];
        var ids = new int[rows * topK + GuardElements];
        var logProbs = new float[rows * topK + GuardElements];
        stats.AsSpan().Fill(GuardSentinel);
        ids.AsSpan().Fill(GuardId);
        logProbs.AsSpan().Fill(GuardSentinel);
        if (dtype == DType.BF16)
        {
            Runtime.Signals.VocabStats.Reduce(logits.Select(BFloat16.FromSingle).ToArray(), vocabulary, tokens ?? [],
                reference?.Select(BFloat16.FromSingle).ToArray() ?? [], topK, stats.AsSpan(0, statsCount), ids.AsSpan(0, rows * topK), logProbs.AsSpan(0, rows * topK));
        }
        else
        {
            Runtime.Signals.VocabStats.Reduce(logits, vocabulary, tokens ?? [], reference ?? [], topK, stats.AsSpan(0, statsCount), ids.AsSpan(0, rows * topK),
                logProbs.AsSpan(0, rows * topK));
        }
        AssertGuard<float>(stats, statsCount, GuardSentinel, "stats");
        AssertGuard<int>(ids, rows * topK, GuardId, "top_ids");
        AssertGuard<float>(logProbs, rows * topK, GuardSentinel, "top_log_probs");
        return new VocabStatsOutput(stats[..statsCount], ids[..(rows * topK)], logProbs[..(rows * topK)]);
    }

    /// <summary>A chunk of <see cref="Runtime.Signals.VocabStats.ChunkLength"/> entries is summed in fp32, chunks in fp64.</summary>
    public override int VocabStatsSumLength(DType dtype, int rows, int vocabulary) => Runtime.Signals.VocabStats.ChunkLength;

    public override (float[] Keys, float[] Values) KvAppend(DType dtype, AttentionProblem problem, float[] k, float[] v, int tokens, int[] starts,
        float[] inverseFrequencies)
    {
        var keys = new float[problem.CacheElements];
        var values = new float[problem.CacheElements];
        int rowWidth = problem.KvHeads * problem.HeadDim;
        for (int b = 0; b < problem.Batch; b++)
        {
            using var cache = Load(problem, b);
            var rotated = Rope(dtype, k.AsSpan(b * tokens * rowWidth, tokens * rowWidth).ToArray(), problem.KvHeads, problem.HeadDim, starts[b], inverseFrequencies);
            cache.Write(0, starts[b], tokens, rotated, v.AsSpan(b * tokens * rowWidth, tokens * rowWidth));
            Store(cache, problem, b, keys, values);
        }
        return (keys, values);
    }

    public override float[] AttentionDecode(DType dtype, AttentionProblem problem, float[] q, int[] lengths, int splits)
    {
        int width = problem.Heads * problem.HeadDim;
        var output = WithGuard(problem.Batch * width);
        for (int b = 0; b < problem.Batch; b++)
        {
            using var cache = Load(problem, b);
            cache.Length = lengths[b];
            Device.Attention(q.AsSpan(b * width, width), cache, 0, problem.Heads, lengths[b] - 1, 1, problem.Window,
                output.AsSpan(b * width, width), Hook(problem, b));
        }
        return WithoutGuard(output, problem.Batch * width);
    }

    public override float[] AttentionPrefill(DType dtype, AttentionProblem problem, float[] q, int tokens, int[] starts)
    {
        int width = tokens * problem.Heads * problem.HeadDim;
        var output = WithGuard(problem.Batch * width);
        for (int b = 0; b < problem.Batch; b++)
        {
            using var cache = Load(problem, b);
            cache.Length = starts[b] + tokens;
            Device.Attention(q.AsSpan(b * width, width), cache, 0, problem.Heads, starts[b], tokens, problem.Window,
                output.AsSpan(b * width, width), Hook(problem, b));
        }
        return WithoutGuard(output, problem.Batch * width);
    }

    private static AttentionHook Hook(AttentionProblem problem, int b)
    {
        int span = problem.Heads * problem.Capacity;
        var bias = problem.Bias is null ? default : problem.Bias.AsSpan(b * span, span);
        var hook = problem.Selected is null ? new AttentionHook { KeyBias = bias } : new AttentionHook { KeyBias = bias, SelectedPositions = problem.Selected[b] };
        if (problem.RopeInverseFrequencies is { } frequencies)
        {
            // The model's tables (RopeTable.Build): fp32 angle, cos/sin rounded to fp32.
            int half = frequencies.Length;
            var cos = new float[problem.Capacity * half];
            var sin = new float[cos.Length];
            for (int p = 0; p < problem.Capacity; p++)
            {
                for (int i = 0; i < half; i++)
                {
                    float angle = p * frequencies[i];
                    cos[p * half + i] = (float)Math.Cos(angle);
                    sin[p * half + i] = (float)Math.Sin(angle);
                }
            }
            hook = hook with { RopeCos = cos, RopeSin = sin };
        }
        return hook;
    }

    /// <summary>Sequence b of the problem's caches as a one-layer CPU KV cache ([kv_head, position, head_dim] is
    /// the device layout of one sequence).</summary>
    private static KvCache Load(AttentionProblem problem, int b)
    {
        var cache = new KvCache(1, problem.KvHeads, problem.HeadDim, problem.Capacity);
        int rows = problem.Capacity * problem.HeadDim;
        for (int h = 0; h < problem.KvHeads; h++)
        {
            int offset = (b * problem.KvHeads + h) * rows;
            problem.Keys.AsSpan(offset, rows).CopyTo(new Span<float>(cache.Keys(0, h), rows));
            problem.Values.AsSpan(offset, rows).CopyTo(new Span<float>(cache.Values(0, h), rows));
        }
        return cache;
    }

    private static void Store(KvCache cache, AttentionProblem problem, int b, float[] keys, float[] values)
    {
        int rows = problem.Capacity * problem.HeadDim;
        for (int h = 0; h < problem.KvHeads; h++)
        {
            int offset = (b * problem.KvHeads + h) * rows;
            new ReadOnlySpan<float>(cache.Keys(0, h), rows).CopyTo(keys.AsSpan(offset, rows));
            new ReadOnlySpan<float>(cache.Values(0, h), rows).CopyTo(values.AsSpan(offset, rows));
        }
    }

    private static float[] WithGuard(int count)
    {
        var values = new float[count + GuardElements];
        values.AsSpan(count).Fill(Sentinel);
        return values;
    }

    private float[] WithoutGuard(float[] values, int count)
    {
        for (int i = count; i < values.Length; i++)
        {
            if (BitConverter.SingleToInt32Bits(values[i]) != BitConverter.SingleToInt32Bits(Sentinel))
            {
                throw new InvalidOperationException($"{Name}: wrote past its output of {count} elements (element {i} = {values[i]})");
            }
        }
        return values[..count];
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _device?.Dispose();
        }
        base.Dispose(disposing);
    }
}

/// <summary>A CUDA device (emulated or real) through the kernel library and the op entries.</summary>
public sealed class CudaOpBackend(string name, CudaDevice device) : OpBackend
{
    public CudaDevice Device => device;

    public override string Name => name;

    private DeviceTensor Upload(string tensorName, DType dtype, float[] values, params int[] shape)
    {
        var tensor = device.Allocate(tensorName, dtype, shape);
        tensor.Upload<byte>(Encode(dtype, values));
        return tensor;
    }

    private static float[] Read(DeviceTensor tensor) => Decode(tensor.DType, tensor.Download<byte>());

    public override float[] Embedding(DType tableDType, float[] table, int rows, int cols, int[] ids)
    {
        using var tableTensor = Upload("table", tableDType, table, rows, cols);
        using var idTensor = device.Allocate("ids", DType.I32, ids.Length);
        idTensor.Upload<int>(ids);
        using var output = device.Allocate("out", DType.F32, ids.Length, cols);
        CudaOps.Embedding(device, tableTensor, idTensor, output);
        return Read(output);
    }

    public override float[] RmsNorm(DType dtype, float[] x, float[] weight, float epsilon)
    {
        int rows = x.Length / weight.Length;
        using var input = Upload("x", dtype, x, rows, weight.Length);
        using var weightTensor = Upload("weight", DType.F32, weight, weight.Length);
        using var output = device.Allocate("y", dtype, rows, weight.Length);
        CudaOps.RmsNorm(device, input, weightTensor, epsilon, output);
        return Read(output);
    }

    public override float[] Rope(DType dtype, float[] x, int heads, int headDim, int start, float[] inverseFrequencies)
    {
        using var tensor = Upload("x", dtype, x, x.Length / (heads * headDim), heads, headDim);
        using var frequencies = Upload("inv_freq", DType.F32, inverseFrequencies, inverseFrequencies.Length);
        if (start == 0)
        {
            CudaOps.Rope(device, tensor, heads, frequencies, start);
            return Read(tensor);
        }
        // A non-zero start goes through the device-memory position (the CUDA graph path): start_at + 7.
        using var startAt = device.Allocate("start_at", DType.I32, 1);
        startAt.Upload<int>([start - 7]);
        CudaOps.Rope(device, tensor, heads, frequencies, startAt, 7);
        return Read(tensor);
    }

    public override float[] SiluMultiply(DType dtype, float[] gate, float[] up)
    {
        using var gateTensor = Upload("gate", dtype, gate, gate.Length);
        using var upTensor = Upload("up", dtype, up, up.Length);
        CudaOps.SiluMultiply(device, gateTensor, upTensor);
        return Read(gateTensor);
    }

    public override float[] Add(DType dtype, float[] y, float[] x)
    {
        using var yTensor = Upload("y", dtype, y, y.Length);
        using var xTensor = Upload("x", dtype, x, x.Length);
        CudaOps.Add(device, yTensor, xTensor);
        return Read(yTensor);
    }

    public override float[] Convert(DType from, DType to, float[] x)
    {
        using var input = Upload("x", from, x, x.Length);
        using var output = device.Allocate("y", to, x.Length);
        CudaOps.Convert(device, input, output);
        return Read(output);
    }

    public override int[] Argmax(DType dtype, float[] x, int cols)
    {
        using var input = Upload("x", dtype, x, x.Length / cols, cols);
        using var output = device.Allocate("out", DType.I32, x.Length / cols);
        CudaOps.Argmax(device, input, cols, output);
        return output.Download<int>();
    }

    public override float[] Gemv(DType dtype, float[] weight, int rows, int cols, float[] x, float[]? bias, float[]? residual) =>
        Product(CudaOps.Gemv, dtype, weight, rows, cols, x, bias, residual);

    public override float[] Gemm(DType dtype, float[] weight, int rows, int cols, float[] x, float[]? bias, float[]? residual) =>
        Product(CudaOps.Gemm, dtype, weight, rows, cols, x, bias, residual);

    public override float[] Linear(DType dtype, float[] weight, int rows, int cols, float[] x, float[]? bias, float[]? residual) =>
        Product(CudaOps.Linear, dtype, weight, rows, cols, x, bias, residual);

    /// <summary>y = x W^T (+ bias) (+ residual, accumulated into y) through one of the product ops.</summary>
    private float[] Product(Action<CudaDevice, DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor?, DeviceTensor?, nint> op, DType dtype, float[] weight,
        int rows, int cols, float[] x, float[]? bias, float[]? residual)
    {
        int tokens = x.Length / cols;
        using var weightTensor = Upload("weight", dtype, weight, rows, cols);
        using var input = Upload("x", dtype, x, tokens, cols);
        using var output = residual is null ? device.Allocate("y", dtype, tokens, rows) : Upload("y", dtype, residual, tokens, rows);
        using var biasTensor = bias is null ? null : Upload("bias", DType.F32, bias, rows);
        op(device, weightTensor, input, output, biasTensor, residual is null ? null : output, 0);
        return Read(output);
    }

    public override float[] GemvSilu(DType dtype, float[] gate, float[] up, int rows, int cols, float[] x)
    {
        int tokens = x.Length / cols;
        using var gateTensor = Upload("gate", dtype, gate, rows, cols);
        using var upTensor = Upload("up", dtype, up, rows, cols);
        using var input = Upload("x", dtype, x, tokens, cols);
        using var output = device.Allocate("y", dtype, tokens, rows);
        CudaOps.GemvSilu(device, gateTensor, upTensor, input, output);
        return Read(output);
    }

    /// <summary>Through <see cref="CudaOps.VocabStats"/>; each output is a view at the start of a buffer whose tail holds
    /// sentinels, checked after the launch (the emulator's own guards only see the ends of allocations).</summary>
    public override VocabStatsOutput VocabStats(DType dtype, float[] logits, int vocabulary, int[]? tokens, float[]? reference, int topK)
    {
        int rows = logits.Length / vocabulary;
        int fields = Runtime.Signals.VocabStats.FieldCount;
        using var logitTensor = Upload("logits", dtype, logits, rows, vocabulary);
        using var referenceTensor = reference is null ? null : Upload("reference", dtype, reference, rows, vocabulary);
        using var tokenTensor = tokens is null ? null : device.Allocate("tokens", DType.I32, rows);
        if (tokens is not null)
        {
            tokenTensor!.Upload<int>(tokens);
        }
        long workspaceBytes = CudaOps.VocabStatsWorkspaceBytes(rows, vocabulary);
        using var workspace = device.Allocate("workspace", DType.I32, checked((int)((workspaceBytes + 3) / 4)));
        using var statsBuffer = Guarded("stats_buffer", DType.F32, rows * fields, BitConverter.SingleToInt32Bits(GuardSentinel));
        using var idBuffer = Guarded("top_ids_buffer", DType.I32, rows * topK, GuardId);
        using var logProbBuffer = Guarded("top_log_probs_buffer", DType.F32, rows * topK, BitConverter.SingleToInt32Bits(GuardSentinel));
        using var stats = statsBuffer.View("stats", DType.F32, 0, rows, fields);
        using var ids = idBuffer.View("top_ids", DType.I32, 0, rows, topK);
        using var logProbs = logProbBuffer.View("top_log_probs", DType.F32, 0, rows, topK);
        CudaOps.VocabStats(device, logitTensor, vocabulary, tokenTensor, referenceTensor, topK, workspace, stats, ids, logProbs);
        var statsValues = statsBuffer.Download<float>();
        var idValues = idBuffer.Download<int>();
        var logProbValues = logProbBuffer.Download<float>();
        AssertGuard<float>(statsValues, rows * fields, GuardSentinel, "stats");
        AssertGuard<int>(idValues, rows * topK, GuardId, "top_ids");
        AssertGuard<float>(logProbValues, rows * topK, GuardSentinel, "top_log_probs");
        return new VocabStatsOutput(statsValues[..(rows * fields)], idValues[..(rows * topK)], logProbValues[..(rows * topK)]);
    }

    /// <summary>From the launch the op makes (<see cref="VocabStatsLayout.SumLength"/>).</summary>
    public override int VocabStatsSumLength(DType dtype, int rows, int vocabulary) => CudaOps.VocabStatsLaunch(rows, vocabulary).SumLength(dtype);

    /// <summary>A buffer of <paramref name="count"/> elements plus the guard region, every 32-bit word set to <paramref name="sentinel"/>.</summary>
    private DeviceTensor Guarded(string tensorName, DType dtype, int count, int sentinel)
    {
        var tensor = device.Allocate(tensorName, dtype, count + GuardElements);
        var words = new int[count + GuardElements];
        Array.Fill(words, sentinel);
        tensor.Upload<int>(words);
        return tensor;
    }

    public override (float[] Keys, float[] Values) KvAppend(DType dtype, AttentionProblem problem, float[] k, float[] v, int tokens, int[] starts,
        float[] inverseFrequencies)
    {
        int[] cacheShape = [problem.Batch, problem.KvHeads, problem.Capacity, problem.HeadDim];
        using var keyCache = new GuardedTensor(device, "k_cache", dtype, Encode(dtype, problem.Keys), cacheShape);
        using var valueCache = new GuardedTensor(device, "v_cache", dtype, Encode(dtype, problem.Values), cacheShape);
        using var kTensor = Upload("k", dtype, k, problem.Batch, tokens, problem.KvHeads, problem.HeadDim);
        using var vTensor = Upload("v", dtype, v, problem.Batch, tokens, problem.KvHeads, problem.HeadDim);
        using var startTensor = UploadInts("starts", starts, problem.Batch);
        using var frequencies = Upload("inv_freq", DType.F32, inverseFrequencies, inverseFrequencies.Length);
        CudaOps.KvAppend(device, kTensor, vTensor, startTensor, frequencies, keyCache.Tensor, valueCache.Tensor);
        return (Decode(dtype, keyCache.Read()), Decode(dtype, valueCache.Read()));
    }

    public override float[] AttentionDecode(DType dtype, AttentionProblem problem, float[] q, int[] lengths, int splits)
    {
        using var caches = UploadCaches(dtype, problem);
        using var query = Upload("q", dtype, q, problem.Batch, problem.Heads, problem.HeadDim);
        using var lengthTensor = UploadInts("lengths", lengths, problem.Batch);
        using var hook = UploadHook(problem);
        // Sized as an engine would: for the split count the launcher picks at the full capacity (or the forced one).
        int workspaceSplits = splits > 0 ? splits : CudaOps.AttentionDecodeSplits(device, problem.Batch, problem.Heads, problem.KvHeads, problem.HeadDim, problem.Capacity);
        long workspaceElements = CudaOps.AttentionDecodeWorkspaceElements(problem.Batch, problem.Heads, problem.HeadDim, workspaceSplits);
        using var workspace = workspaceElements == 0 ? null
            : new GuardedTensor(device, "workspace", DType.F32, null, checked((int)workspaceElements));
        using var output = new GuardedTensor(device, "out", dtype, null, problem.Batch, problem.Heads, problem.HeadDim);
        CudaOps.AttentionDecode(device, query, caches.Keys.Tensor, caches.Values.Tensor, lengthTensor, lengths.Max(), problem.Window,
            workspace?.Tensor, output.Tensor, hook.Hook, splits);
        workspace?.Read();
        caches.Check();
        return Decode(dtype, output.Read());
    }

    public override float[] AttentionPrefill(DType dtype, AttentionProblem problem, float[] q, int tokens, int[] starts)
    {
        using var caches = UploadCaches(dtype, problem);
        using var query = Upload("q", dtype, q, problem.Batch, tokens, problem.Heads, problem.HeadDim);
        using var startTensor = UploadInts("starts", starts, problem.Batch);
        using var hook = UploadHook(problem);
        using var output = new GuardedTensor(device, "out", dtype, null, problem.Batch, tokens, problem.Heads, problem.HeadDim);
        CudaOps.AttentionPrefill(device, query, caches.Keys.Tensor, caches.Values.Tensor, startTensor, problem.Window, output.Tensor, hook.Hook);
        caches.Check();
        return Decode(dtype, output.Read());
    }

    private DeviceTensor UploadInts(string tensorName, int[] values, params int[] shape)
    {
        var tensor = device.Allocate(tensorName, DType.I32, shape);
        tensor.Upload<int>(values);
        return tensor;
    }

    private sealed class Caches(GuardedTensor keys, GuardedTensor values) : IDisposable
    {
        public GuardedTensor Keys => keys;
        public GuardedTensor Values => values;

        /// <summary>Attention only reads the caches: their guards must be intact too.</summary>
        public void Check()
        {
            keys.Read();
            values.Read();
        }

        public void Dispose()
        {
            keys.Dispose();
            values.Dispose();
        }
    }

    private Caches UploadCaches(DType dtype, AttentionProblem problem)
    {
        int[] shape = [problem.Batch, problem.KvHeads, problem.Capacity, problem.HeadDim];
        var keys = new GuardedTensor(device, "k_cache", dtype, Encode(dtype, problem.Keys), shape);
        try
        {
            return new Caches(keys, new GuardedTensor(device, "v_cache", dtype, Encode(dtype, problem.Values), shape));
        }
        catch
        {
            keys.Dispose();
            throw;
        }
    }

    private sealed class HookTensors(DeviceTensor? bias, DeviceTensor? indices, DeviceTensor? counts, DeviceTensor? frequencies = null) : IDisposable
    {
        public DeviceAttentionHook Hook => new(bias, indices, counts, frequencies);

        public void Dispose()
        {
            frequencies?.Dispose();
            bias?.Dispose();
            indices?.Dispose();
            counts?.Dispose();
        }
    }

    private HookTensors UploadHook(AttentionProblem problem)
    {
        DeviceTensor? bias = problem.Bias is null ? null : Upload("bias", DType.F32, problem.Bias, problem.Batch, problem.Heads, problem.Capacity);
        DeviceTensor? frequencies = problem.RopeInverseFrequencies is { } values
            ? Upload("rope_inv_freq", DType.F32, values, values.Length)
            : null;
        if (problem.Selected is null)
        {
            return new HookTensors(bias, null, null, frequencies);
        }
        // Rows padded past each count with a value no kernel may read as a position.
        int width = Math.Max(1, problem.Selected.Max(list => list.Length) + 3);
        var rows = new int[problem.Batch * width];
        Array.Fill(rows, -123456);
        for (int b = 0; b < problem.Batch; b++)
        {
            problem.Selected[b].CopyTo(rows, b * width);
        }
        return new HookTensors(bias, UploadInts("indices", rows, problem.Batch, width),
            UploadInts("index_counts", problem.Selected.Select(list => list.Length).ToArray(), problem.Batch), frequencies);
    }

    /// <summary>A tensor followed by <see cref="OpBackend.GuardElements"/> elements of a byte pattern (test-backend-ops'
    /// sentinels, which also work on a GPU): <see cref="Read"/> fails when a kernel wrote into them.</summary>
    private sealed class GuardedTensor : IDisposable
    {
        private const byte Pattern = 0xa5;
        private readonly DeviceTensor _whole;

        public GuardedTensor(CudaDevice device, string name, DType dtype, byte[]? contents, params int[] shape)
        {
            long elements = shape.Aggregate(1L, (product, dimension) => product * dimension);
            _whole = device.Allocate(name + "+guard", dtype, checked((int)(elements + GuardElements)));
            var bytes = new byte[_whole.ByteLength];
            Array.Fill(bytes, Pattern);
            contents?.CopyTo(bytes, 0);
            _whole.Upload<byte>(bytes);
            Tensor = _whole.View(name, dtype, 0, shape);
        }

        public DeviceTensor Tensor { get; }

        public byte[] Read()
        {
            byte[] bytes = _whole.Download<byte>();
            for (long i = Tensor.ByteLength; i < bytes.Length; i++)
            {
                if (bytes[i] != Pattern)
                {
                    throw new InvalidOperationException($"a kernel wrote past '{Tensor.Name}' {Tensor.ShapeText}: guard byte {i - Tensor.ByteLength} is 0x{bytes[i]:x2}");
                }
            }
            return bytes[..(int)Tensor.ByteLength];
        }

        public void Dispose()
        {
            Tensor.Dispose();
            _whole.Dispose();
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            device.Dispose();
        }
        base.Dispose(disposing);
    }
}
