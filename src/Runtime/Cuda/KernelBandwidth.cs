using System.Diagnostics;
using KernelLM.Runtime.Cuda.Ops;

namespace KernelLM.Runtime.Cuda;

/// <summary>One kernel's measured throughput: bytes it must move per launch over the time per launch.</summary>
public sealed record KernelThroughput(string Kernel, string Shape, long BytesPerLaunch, double SecondsPerLaunch)
{
    public double GigabytesPerSecond => BytesPerLaunch / SecondsPerLaunch / 1e9;
}

/// <summary>
/// Bandwidth of the memory-bound kernels against the device's measured device-to-device copy (the roofline of
/// an element-wise kernel: a copy reads and writes every byte once). Each figure is the best of
/// <c>repeats</c> timed batches of <c>launches</c> launches, synchronised at the batch ends, so launch overhead
/// is amortised. Bytes are what the kernel must read plus write (e.g. add: 2 reads + 1 write per element).
/// </summary>
public static class KernelBandwidth
{
    public static double CopyGigabytesPerSecond(CudaDevice device, long bytes, int launches = 20, int repeats = 3)
    {
        using var source = device.Allocate("copy_source", DType.F32, checked((int)(bytes / 4)));
        using var destination = device.Allocate("copy_destination", DType.F32, checked((int)(bytes / 4)));
        double seconds = Best(device, launches, repeats, () => device.Backend.CopyDeviceToDevice(destination.Address, source.Address, source.ByteLength, 0));
        // A copy reads and writes every byte.
        return 2.0 * source.ByteLength / seconds / 1e9;
    }

    /// <summary>Runs every op once per dtype on tensors of about <paramref name="elements"/> elements.</summary>
    public static IReadOnlyList<KernelThroughput> Measure(CudaDevice device, int elements, int launches = 20, int repeats = 3)
    {
        var results = new List<KernelThroughput>();
        int cols = 4096;
        int rows = Math.Max(1, elements / cols);
        int n = rows * cols;
        foreach (var dtype in new[] { DType.F32, DType.BF16 })
        {
            int size = dtype.SizeOf();
            string suffix = dtype == DType.F32 ? "f32" : "bf16";
            using var x = device.Allocate("x", dtype, rows, cols);
            using var y = device.Allocate("y", dtype, rows, cols);
            using var weight = device.Allocate("weight", DType.F32, cols);
            using var wide = device.Allocate("wide", DType.F32, rows, cols);
            device.Backend.Memset(x.Address, 0, x.ByteLength, 0);
            device.Backend.Memset(y.Address, 0, y.ByteLength, 0);
            device.Backend.Memset(weight.Address, 0, weight.ByteLength, 0);
            string shape = $"[{rows}, {cols}]";
            results.Add(new($"rms_norm_{suffix}", shape, 2L * n * size + cols * 4L,
                Best(device, launches, repeats, () => CudaOps.RmsNorm(device, x, weight, 1e-5f, y))));
            results.Add(new($"add_{suffix}", shape, 3L * n * size, Best(device, launches, repeats, () => CudaOps.Add(device, y, x))));
            results.Add(new($"silu_mul_{suffix}", shape, 3L * n * size, Best(device, launches, repeats, () => CudaOps.SiluMultiply(device, y, x))));
            if (dtype != DType.F32)
            {
                results.Add(new($"convert_{suffix}_f32", shape, (long)n * (size + 4), Best(device, launches, repeats, () => CudaOps.Convert(device, x, wide))));
            }
            using var indices = device.Allocate("argmax", DType.I32, rows);
            results.Add(new($"argmax_{suffix}", shape, (long)n * size + rows * 4L, Best(device, launches, repeats, () => CudaOps.Argmax(device, x, cols, indices))));
        }
        results.AddRange(MeasureVocabStats(device, elements, launches, repeats));
        return results;
    }

    /// <summary>The vocabularies of Llama 3 and Qwen2; with a small <c>elements</c> (the emulator) one row of elements / 8.</summary>
    public static IReadOnlyList<int> VocabStatsVocabularies(int elements) => elements >= 8 * 151936 ? [128256, 151936] : [Math.Max(1, elements / 8)];

    /// <summary>
    /// vocab_stats (k = 16 and a token per row, no reference: the decode-time signals) on batches of 1 and 8 rows. Bytes
    /// are the logits read once. "L2": the same rows every launch, as in a decode step, where the LM head has just
    /// written them; "HBM": each launch reads the next rows of a pool of about <paramref name="elements"/> values
    /// (256 MB on the GPU, 5x an H200's L2), so the figure sits under the copy's roofline.
    /// </summary>
    private static List<KernelThroughput> MeasureVocabStats(CudaDevice device, int elements, int launches, int repeats)
    {
        const int topK = 16;
        var results = new List<KernelThroughput>();
        foreach (var dtype in new[] { DType.F32, DType.BF16 })
        {
            string suffix = dtype == DType.F32 ? "f32" : "bf16";
            foreach (int vocabulary in VocabStatsVocabularies(elements))
            {
                foreach (int rows in new[] { 1, 8 })
                {
                    long rowElements = (long)rows * vocabulary;
                    int copies = (int)Math.Clamp(elements / rowElements, 1, 4096);
                    using var pool = device.Allocate("vocab_logits_pool", dtype, checked((int)(rowElements * copies)));
                    byte[] rowBytes = RandomLogits(dtype, checked((int)rowElements), seed: vocabulary + rows);
                    var views = new DeviceTensor[copies];
                    for (int c = 0; c < copies; c++)
                    {
                        views[c] = pool.View($"vocab_logits_{c}", dtype, c * (long)rowBytes.Length, rows, vocabulary);
                        device.Backend.CopyHostToDevice(views[c].Address, rowBytes, 0);
                    }
                    using var tokens = device.Allocate("vocab_tokens", DType.I32, rows);
                    device.Backend.Memset(tokens.Address, 0, tokens.ByteLength, 0);
                    using var workspace = device.Allocate("vocab_workspace", DType.I32, checked((int)((CudaOps.VocabStatsWorkspaceBytes(rows, vocabulary) + 3) / 4)));
                    using var stats = device.Allocate("vocab_stats", DType.F32, rows, Signals.VocabStats.FieldCount);
                    using var ids = device.Allocate("vocab_top_ids", DType.I32, rows, topK);
                    using var logProbs = device.Allocate("vocab_top_log_probs", DType.F32, rows, topK);
                    long bytes = rowElements * dtype.SizeOf();
                    string shape = $"[{rows}, {vocabulary}]";
                    results.Add(new($"vocab_stats_{suffix} L2", shape, bytes, Best(device, launches, repeats,
                        () => CudaOps.VocabStats(device, views[0], vocabulary, tokens, null, topK, workspace, stats, ids, logProbs))));
                    int next = 0;
                    results.Add(new($"vocab_stats_{suffix} HBM", shape, bytes, Best(device, launches, repeats,
                        () => CudaOps.VocabStats(device, views[next++ % copies], vocabulary, tokens, null, topK, workspace, stats, ids, logProbs))));
                }
            }
        }
        return results;
    }

    /// <summary>Logits spread like a language model's: uniform in [-9, 3) and a few strong candidates in [6, 10).</summary>
    private static byte[] RandomLogits(DType dtype, int count, int seed)
    {
        var random = new Random(seed);
        var values = new float[count];
        for (int i = 0; i < count; i++)
        {
            values[i] = (float)(random.NextDouble() * 12 - 9);
        }
        for (int i = 0; i < Math.Max(1, count / 20000); i++)
        {
            values[random.Next(count)] = (float)(6 + random.NextDouble() * 4);
        }
        if (dtype == DType.F32)
        {
            return System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
        }
        var bits = values.Select(BFloat16.FromSingle).ToArray();
        return System.Runtime.InteropServices.MemoryMarshal.AsBytes(bits.AsSpan()).ToArray();
    }

    private static double Best(CudaDevice device, int launches, int repeats, Action launch)
    {
        launch();
        device.Synchronize();
        double best = double.MaxValue;
        for (int repeat = 0; repeat < repeats; repeat++)
        {
            var clock = Stopwatch.StartNew();
            for (int i = 0; i < launches; i++)
            {
                launch();
            }
            device.Synchronize();
            best = Math.Min(best, clock.Elapsed.TotalSeconds / launches);
        }
        return best;
    }
}
