using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Tests.Conformance;

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

    /// <summary>The fused vocabulary reduction of [rows, vocabulary] logits (optional tokens and reference rows);
    /// outputs are checked for writes past their end (guard sentinels) before they are returned.</summary>
    public abstract VocabStatsOutput VocabStats(DType dtype, float[] logits, int vocabulary, int[]? tokens, float[]? reference, int topK);

    /// <summary>The most roundings one fp32 sum of <see cref="VocabStats"/> goes through on this device (the n of
    /// Tolerances.VocabSum): a CPU chunk, or a GPU thread's slice plus its block merge.</summary>
    public abstract int VocabStatsSumLength(DType dtype, int rows, int vocabulary);

    /// <summary>Elements of the guard region after each output, and the sentinel they hold.</summary>
    protected const int GuardElements = 37;
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
    public override string Name => "cpu";

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
        CudaOps.Rope(device, tensor, heads, frequencies, start);
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

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            device.Dispose();
        }
        base.Dispose(disposing);
    }
}
