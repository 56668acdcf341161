using System.Text.Json;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Composition;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.DeviceCheck;

/// <summary>
/// The composition's cost on a device, for tools/device-check.sh (docs/composition.md): composition.json and
/// composition.txt next to report.json. For a model shape (random bf16 weights on the device): the batch-1 decode step
/// of one session (forward, sampling and signals on the device), and of a <see cref="ComposedSession"/> of two sessions
/// of that model (a sum with weights 1 and -0.5; contrastive decoding with alpha 0.1), so overhead = composed - 2 x
/// single; and the logit_sum / logit_row_max launches alone on two bf16 rows of the vocabulary. In CI it runs on the
/// emulated device at a tiny shape, which checks the path end to end; on the GPU machine the Llama-3.2-1B shape.
/// </summary>
[TestFixture]
public sealed class CompositionReportTests
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    private static double BestStep(Func<int[], int> step, int[] prompt, int steps, Action reset)
    {
        double best = double.MaxValue;
        int[] next = [0];
        for (int repeat = 0; repeat < 2; repeat++)
        {
            // The first repeat warms up; the best is reported.
            reset();
            next[0] = step(prompt);
            var clock = System.Diagnostics.Stopwatch.StartNew();
            for (int i = 0; i < steps; i++)
            {
                next[0] = step(next);
            }
            best = Math.Min(best, clock.Elapsed.TotalSeconds / steps);
        }
        return best;
    }

    public static void Write(string directory, CudaDevice device, DeviceReportTests.ModelShape shape)
    {
        var config = shape.Config;
        int vocabulary = config.VocabularySize;
        using var model = CudaLlamaModel.Random(config, device, DType.BF16, contextLength: shape.PromptTokens + 2 * shape.DecodeSteps + 8, prefillChunk: shape.PromptTokens);
        int[] prompt = Enumerable.Range(0, shape.PromptTokens).Select(i => i * 7919 % vocabulary).ToArray();
        var greedy = SamplingOptions.Greedy;
        var stats = new float[VocabStats.FieldCount];
        using var single = model.CreateSession();
        double singleStep = BestStep(feed => single.ForwardSample(feed, greedy, 1, 0, stats, [], []), prompt, shape.DecodeSteps, single.Reset);
        using var first = model.CreateSession();
        using var second = model.CreateSession();
        var steps = new List<object>();
        foreach (var (kind, alpha) in new[] { ("sum 1, -0.5", 0f), ("contrastive alpha 0.1", 0.1f) })
        {
            using var composed = new ComposedSession([new ComposedMember(first, 1), new ComposedMember(second, alpha > 0 ? -1 : -0.5f)], vocabulary, alpha);
            Assert.That(composed.OnDevice, Is.True);
            double composedStep = BestStep(feed => composed.ForwardSample(feed, greedy, 1, 0, stats, [], []), prompt, shape.DecodeSteps, composed.Reset);
            steps.Add(new
            {
                kind,
                members = 2,
                single_step_microseconds = singleStep * 1e6,
                composed_step_microseconds = composedStep * 1e6,
                overhead_microseconds = (composedStep - 2 * singleStep) * 1e6,
                overhead_fraction = (composedStep - 2 * singleStep) / (2 * singleStep),
            });
        }

        // The kernels alone: two bf16 rows (as the LM heads leave them) summed into one fp32 row.
        using var x0 = device.Allocate("x0", DType.BF16, 1, vocabulary);
        using var x1 = device.Allocate("x1", DType.BF16, 1, vocabulary);
        using var output = device.Allocate("composed", DType.F32, 1, vocabulary);
        using var cutoff = device.Allocate("cutoff", DType.F32, 1);
        CudaOps.FillUniform(device, x0, 1, 8);
        CudaOps.FillUniform(device, x1, 2, 8);
        LogitSumInput[] inputs = [new(x0, vocabulary, 1), new(x1, vocabulary, -0.5f)];
        double Time(Action launch)
        {
            const int launches = 20;
            double best = double.MaxValue;
            for (int repeat = 0; repeat < 3; repeat++)
            {
                device.Synchronize();
                var clock = System.Diagnostics.Stopwatch.StartNew();
                for (int i = 0; i < launches; i++)
                {
                    launch();
                }
                device.Synchronize();
                best = Math.Min(best, clock.Elapsed.TotalSeconds / launches);
            }
            return best;
        }
        double sum = Time(() => CudaOps.LogitSum(device, inputs, vocabulary, null, output));
        double rowMax = Time(() => CudaOps.LogitRowMax(device, x0, vocabulary, vocabulary, MathF.Log(0.1f), cutoff));
        long sumBytes = 2L * vocabulary * 2 + 4L * vocabulary;
        var report = new
        {
            device = device.Name,
            emulated = device.Backend.IsEmulated,
            model = shape.Name,
            vocabulary,
            decode_steps = steps,
            logit_sum_bf16 = new { members = 2, microseconds = sum * 1e6, bytes = sumBytes, gbps = sumBytes / sum / 1e9 },
            logit_row_max_bf16 = new { microseconds = rowMax * 1e6, bytes = 2L * vocabulary, gbps = 2.0 * vocabulary / rowMax / 1e9 },
        };
        Directory.CreateDirectory(directory);
        File.WriteAllText(Path.Combine(directory, "composition.json"), JsonSerializer.Serialize(report, Indented));
        var lines = steps.Select(s => JsonSerializer.Serialize(s)).Append(
            $"logit_sum_bf16 [2 x {vocabulary}] {sum * 1e6:F1} us ({sumBytes / sum / 1e9:F1} GB/s), logit_row_max_bf16 {rowMax * 1e6:F1} us").ToList();
        File.WriteAllLines(Path.Combine(directory, "composition.txt"), lines);
        lines.ForEach(TestContext.Out.WriteLine);
    }

    [Test]
    public void Composition_report_on_the_emulated_device_is_complete_json()
    {
        string directory = TestPaths.NewTemporaryDirectory("composition-report");
        try
        {
            using (var device = new CudaDevice(new EmulatorBackend()))
            {
                Write(directory, device, DeviceReportTests.EmulatedShapes[0]);
            }
            using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(directory, "composition.json")));
            var root = json.RootElement;
            Assert.That(root.GetProperty("emulated").GetBoolean(), Is.True);
            var steps = root.GetProperty("decode_steps").EnumerateArray().ToArray();
            Assert.That(steps, Has.Length.EqualTo(2));
            Assert.That(steps.All(s => s.GetProperty("composed_step_microseconds").GetDouble() > s.GetProperty("single_step_microseconds").GetDouble()), Is.True,
                "two members take longer than one");
            Assert.That(root.GetProperty("logit_sum_bf16").GetProperty("gbps").GetDouble(), Is.GreaterThan(0));
            Assert.That(File.ReadAllText(Path.Combine(directory, "composition.txt")), Does.Contain("logit_sum_bf16"));
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    /// <summary>Named like the device report's GPU case, so tools/device-check.sh's report suite runs it too.</summary>
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
        Write(directory, device, DeviceReportTests.GpuShapes[0]);
    }
}
