using KernelLM.Models;
using KernelLM.Models.Composition;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Composition;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Models;

/// <summary>
/// Logit composition on a CUDA device (the emulated one in CI, which executes the real kernels): every member is a CUDA
/// session on one device, so the members' logits stay there and logit_sum combines them; the composed rows must match
/// the same composition on the CPU (the sum, guidance with its negative prompt, contrastive decoding's cut), a generation
/// sampled on the device must report the composed distribution's numbers and pick its greedy token, a decode step
/// allocates nothing, and disposing the composition frees its device memory.
/// </summary>
[TestFixture("cuda-emulated")]
[TestFixture("cuda")]
public sealed class CompositionDeviceTests(string deviceName)
{
    private const string Prompt = "Once upon a time, there was";
    private const string NegativePrompt = "The end.";
    private string _directory = "";

    [OneTimeSetUp]
    public void RequireDevice()
    {
        if (deviceName == "cuda")
        {
            CudaTestSupport.RequireDevice();
        }
    }

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("composition-device");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    private static LanguageModel Load(string directory, string device, LanguageModel? shareDeviceWith = null) =>
        LanguageModel.Load(directory, new ModelLoadOptions { Device = device, Threads = 2, ContextLength = 64, PrefillChunk = 8 }, shareDeviceWith);

    /// <summary>Two synthetic models with the tiny-stories tokenizer, loaded on the CPU and on the device (the second
    /// sharing the first's device).</summary>
    private sealed class Pair : IDisposable
    {
        public Pair(string first, string second, string device)
        {
            CpuFirst = Load(first, "cpu");
            CpuSecond = Load(second, "cpu");
            DeviceFirst = Load(first, device);
            DeviceSecond = Load(second, device, DeviceFirst);
        }

        public LanguageModel CpuFirst { get; }
        public LanguageModel CpuSecond { get; }
        public LanguageModel DeviceFirst { get; }
        public LanguageModel DeviceSecond { get; }

        public void Dispose()
        {
            DeviceSecond.Dispose();
            DeviceFirst.Dispose();
            CpuSecond.Dispose();
            CpuFirst.Dispose();
        }
    }

    private Pair Models(DType dtype) => new(
        SyntheticModel.Write(Path.Combine(_directory, "first"), new SyntheticModelSpec { DType = dtype, Seed = 21, MaxPositionEmbeddings = 256 }),
        SyntheticModel.Write(Path.Combine(_directory, "second"), new SyntheticModelSpec { DType = dtype, Seed = 22, MaxPositionEmbeddings = 256 }),
        deviceName);

    private static LogitComposition Compose(string kind, LanguageModel first, LanguageModel second) => kind switch
    {
        "sum" => LogitComposition.Sum(first, (second, 0.75f), (first, -0.5f)),
        "guidance" => LogitComposition.Guidance(first, NegativePrompt, 2.5f),
        "contrastive" => LogitComposition.Contrastive(first, second, 0.1f),
        _ => throw new ArgumentException(kind),
    };

    /// <summary>The members' CPU-device bound (CudaSessionTests: fp32 2e-5, bf16 (4 layers + 4) 2^-8, times 1 + max |logit|)
    /// times the sum of |weights|: each member's row carries its own error into the sum.</summary>
    private static double Tolerance(DType dtype, LogitComposition composition, double maxLogit)
    {
        double member = dtype == DType.F32 ? 2e-5 * (1 + maxLogit) : (4.0 * 2 + 4) / 256 * (1 + maxLogit);
        return member * composition.Members.Sum(m => Math.Abs(m.Weight));
    }

    public static IEnumerable<TestCaseData> Kinds() =>
        from kind in new[] { "sum", "guidance", "contrastive" }
        from dtype in new[] { DType.F32, DType.BF16 }
        select new TestCaseData(kind, dtype).SetName($"composed_rows_cpu_vs_device({kind}, {dtype})");

    [TestCaseSource(nameof(Kinds))]
    public void Composed_rows_on_the_device_match_the_cpu(string kind, DType dtype)
    {
        using var models = Models(dtype);
        using var cpu = Compose(kind, models.CpuFirst, models.CpuSecond);
        using var device = Compose(kind, models.DeviceFirst, models.DeviceSecond);
        Assert.That(device.OnDevice, Is.True, "every member is a CUDA session on one device: the sum runs there");
        Assert.That(cpu.OnDevice, Is.False);
        int vocabulary = cpu.VocabularySize;
        int[] prompt = models.CpuFirst.Encode(Prompt);
        var expected = new float[vocabulary];
        var actual = new float[vocabulary];
        // The expert's own CPU row, to tell a cut that differs at the cutoff from a wrong one.
        using var expert = models.CpuFirst.CreateSession();
        var expertRow = new float[models.CpuFirst.Config.VocabularySize];
        cpu.Session.Reset();
        device.Session.Reset();
        cpu.Session.Forward(prompt, expected);
        device.Session.Forward(prompt, actual);
        expert.Forward(prompt, expertRow);
        double worst = Compare(dtype, cpu, expected, actual, expertRow, "prompt");
        foreach (int token in new[] { 42, 1001, 7 })
        {
            cpu.Session.Forward([token], expected);
            device.Session.Forward([token], actual);
            expert.Forward([token], expertRow);
            worst = Math.Max(worst, Compare(dtype, cpu, expected, actual, expertRow, $"after {token}"));
        }
        if (kind != "guidance")
        {
            // Every position at once, in the device's prefill chunks (8 tokens: the prompt spans two).
            int[] text = [.. prompt, .. prompt];
            var all = new float[text.Length * vocabulary];
            var allDevice = new float[text.Length * vocabulary];
            var allExpert = new float[text.Length * expertRow.Length];
            cpu.Session.Reset();
            device.Session.Reset();
            expert.Reset();
            cpu.Session.Forward(text, all, allPositions: true);
            device.Session.Forward(text, allDevice, allPositions: true);
            expert.Forward(text, allExpert, allPositions: true);
            for (int t = 0; t < text.Length; t++)
            {
                worst = Math.Max(worst, Compare(dtype, cpu, all.AsSpan(t * vocabulary, vocabulary), allDevice.AsSpan(t * vocabulary, vocabulary),
                    allExpert.AsSpan(t * expertRow.Length, vocabulary), $"position {t}"));
            }
        }
        TestContext.Out.WriteLine($"{kind}, {dtype}: max |cpu - device| = {worst:E3}");
    }

    private static double Compare(DType dtype, LogitComposition composition, ReadOnlySpan<float> expected, ReadOnlySpan<float> actual,
        ReadOnlySpan<float> expert, string what)
    {
        double maxLogit = 0;
        foreach (float value in expected)
        {
            if (float.IsFinite(value))
            {
                maxLogit = Math.Max(maxLogit, Math.Abs(value));
            }
        }
        double tolerance = Tolerance(dtype, composition, maxLogit);
        double worst = 0;
        int masked = 0, oneSided = 0;
        bool cut = composition.Session is ComposedSession { PlausibilityAlpha: > 0 };
        double expertMax = 0;
        foreach (float value in expert)
        {
            expertMax = Math.Max(expertMax, Math.Abs(value));
        }
        // One member's bound (the expert's row on each device), and the cutoff it gives.
        double expertBound = dtype == DType.F32 ? 2e-5 * (1 + expertMax) : (4.0 * 2 + 4) / 256 * (1 + expertMax);
        double cutoff = cut ? System.Numerics.Tensors.TensorPrimitives.Max(expert) + Math.Log(((ComposedSession)composition.Session).PlausibilityAlpha) : 0;
        for (int i = 0; i < expected.Length; i++)
        {
            if (float.IsNegativeInfinity(expected[i]) || float.IsNegativeInfinity(actual[i]))
            {
                // Outside the plausible set. Cut on one side only: an expert logit within the devices' difference of the
                // cutoff may legitimately fall either side; only a cut can make -inf at all.
                Assert.That(cut, Is.True, $"{what}: token {i} is -inf ({expected[i]} / {actual[i]}) without a plausibility cut");
                masked++;
                if (!(float.IsNegativeInfinity(expected[i]) && float.IsNegativeInfinity(actual[i])))
                {
                    oneSided++;
                    Assert.That(Math.Abs(expert[i] - cutoff), Is.LessThanOrEqualTo(2 * expertBound),
                        $"{what}: token {i} cut on one device only ({expected[i]} / {actual[i]}), though its expert logit {expert[i]} is not at the cutoff {cutoff}");
                }
                continue;
            }
            double error = Math.Abs(expected[i] - actual[i]);
            Assert.That(error, Is.LessThanOrEqualTo(tolerance), $"{what}: token {i}: cpu {expected[i]} device {actual[i]} (bound {tolerance:E2})");
            worst = Math.Max(worst, error);
        }
        if (cut)
        {
            Assert.That(masked, Is.GreaterThan(expected.Length / 2), $"{what}: the cut removes most tokens");
            TestContext.Out.WriteLine($"{what}: {oneSided} token(s) at the cutoff cut on one device only");
        }
        return worst;
    }

    [TestCase("sum")]
    [TestCase("guidance")]
    [TestCase("contrastive")]
    public void A_generation_sampled_on_the_device_reports_the_composed_distribution(string kind)
    {
        const DType dtype = DType.F32;
        using var models = Models(dtype);
        using var cpu = Compose(kind, models.CpuFirst, models.CpuSecond);
        using var device = Compose(kind, models.DeviceFirst, models.DeviceSecond);
        Assert.That(((IDeviceSampler)device.Session).CanSample, Is.True);
        var options = new GenerationOptions
        {
            MaxNewTokens = 8, StopOnEos = false, Sampling = new SamplingOptions { Temperature = 0 }, Signals = new TokenSignalOptions { TopK = 2 },
        };
        var tokens = device.Generate(Prompt, options).Where(t => t.Id >= 0).ToList();
        Assert.That(tokens, Has.Count.EqualTo(8));
        // Replay the same tokens through the CPU composition: the row before each one.
        int vocabulary = cpu.VocabularySize;
        var row = new float[vocabulary];
        cpu.Session.Reset();
        cpu.Session.Forward(models.CpuFirst.Encode(Prompt), row);
        foreach (var token in tokens)
        {
            double max = row.Where(float.IsFinite).Max();
            double logSum = max + Math.Log(row.Sum(x => Math.Exp(x - max)));
            double tolerance = 2 * Tolerance(dtype, cpu, row.Where(float.IsFinite).Max(Math.Abs));
            Assert.That(token.LogProbability, Is.EqualTo(row[token.Id] - logSum).Within(tolerance), $"log-prob of {token.Id}");
            double entropy = -row.Where(float.IsFinite).Sum(x => Math.Exp(x - logSum) * (x - logSum));
            Assert.That(token.Signals!.Entropy, Is.EqualTo(entropy).Within(tolerance + 1e-4), $"entropy before {token.Id}");
            // Greedy: the CPU's top token unless the CPU's top-2 margin is within the bounds of both sides.
            var order = Enumerable.Range(0, vocabulary).OrderByDescending(i => row[i]).ToArray();
            if (token.Id != order[0])
            {
                Assert.That(row[order[0]] - row[order[1]], Is.LessThan(2 * tolerance), $"device chose {token.Id}, cpu's top is {order[0]}");
            }
            cpu.Session.Forward([token.Id], row);
        }
    }

    [Test]
    public void A_composed_device_decode_step_allocates_nothing()
    {
        using var models = Models(DType.BF16);
        using var composition = LogitComposition.Contrastive(models.DeviceFirst, models.DeviceSecond, 0.1f);
        var session = (IDeviceSampler)composition.Session;
        var options = new SamplingOptions { Temperature = 0.8f, TopK = 20, TopP = 0.9f, MinP = 0.02f, RepetitionPenalty = 1.2f };
        var stats = new float[VocabStats.FieldCount];
        var ids = new int[4];
        var logProbs = new float[4];
        composition.Session.Reset();
        int[] next = [session.ForwardSample([0, 5, 9], options, 3, 4, stats, ids, logProbs)];
        for (int i = 0; i < 30; i++)
        {
            next[0] = session.ForwardSample(next, options, 3, 4, stats, ids, logProbs);
        }
        Thread.Sleep(200);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10; i++)
        {
            next[0] = session.ForwardSample(next, options, 3, 4, stats, ids, logProbs);
        }
        Assert.That(GC.GetAllocatedBytesForCurrentThread() - before, Is.Zero, "bytes allocated by 10 composed device decode steps");
    }

    [Test]
    public void Disposing_a_composition_frees_its_device_memory()
    {
        using var models = Models(DType.BF16);
        using var first = LogitComposition.Sum(models.DeviceFirst, (models.DeviceSecond, 1f));
        var backend = ((IDeviceLogits)((ComposedSession)first.Session).Members[0].Session).LogitsDevice.Backend;
        long LiveBytes() => backend is KernelLM.Runtime.Cuda.Emulator.EmulatorBackend emulator ? emulator.LiveAllocatedBytes : DeviceMemoryCounters.LiveBytes;
        long before = LiveBytes();
        var composition = LogitComposition.Sum(models.DeviceFirst, (models.DeviceSecond, 1f));
        Assert.That(LiveBytes(), Is.GreaterThan(before), "sessions and buffers on the device");
        Assert.That(composition.Generate(Prompt, new GenerationOptions { MaxNewTokens = 3, Sampling = new SamplingOptions { Temperature = 0 } }).Count(), Is.GreaterThan(0));
        composition.Dispose();
        Assert.That(LiveBytes(), Is.EqualTo(before));
    }
}
