using System.Text.Json;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.DeviceCheck;

/// <summary>
/// The device report of tools/device-check.sh: per-kernel GB/s against the device's measured
/// device-to-device copy, as report.json (and report.txt); for vocab_stats also its share of a batch-1 decode step
/// of the Llama-3.2-1B / Llama-3.1-8B shapes, each step taken at the measured copy bandwidth. In CI it is produced on the emulated device at a tiny size, which
/// checks the report path end to end; on the GPU machine the script sets KERNELLM_REPORT_DIR and the real
/// device is measured at full size.
/// </summary>
[TestFixture]
public sealed class DeviceReportTests
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    /// <summary>Bytes a bf16 decode step must read at batch 1: Llama-3.2-1B, 1,235,814,400 parameters, all of them (the
    /// LM head is the tied embedding); Llama-3.1-8B, 8,030,261,248 parameters less the 525,336,576 of the untied
    /// embedding, of which a step reads one row.</summary>
    private const long Llama1BDecodeBytes = 1_235_814_400L * 2;
    private const long Llama8BDecodeBytes = (8_030_261_248L - 525_336_576L) * 2;

    /// <summary>A model shape the report runs end to end (random bf16 weights generated on the device).</summary>
    public sealed record ModelShape(string Name, ModelConfig Config, int PromptTokens, int DecodeSteps, double TargetTokensPerSecond);

    /// <summary>Llama-3.2-1B and Llama-3.1-8B shapes, with the H200 targets of the CUDA engine issue.</summary>
    public static IReadOnlyList<ModelShape> GpuShapes { get; } =
    [
        new("llama-3.2-1b", ReferenceShapes.Llama32_1B, PromptTokens: 512, DecodeSteps: 64, TargetTokensPerSecond: 1400),
        new("llama-3.1-8b", ReferenceShapes.Llama31_8B, PromptTokens: 512, DecodeSteps: 32, TargetTokensPerSecond: 245),
    ];

    /// <summary>A tiny shape that exercises the same path on the emulated device.</summary>
    public static IReadOnlyList<ModelShape> EmulatedShapes { get; } =
        [new("tiny", ReferenceShapes.Tiny, PromptTokens: 16, DecodeSteps: 4, TargetTokensPerSecond: 0)];

    /// <summary>Prefill of the prompt (chunks of the whole prompt) and batch-1 greedy decode with sampling on the
    /// device; tokens/s, achieved weight GB/s and its fraction of the measured copy bandwidth.</summary>
    private static object Throughput(CudaDevice device, ModelShape shape, double copy, double gemmTflops)
    {
        using var model = CudaLlamaModel.Random(shape.Config, device, DType.BF16, contextLength: shape.PromptTokens + shape.DecodeSteps + 8, prefillChunk: shape.PromptTokens);
        var (prefillSeconds, stepSeconds) = Time(model, shape, cudaGraphs: true);
        var (_, eagerStepSeconds) = Time(model, shape, cudaGraphs: false);
        long bytes = model.BytesPerDecodedToken;
        double gbps = bytes / stepSeconds / 1e9;
        // Prefill FLOPs: 2 per matrix parameter per token (attention's own FLOPs are small at 512 tokens and left out).
        double prefillTflops = 2.0 * (bytes / 2) * shape.PromptTokens / prefillSeconds / 1e12;
        return new
        {
            model = shape.Name,
            weight_bytes = model.WeightBytes,
            bytes_per_decoded_token = bytes,
            prefill_tokens = shape.PromptTokens,
            prefill_gemm = CudaOps.PrefillGemmEngine(device),
            prefill_tokens_per_second = shape.PromptTokens / prefillSeconds,
            prefill_matrix_tflops = prefillTflops,
            prefill_fraction_of_gemm_peak = prefillTflops / gemmTflops,
            decode_tokens_per_second = 1 / stepSeconds,
            decode_tokens_per_second_without_graphs = 1 / eagerStepSeconds,
            decode_weight_gbps = gbps,
            decode_fraction_of_copy = gbps / copy,
            bandwidth_limit_tokens_per_second = copy * 1e9 / bytes,
            target_tokens_per_second = shape.TargetTokensPerSecond,
        };
    }

    /// <summary>Best of two runs (the first warms up): the prompt's prefill, and the mean greedy decode step.</summary>
    private static (double PrefillSeconds, double StepSeconds) Time(CudaLlamaModel model, ModelShape shape, bool cudaGraphs)
    {
        using var session = model.CreateSession(cudaGraphs: cudaGraphs);
        int[] prompt = Enumerable.Range(0, shape.PromptTokens).Select(i => i * 7919 % shape.Config.VocabularySize).ToArray();
        var greedy = KernelLM.Runtime.Sampling.SamplingOptions.Greedy;
        var stats = new float[KernelLM.Runtime.Signals.VocabStats.FieldCount];
        int[] next = [0];
        double prefillSeconds = double.MaxValue, stepSeconds = double.MaxValue;
        for (int repeat = 0; repeat < 2; repeat++)
        {
            // The first repeat warms up (module load, caches); the best of the two is reported.
            session.Reset();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            next[0] = session.ForwardSample(prompt, greedy, 1, 0, stats, [], []);
            prefillSeconds = Math.Min(prefillSeconds, clock.Elapsed.TotalSeconds);
            clock.Restart();
            for (int step = 0; step < shape.DecodeSteps; step++)
            {
                next[0] = session.ForwardSample(next, greedy, 1, 0, stats, [], []);
            }
            stepSeconds = Math.Min(stepSeconds, clock.Elapsed.TotalSeconds / shape.DecodeSteps);
        }
        return (prefillSeconds, stepSeconds);
    }

    /// <summary>The prefill product's peak here: CudaOps.Linear (cuBLAS on a GPU) on a square bf16 problem of side
    /// <paramref name="side"/>; TFLOP/s, best of 3 x 5 launches.</summary>
    private static double GemmTflops(CudaDevice device, int side)
    {
        using var weight = device.Allocate("w", DType.BF16, side, side);
        using var x = device.Allocate("x", DType.BF16, side, side);
        using var y = device.Allocate("y", DType.BF16, side, side);
        CudaOps.FillUniform(device, weight, 1, 0.02f);
        CudaOps.FillUniform(device, x, 2, 1);
        CudaOps.Linear(device, weight, x, y);
        double best = double.MaxValue;
        for (int repeat = 0; repeat < 3; repeat++)
        {
            device.Synchronize();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            for (int i = 0; i < 5; i++)
            {
                CudaOps.Linear(device, weight, x, y);
            }
            device.Synchronize();
            best = Math.Min(best, clock.Elapsed.TotalSeconds / 5);
        }
        return 2.0 * side * side * side / best / 1e12;
    }

    /// <summary>Host to device: through the pinned staging buffers (what model upload uses) and straight from pageable
    /// memory; GB/s of <paramref name="bytes"/>.</summary>
    private static object Upload(CudaDevice device, int bytes)
    {
        var host = new byte[bytes];
        new Random(1).NextBytes(host);
        using var target = device.Allocate("upload", DType.I32, bytes / 4);
        double staged = double.MaxValue, pageable = double.MaxValue;
        for (int repeat = 0; repeat < 2; repeat++)
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            using (var upload = new StagedUpload(device))
            {
                upload.Copy(target.Address, host);
                upload.Finish();
            }
            staged = Math.Min(staged, clock.Elapsed.TotalSeconds);
            clock.Restart();
            device.Backend.CopyHostToDevice(target.Address, host, 0);
            device.Synchronize();
            pageable = Math.Min(pageable, clock.Elapsed.TotalSeconds);
        }
        return new { bytes, staged_pinned_gbps = bytes / staged / 1e9, pageable_gbps = bytes / pageable / 1e9 };
    }

    /// <summary>Flash-decoding over a long cache: the Llama-3.1-8B attention shape (32 query heads, 8 KV heads,
    /// head_dim 128, bf16) at <paramref name="keys"/> positions; GB/s of the K and V bytes read.</summary>
    private static object DecodeAttention(CudaDevice device, int keys, double copy)
    {
        const int heads = 32, kvHeads = 8, headDim = 128;
        using var keyCache = device.Allocate("k_cache", DType.BF16, 1, kvHeads, keys, headDim);
        using var valueCache = device.Allocate("v_cache", DType.BF16, 1, kvHeads, keys, headDim);
        using var q = device.Allocate("q", DType.BF16, 1, heads, headDim);
        using var output = device.Allocate("attn", DType.BF16, 1, heads, headDim);
        using var lengths = device.Allocate("lengths", DType.I32, 1);
        lengths.Upload<int>([keys]);
        CudaOps.FillUniform(device, keyCache, 1, 1);
        CudaOps.FillUniform(device, valueCache, 2, 1);
        CudaOps.FillUniform(device, q, 3, 1);
        int splits = CudaOps.AttentionDecodeSplits(device, 1, heads, kvHeads, headDim, keys);
        using var workspace = device.Allocate("workspace", DType.F32, checked((int)Math.Max(1, CudaOps.AttentionDecodeWorkspaceElements(1, heads, headDim, splits))));
        const int launches = 10;
        double best = double.MaxValue;
        for (int repeat = 0; repeat < 3; repeat++)
        {
            device.Synchronize();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            for (int i = 0; i < launches; i++)
            {
                CudaOps.AttentionDecode(device, q, keyCache, valueCache, lengths, keys, 0, workspace, output);
            }
            device.Synchronize();
            best = Math.Min(best, clock.Elapsed.TotalSeconds / launches);
        }
        long bytes = keyCache.ByteLength + valueCache.ByteLength;
        return new { kernel = "attention_decode_bf16", keys, heads, kv_heads = kvHeads, head_dim = headDim, splits, microseconds = best * 1e6, gbps = bytes / best / 1e9, fraction_of_copy = bytes / best / 1e9 / copy };
    }

    public static void Write(string directory, CudaDevice device, int elements, long copyBytes, IReadOnlyList<ModelShape>? shapes = null, int attentionKeys = 32768)
    {
        double copy = KernelBandwidth.CopyGigabytesPerSecond(device, copyBytes);
        var kernels = KernelBandwidth.Measure(device, elements);
        int gemmSide = device.Backend.IsEmulated ? 64 : 8192;
        double gemmTflops = GemmTflops(device, gemmSide);
        var upload = Upload(device, device.Backend.IsEmulated ? 1 << 20 : 1 << 30);
        var models = (shapes ?? []).Select(shape => Throughput(device, shape, copy, gemmTflops)).ToArray();
        var attention = DecodeAttention(device, attentionKeys, copy);
        // vocab_stats against a whole decode step, each step taken at the copy's bandwidth (its roofline): the L2 rows
        // are the decode case (the LM head has just written the logits).
        double step1B = Llama1BDecodeBytes / (copy * 1e3);
        double step8B = Llama8BDecodeBytes / (copy * 1e3);
        var vocabShares = kernels.Where(k => k.Kernel.StartsWith("vocab_stats_", StringComparison.Ordinal) && k.Kernel.EndsWith(" L2", StringComparison.Ordinal))
            .Select(k => new
            {
                kernel = k.Kernel,
                shape = k.Shape,
                microseconds = k.SecondsPerLaunch * 1e6,
                decode_step_1b_microseconds = step1B,
                share_of_1b_step = k.SecondsPerLaunch * 1e6 / step1B,
                decode_step_8b_microseconds = step8B,
                share_of_8b_step = k.SecondsPerLaunch * 1e6 / step8B,
            }).ToArray();
        var report = new
        {
            device = device.Name,
            emulated = device.Backend.IsEmulated,
            compute_capability = device.Backend.ComputeCapability,
            total_memory_bytes = device.Backend.TotalMemoryBytes,
            driver = CudaDriverStatus.Current.Problem ?? $"CUDA driver {CudaDriverStatus.Current.DriverVersion}",
            measured_copy_gbps = copy,
            prefill_gemm = new { engine = CudaOps.PrefillGemmEngine(device), side = gemmSide, tflops = gemmTflops },
            upload,
            kernels = kernels.Select(k => new
            {
                kernel = k.Kernel,
                shape = k.Shape,
                bytes_per_launch = k.BytesPerLaunch,
                microseconds = k.SecondsPerLaunch * 1e6,
                gbps = k.GigabytesPerSecond,
                fraction_of_copy = k.GigabytesPerSecond / copy,
            }),
            vocab_stats_share_of_decode_step = vocabShares,
            models,
            attention_decode = attention,
        };
        Directory.CreateDirectory(directory);
        File.WriteAllText(Path.Combine(directory, "report.json"), JsonSerializer.Serialize(report, Indented));
        // The same figures as text: tools/device-check.sh appends report.txt to its summary.
        var lines = new List<string>();
        foreach (var kernel in kernels)
        {
            lines.Add($"{kernel.Kernel,-22} {kernel.Shape,-14} {kernel.GigabytesPerSecond,10:F2} GB/s ({kernel.GigabytesPerSecond / copy:P0} of copy {copy:F1} GB/s)");
        }
        foreach (var share in vocabShares)
        {
            lines.Add($"{share.kernel,-22} {share.shape,-14} {share.microseconds,8:F1} us = {share.share_of_1b_step:P2} of a 1B bf16 decode step "
                + $"({step1B:F0} us at copy speed), {share.share_of_8b_step:P2} of an 8B one ({step8B:F0} us)");
        }
        lines.Add($"prefill GEMM ({CudaOps.PrefillGemmEngine(device)}), bf16 {gemmSide}^3: {gemmTflops:F1} TFLOP/s");
        lines.Add("upload " + JsonSerializer.Serialize(upload));
        foreach (var model in models)
        {
            lines.Add(JsonSerializer.Serialize(model));
        }
        lines.Add(JsonSerializer.Serialize(attention));
        File.WriteAllLines(Path.Combine(directory, "report.txt"), lines);
        foreach (string line in lines)
        {
            TestContext.Out.WriteLine(line);
        }
    }

    [Test]
    public void Report_on_the_emulated_device_is_complete_json()
    {
        string directory = TestPaths.NewTemporaryDirectory("report");
        try
        {
            using (var device = new CudaDevice(new EmulatorBackend()))
            {
                Write(directory, device, elements: 8192, copyBytes: 1 << 16, EmulatedShapes, attentionKeys: 256);
            }
            using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(directory, "report.json")));
            var root = json.RootElement;
            Assert.That(root.GetProperty("emulated").GetBoolean(), Is.True);
            Assert.That(File.ReadAllText(Path.Combine(directory, "report.txt")), Does.Contain("of a 1B bf16 decode step"));
            Assert.That(root.GetProperty("measured_copy_gbps").GetDouble(), Is.GreaterThan(0));
            var names = root.GetProperty("kernels").EnumerateArray().Select(k => k.GetProperty("kernel").GetString()).ToArray();
            Assert.That(names, Does.Contain("rms_norm_bf16").And.Contain("add_f32").And.Contain("argmax_bf16"));
            var vocab = root.GetProperty("kernels").EnumerateArray().Where(k => k.GetProperty("kernel").GetString()!.StartsWith("vocab_stats_", StringComparison.Ordinal))
                .Select(k => $"{k.GetProperty("kernel").GetString()} {k.GetProperty("shape").GetString()}").ToArray();
            Assert.That(vocab, Is.EquivalentTo(new[] { "f32 L2", "f32 HBM", "bf16 L2", "bf16 HBM" }
                .SelectMany(kind => new[] { $"vocab_stats_{kind} [1, 1024]", $"vocab_stats_{kind} [8, 1024]" })), "batch 1 and 8, both dtypes, both kinds");
            Assert.That(root.GetProperty("vocab_stats_share_of_decode_step").GetArrayLength(), Is.EqualTo(4));
            Assert.That(root.GetProperty("vocab_stats_share_of_decode_step").EnumerateArray().All(k => k.GetProperty("share_of_8b_step").GetDouble() > 0), Is.True);
            Assert.That(root.GetProperty("kernels").EnumerateArray().All(k => k.GetProperty("gbps").GetDouble() > 0), Is.True);
            var model = root.GetProperty("models").EnumerateArray().Single();
            Assert.That(model.GetProperty("model").GetString(), Is.EqualTo("tiny"));
            Assert.That(model.GetProperty("decode_tokens_per_second").GetDouble(), Is.GreaterThan(0));
            Assert.That(model.GetProperty("prefill_tokens_per_second").GetDouble(), Is.GreaterThan(0));
            Assert.That(model.GetProperty("decode_fraction_of_copy").GetDouble(), Is.GreaterThan(0));
            Assert.That(model.GetProperty("decode_tokens_per_second_without_graphs").GetDouble(), Is.GreaterThan(0));
            Assert.That(model.GetProperty("prefill_matrix_tflops").GetDouble(), Is.GreaterThan(0));
            Assert.That(model.GetProperty("prefill_gemm").GetString(), Does.Contain("built-in GEMM"));
            Assert.That(root.GetProperty("prefill_gemm").GetProperty("tflops").GetDouble(), Is.GreaterThan(0));
            Assert.That(root.GetProperty("upload").GetProperty("staged_pinned_gbps").GetDouble(), Is.GreaterThan(0));
            Assert.That(root.GetProperty("attention_decode").GetProperty("gbps").GetDouble(), Is.GreaterThan(0));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Test]
    public void Report_on_the_gpu()
    {
        string? directory = Environment.GetEnvironmentVariable("KERNELLM_REPORT_DIR");
        if (string.IsNullOrEmpty(directory))
        {
            Assert.Ignore("runs only in tools/device-check.sh (KERNELLM_REPORT_DIR names the output folder)");
        }
        CudaTestSupport.RequireDevice();
        using var device = new CudaDevice(new DriverBackend());
        // 64M elements: 256 MB per f32 tensor, far beyond the L2, so the figures are HBM figures.
        Write(directory, device, elements: 64 << 20, copyBytes: 1L << 30, GpuShapes, attentionKeys: 32768);
    }
}
