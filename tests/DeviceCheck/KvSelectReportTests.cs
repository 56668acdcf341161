using System.Text.Json;
using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.KvSelect;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.DeviceCheck;

/// <summary>
/// TokenSelect's part of the device report (tools/device-check.sh writes kv_select.json and kv_select.txt next to
/// report.json): per decode step of one layer with the Llama-3.1-8B attention shape (32 query heads, 8 KV heads,
/// head_dim 128, bf16) at 32K, 128K, 512K and 1M cached tokens, the attention time with full attention, with selection
/// on a cache miss (scores, softmax, vote, top-k, then attention over the list) and on a cache hit (the list reused),
/// and a hit with compacted positions (attention rotating the listed keys and the query inside the kernel);
/// the score kernel's achieved GB/s (the keys it reads) against the measured copy; and end-to-end decode tokens/s of
/// the 8B shape at 128K (random weights, cache filled on the device) with full attention, selection missing every step
/// and selection hitting every step. Real models land between the two selection figures at their hit rate. In CI
/// the same path runs on the emulated device at a tiny size.
/// </summary>
[TestFixture]
public sealed class KvSelectReportTests
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    private static double Time(CudaDevice device, Action step, int launches)
    {
        step();
        double best = double.MaxValue;
        for (int repeat = 0; repeat < 3; repeat++)
        {
            device.Synchronize();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            for (int i = 0; i < launches; i++)
            {
                step();
            }
            device.Synchronize();
            best = Math.Min(best, clock.Elapsed.TotalSeconds / launches);
        }
        return best;
    }

    /// <summary>One layer's decode attention at <paramref name="context"/> positions: full, selection missing, selection hitting.</summary>
    private static object LayerStep(CudaDevice device, int context, KvSelectOptions options, double copy, int launches)
    {
        const int heads = 32, kvHeads = 8, headDim = 128;
        var owned = new List<DeviceTensor>();
        try
        {
            DeviceTensor Add(DeviceTensor tensor)
            {
                owned.Add(tensor);
                return tensor;
            }
            var keys = Add(device.Allocate("k_cache", DType.BF16, 1, kvHeads, context, headDim));
            var values = Add(device.Allocate("v_cache", DType.BF16, 1, kvHeads, context, headDim));
            var q = Add(device.Allocate("q", DType.BF16, 1, heads, headDim));
            var output = Add(device.Allocate("attn", DType.BF16, 1, heads, headDim));
            var lengths = Add(device.Allocate("lengths", DType.I32, 1));
            lengths.Upload<int>([context]);
            CudaOps.FillUniform(device, keys, 1, 1);
            CudaOps.FillUniform(device, values, 2, 1);
            CudaOps.FillUniform(device, q, 3, 1);
            int splits = CudaOps.AttentionDecodeSplits(device, 1, heads, kvHeads, headDim, context);
            var workspace = Add(device.Allocate("workspace", DType.F32, checked((int)Math.Max(1, CudaOps.AttentionDecodeWorkspaceElements(1, heads, headDim, splits)))));
            var scratch = KvSelectScratch.Allocate(device, 1, heads, context, owned);
            var missing = options with { CacheThreshold = 1f };
            var hitting = options with { CacheThreshold = -1f };
            var missLayer = CudaOps.KvSelectAllocateLayer(device, "miss", 1, heads * headDim, missing, owned);
            var hitLayer = CudaOps.KvSelectAllocateLayer(device, "hit", 1, heads * headDim, hitting, owned);
            var frequencies = Add(device.Allocate("rope_inv_freq", DType.F32, headDim / 2));
            frequencies.Upload<float>(Enumerable.Range(0, headDim / 2).Select(i => 1f / MathF.Pow(500000f, 2f * i / headDim)).ToArray());

            double full = Time(device, () => CudaOps.AttentionDecode(device, q, keys, values, lengths, context, 0, workspace, output), launches);
            double scores = Time(device, () => CudaOps.KvSelect(device, q, keys, lengths, context, missing, false, scratch, missLayer, scoresOnly: true), launches);
            double miss = Time(device, () =>
            {
                CudaOps.KvSelect(device, q, keys, lengths, context, missing, false, scratch, missLayer);
                CudaOps.AttentionDecode(device, q, keys, values, lengths, context, 0, workspace, output, missLayer.Hook);
            }, launches);
            double hit = Time(device, () =>
            {
                CudaOps.KvSelect(device, q, keys, lengths, context, hitting, true, scratch, hitLayer);
                CudaOps.AttentionDecode(device, q, keys, values, lengths, context, 0, workspace, output, hitLayer.Hook);
            }, launches);
            double hitCompacted = Time(device, () =>
            {
                CudaOps.KvSelect(device, q, keys, lengths, context, hitting, true, scratch, hitLayer);
                CudaOps.AttentionDecode(device, q, keys, values, lengths, context, 0, workspace, output,
                    hitLayer.Hook with { RopeInverseFrequencies = frequencies });
            }, launches);
            int[] state = hitLayer.State.Download<int>();
            long keyBytes = keys.ByteLength;
            return new
            {
                context,
                options = options.ToString(),
                full_attention_microseconds = full * 1e6,
                full_attention_gbps = 2 * keyBytes / full / 1e9,
                selection_miss_microseconds = miss * 1e6,
                selection_hit_microseconds = hit * 1e6,
                speedup_miss = full / miss,
                speedup_hit = full / hit,
                selection_hit_compacted_microseconds = hitCompacted * 1e6,
                compacted_over_standard_hit = hitCompacted / hit,
                score_kernel_microseconds = scores * 1e6,
                score_kernel_gbps = keyBytes / scores / 1e9,
                score_kernel_fraction_of_copy = keyBytes / scores / 1e9 / copy,
                hit_run_selections = state[CudaOps.KvSelectSelectionsField],
                hit_run_hits = state[CudaOps.KvSelectHitsField],
            };
        }
        finally
        {
            foreach (var tensor in owned)
            {
                tensor.Dispose();
            }
        }
    }

    /// <summary>Greedy decode tokens/s of <paramref name="config"/> with its cache filled to <paramref name="context"/>.</summary>
    private static object EndToEnd(CudaDevice device, ModelConfig config, int context, KvSelectOptions options, int steps)
    {
        using var model = CudaLlamaModel.Random(config, device, DType.BF16, contextLength: context + steps + 8, prefillChunk: 16);
        var greedy = KernelLM.Runtime.Sampling.SamplingOptions.Greedy;
        var stats = new float[KernelLM.Runtime.Signals.VocabStats.FieldCount];
        double Run(KvSelectOptions? select)
        {
            using var session = model.CreateSession(kvSelect: select);
            session.FillCacheForBenchmark(context, 7);
            int[] next = [session.ForwardSample([1], greedy, 1, 0, stats, [], [])];
            device.Synchronize();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            for (int step = 0; step < steps; step++)
            {
                next[0] = session.ForwardSample(next, greedy, 1, 0, stats, [], []);
            }
            return steps / clock.Elapsed.TotalSeconds;
        }
        double full = Run(null);
        double miss = Run(options with { CacheThreshold = 1f });
        double hit = Run(options with { CacheThreshold = -1f });
        return new
        {
            layers = config.Layers,
            context,
            options = options.ToString(),
            full_attention_tokens_per_second = full,
            selection_miss_tokens_per_second = miss,
            selection_hit_tokens_per_second = hit,
        };
    }

    public static void Write(string directory, CudaDevice device, int[] contexts, KvSelectOptions options, ModelConfig endToEndConfig, int endToEndContext,
        long copyBytes, int launches, int steps)
    {
        double copy = KernelBandwidth.CopyGigabytesPerSecond(device, copyBytes);
        var layers = contexts.Select(context => LayerStep(device, context, options, copy, launches)).ToArray();
        var endToEnd = EndToEnd(device, endToEndConfig, endToEndContext, options, steps);
        var report = new { device = device.Name, emulated = device.Backend.IsEmulated, measured_copy_gbps = copy, attention_per_layer = layers, decode = endToEnd };
        Directory.CreateDirectory(directory);
        File.WriteAllText(Path.Combine(directory, "kv_select.json"), JsonSerializer.Serialize(report, Indented));
        var lines = layers.Select(layer => "kv_select " + JsonSerializer.Serialize(layer)).Append("kv_select decode " + JsonSerializer.Serialize(endToEnd)).ToList();
        File.WriteAllLines(Path.Combine(directory, "kv_select.txt"), lines);
        foreach (string line in lines)
        {
            TestContext.Out.WriteLine(line);
        }
    }

    /// <summary>A Llama shape (ReferenceShapes) whose positions reach 1M.</summary>
    private static ModelConfig Shape(int vocabulary, int hidden, int intermediate, int layers, int heads, int kvHeads, int headDim) =>
        ReferenceShapes.Llama(vocabulary, hidden, intermediate, layers, heads, kvHeads, headDim, tied: false) with { MaxPositionEmbeddings = 1 << 20 };

    [Test]
    public void Kv_select_report_on_the_emulated_device_is_complete_json()
    {
        string directory = TestPaths.NewTemporaryDirectory("kv-select-report");
        try
        {
            using (var device = new CudaDevice(new EmulatorBackend()))
            {
                Write(directory, device, [400], new KvSelectOptions { TopK = 32, Initial = 4, Local = 16 }, Shape(256, 64, 128, 1, 4, 2, 16), 200,
                    copyBytes: 1 << 16, launches: 1, steps: 2);
            }
            using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(directory, "kv_select.json")));
            var layer = json.RootElement.GetProperty("attention_per_layer").EnumerateArray().Single();
            Assert.That(layer.GetProperty("full_attention_microseconds").GetDouble(), Is.GreaterThan(0));
            Assert.That(layer.GetProperty("score_kernel_gbps").GetDouble(), Is.GreaterThan(0));
            Assert.That(layer.GetProperty("hit_run_hits").GetInt32(), Is.GreaterThan(0), "the hitting configuration hits");
            Assert.That(layer.GetProperty("selection_hit_compacted_microseconds").GetDouble(), Is.GreaterThan(0));
            var decode = json.RootElement.GetProperty("decode");
            Assert.That(decode.GetProperty("selection_hit_tokens_per_second").GetDouble(), Is.GreaterThan(0));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Test]
    public void Kv_select_report_on_the_gpu()
    {
        string? directory = Environment.GetEnvironmentVariable("KERNELLM_REPORT_DIR");
        if (string.IsNullOrEmpty(directory))
        {
            Assert.Ignore("runs only in tools/device-check.sh (KERNELLM_REPORT_DIR names the output folder)");
        }
        CudaTestSupport.RequireDevice();
        using var device = new CudaDevice(new DriverBackend());
        // Llama-3.1-8B: 32 layers, 128256 vocabulary, hidden 4096, MLP 14336; the cache at 128K is 16 GB in bf16.
        Write(directory, device, [32768, 131072, 524288, 1048576], new KvSelectOptions(), Shape(128256, 4096, 14336, 32, 32, 8, 128), 131072,
            copyBytes: 1L << 30, launches: 10, steps: 16);
    }
}
