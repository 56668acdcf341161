using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Models.Scoring;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Models;

/// <summary>
/// Whole models on the CUDA path (the emulated device, which executes the real kernels): CPU and CUDA sessions
/// must agree on every architecture variant the loader supports, prefill in chunks and KV-cached decode; the
/// embedded model reproduces its golden logits and greedy continuation; out of memory is a typed error that
/// leaks nothing.
/// </summary>
[TestFixture("cuda-emulated")]
[TestFixture("cuda")]
public sealed class CudaSessionTests(string deviceName)
{
    private CudaDevice _device = null!;
    private string _directory = "";

    [OneTimeSetUp]
    public void CreateDevice()
    {
        if (deviceName == "cuda")
        {
            CudaTestSupport.RequireDevice();
        }
        _device = new CudaDevice(deviceName == "cuda" ? new DriverBackend() : new EmulatorBackend());
    }

    [OneTimeTearDown]
    public void DisposeDevice() => _device?.Dispose();

    [SetUp]
    public void CreateDirectory() => _directory = TestPaths.NewTemporaryDirectory("cuda-session");

    [TearDown]
    public void DeleteDirectory() => Directory.Delete(_directory, recursive: true);

    /// <summary>
    /// The tolerance between the CPU (fp32 activations) and the device (activations stored in the model's dtype,
    /// fp32 accumulation). fp32 models: both sides differ only in summation order, a few u = 2^-24 per op; 2e-5 x
    /// (1 + max |logit|) as in the fp64 reference test. bf16 / f16 models: every stored activation is rounded to
    /// the dtype (unit roundoff 2^-8 / 2^-11); the residual stream is rounded 2 x layers + 2 times along any path
    /// to the logits and the per-op roundings of q, k, v, attention and the MLP add to the same order, so the
    /// bound is (4 x layers + 4) x unit roundoff x (1 + max |logit|).
    /// </summary>
    private static double Tolerance(DType dtype, int layers, double maxLogit) => dtype switch
    {
        DType.F32 => 2e-5 * (1 + maxLogit),
        DType.F16 => (4.0 * layers + 4) / 2048 * (1 + maxLogit),
        _ => (4.0 * layers + 4) / 256 * (1 + maxLogit),
    };

    private static IEnumerable<TestCaseData> Models()
    {
        yield return Case("llama_gqa_bf16", new SyntheticModelSpec());
        yield return Case("llama_no_gqa_f32", new SyntheticModelSpec { KvHeads = 4, DType = DType.F32, Seed = 2 });
        yield return Case("llama_mqa_tied_f16", new SyntheticModelSpec { KvHeads = 1, TieWordEmbeddings = true, DType = DType.F16, Seed = 3 });
        yield return Case("llama_attention_bias_f32", new SyntheticModelSpec { AttentionBias = true, DType = DType.F32, Seed = 4 });
        yield return Case("llama_llama3_rope_scaling_f32", new SyntheticModelSpec { Llama3RopeScaling = true, DType = DType.F32, Seed = 5 });
        yield return Case("llama_head_dim_32_bf16", new SyntheticModelSpec { HeadDim = 32, Seed = 6 });
        yield return Case("mistral_sliding_window_5_f32", new SyntheticModelSpec { Architecture = Architecture.Mistral, SlidingWindow = 5, DType = DType.F32, Seed = 7 });
        yield return Case("qwen2_biases_bf16", new SyntheticModelSpec { Architecture = Architecture.Qwen2, Seed = 8 });
        yield return Case("qwen2_tied_f32", new SyntheticModelSpec { Architecture = Architecture.Qwen2, TieWordEmbeddings = true, DType = DType.F32, Seed = 9 });
    }

    private static TestCaseData Case(string name, SyntheticModelSpec spec) => new TestCaseData(spec).SetName($"cpu_vs_cuda({name})");

    [TestCaseSource(nameof(Models))]
    public void Cpu_and_cuda_sessions_agree(SyntheticModelSpec spec)
    {
        SyntheticModel.Write(_directory, spec);
        int[] prompt = [0, 17, 300, 1999, 45, 45, 1024, 7, 88, 1500, 2047, 3, 640, 99, 12, 150, 151, 152, 5];
        int[] decoded = [42, 1001, 77, 2000, 9, 9];
        int vocabulary = spec.VocabularySize;
        // Chunks of 8: the prompt takes three prefill chunks, the last one partial.
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 2, ContextLength = 64, PrefillChunk = 8 });
        using var cpu = model.CreateSession();
        using var uploaded = CudaLlamaModel.Upload(model, _device);
        using var cuda = uploaded.CreateSession();
        long matrixBytes = model.Layers.Sum(l => l.Query.ByteLength + l.Key.ByteLength + l.Value.ByteLength + l.Output.ByteLength
                                                 + l.Gate.ByteLength + l.Up.ByteLength + l.Down.ByteLength)
                           + model.Embedding.ByteLength + (spec.TieWordEmbeddings ? 0 : model.LmHead.ByteLength);
        Assert.That(uploaded.UploadedBytes, Is.EqualTo(matrixBytes), "every matrix went up through the staging buffers, once");

        var expected = new float[prompt.Length * vocabulary];
        var actual = new float[prompt.Length * vocabulary];
        cpu.Forward(prompt, expected, allPositions: true);
        cuda.Forward(prompt, actual, allPositions: true);
        double worst = Compare(spec, expected, actual, "prefill");
        var expectedRow = new float[vocabulary];
        var actualRow = new float[vocabulary];
        foreach (int token in decoded)
        {
            cpu.Forward([token], expectedRow);
            cuda.Forward([token], actualRow);
            worst = Math.Max(worst, Compare(spec, expectedRow, actualRow, $"decode at {cuda.Length - 1}"));
        }
        Assert.That(cuda.Length, Is.EqualTo(cpu.Length));
        TestContext.Out.WriteLine($"{spec.DType}: max |cpu - cuda| = {worst:E3}");
    }

    private static double Compare(SyntheticModelSpec spec, float[] expected, float[] actual, string what)
    {
        double maxLogit = expected.Max(v => Math.Abs(v));
        double tolerance = Tolerance(spec.DType, spec.Layers, maxLogit);
        double worst = 0;
        int worstIndex = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            double error = Math.Abs(expected[i] - actual[i]);
            if (!(error <= worst))
            {
                worst = error;
                worstIndex = i;
            }
        }
        Assert.That(worst, Is.LessThanOrEqualTo(tolerance),
            $"{what}: logit {worstIndex} cpu {expected[worstIndex]} cuda {actual[worstIndex]} (tolerance {tolerance:E2}, max |logit| {maxLogit:F2})");
        return worst;
    }

    // ------------------------------------------------------------------ the embedded model's golden answers

    public static IEnumerable<TestCaseData> GoldenPrompts()
    {
        using var golden = System.Text.Json.JsonDocument.Parse(File.ReadAllBytes(Path.Combine(TestPaths.TinyStories, "golden.json")));
        foreach (var prompt in golden.RootElement.GetProperty("prompts").EnumerateArray())
        {
            string name = prompt.GetProperty("name").GetString()!;
            yield return new TestCaseData(name, DType.F32).SetName($"golden_on_cuda({name}, activations=F32)");
            yield return new TestCaseData(name, DType.BF16).SetName($"golden_on_cuda({name}, activations=BF16)");
        }
    }

    /// <summary>
    /// The embedded model's golden logits and greedy continuation (an independent fp32 implementation) on the
    /// emulated device. With fp32 activations (bf16 weights widened on the device) the device must meet the CPU's
    /// bounds: logits within 1e-4 and the greedy ids exactly, up to a near tie. With bf16 activations (the
    /// checkpoint's dtype, how the engine runs it by default) the logits must stay within the derived bf16 bound,
    /// and every greedy step whose golden top-1 / top-2 margin exceeds twice that bound must pick the golden id.
    /// </summary>
    [TestCaseSource(nameof(GoldenPrompts))]
    public void Embedded_model_reproduces_its_golden_answers(string name, DType activations)
    {
        using var golden = System.Text.Json.JsonDocument.Parse(File.ReadAllBytes(Path.Combine(TestPaths.TinyStories, "golden.json")));
        var prompt = golden.RootElement.GetProperty("prompts").EnumerateArray().Single(p => p.GetProperty("name").GetString() == name);
        int[] ids = prompt.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var expected = prompt.GetProperty("last_logits").EnumerateArray().Select(e => e.GetDouble()).ToArray();
        var greedy = prompt.GetProperty("greedy");
        int[] greedyIds = greedy.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        double[] margins = greedy.GetProperty("top1_top2_logit_margin").EnumerateArray().Select(e => e.GetDouble()).ToArray();

        using var model = LlamaModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 1, ContextLength = 256 });
        using var uploaded = CudaLlamaModel.Upload(model, _device, activations);
        using var session = uploaded.CreateSession();
        var logits = new float[model.Config.VocabularySize];
        session.Forward(ids, logits);
        double maxLogit = expected.Max(Math.Abs);
        double tolerance = activations == DType.F32 ? 1e-4 : Tolerance(DType.BF16, model.Config.Layers, maxLogit);
        double maxError = logits.Select((l, i) => Math.Abs(l - expected[i])).Max();
        TestContext.Out.WriteLine($"{name}, {activations}: max |logit - golden| = {maxError:E3} (bound {tolerance:E2})");
        Assert.That(maxError, Is.LessThanOrEqualTo(tolerance));

        // Greedy: margins are of logits, each side within the bound, so a margin above twice it cannot flip.
        double required = activations == DType.F32 ? 1e-3 : 2 * tolerance;
        int compared = 0;
        for (int step = 0; step < greedyIds.Length && step < 16; step++)
        {
            int token = System.Numerics.Tensors.TensorPrimitives.IndexOfMax(logits);
            if (token != greedyIds[step])
            {
                // Only a step whose golden margin is within the bound may legitimately pick another token.
                Assert.That(margins[step], Is.LessThan(required), $"greedy step {step}: {token} instead of {greedyIds[step]} (margin {margins[step]:F4})");
                TestContext.Out.WriteLine($"{name}: diverged at step {step} (margin {margins[step]:F4} below {required:F4}) after {compared} equal steps");
                break;
            }
            compared++;
            session.Forward([token], logits);
        }
        TestContext.Out.WriteLine($"{name}, {activations}: {compared} greedy steps equal the golden ids");
        if (activations == DType.F32)
        {
            Assert.That(compared, Is.GreaterThanOrEqualTo(10), "too few greedy steps compared to mean anything");
        }
    }

    [Test]
    public void Out_of_device_memory_is_a_typed_error_and_leaks_nothing()
    {
        if (deviceName != "cuda-emulated")
        {
            Assert.Ignore("needs the emulated device's memory budget (a real GPU's memory is what it is)");
        }
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.F32 });
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 1, ContextLength = 256 });
        // The synthetic model's weights are about 1.6 MB in fp32: a 1 MB device cannot hold them.
        using var small = new CudaDevice(new EmulatorBackend(new EmulatorOptions { MemoryBytes = 1 << 20 }));
        long before = DeviceMemoryCounters.LiveBytes;
        var error = Assert.Throws<DeviceOutOfMemoryException>(() => CudaLlamaModel.Upload(model, small));
        Assert.That(error!.Message, Does.Contain("out of device memory").And.Contain("'model.").And.Contain("bytes"));
        Assert.That(DeviceMemoryCounters.LiveBytes, Is.EqualTo(before), "everything uploaded before the failure is freed");
        // A session that does not fit: the 1.4 MB of weights fit a 2 MB device, the session's 128-token logits
        // buffer (1 MB) on top of them does not.
        using var medium = new CudaDevice(new EmulatorBackend(new EmulatorOptions { MemoryBytes = 2 << 20 }));
        using var uploaded = CudaLlamaModel.Upload(model, medium);
        long withWeights = DeviceMemoryCounters.LiveBytes;
        var sessionError = Assert.Throws<DeviceOutOfMemoryException>(() => uploaded.CreateSession().Dispose());
        Assert.That(sessionError!.Message, Does.Contain("out of device memory").And.Contain("of this session"));
        Assert.That(DeviceMemoryCounters.LiveBytes, Is.EqualTo(withWeights), "the session's partial allocations are freed");
    }

    /// <summary>Scoring a CUDA-loaded model reduces the logits on the device (IDeviceReduction); its numbers must
    /// match the CPU's (an fp32 model: both sides in fp32, 1e-4 as in the golden tests).</summary>
    [Test]
    public void Scoring_on_the_device_matches_the_cpu()
    {
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.F32, Seed = 11 });
        string referenceDirectory = Path.Combine(_directory, "reference");
        Directory.CreateDirectory(referenceDirectory);
        SyntheticModel.Write(referenceDirectory, new SyntheticModelSpec { DType = DType.F32, Seed = 21 });
        var cpuOptions = new ModelLoadOptions { Device = "cpu", Threads = 1, ContextLength = 64, PrefillChunk = 8 };
        var deviceOptions = new ModelLoadOptions { Device = deviceName, ContextLength = 64, PrefillChunk = 8 };
        using var cpu = LanguageModel.Load(_directory, cpuOptions);
        using var cpuReference = LanguageModel.Load(referenceDirectory, cpuOptions);
        using var device = LanguageModel.Load(_directory, deviceOptions);
        // On the scored model's device: the two models' rows meet there and are reduced together.
        using var deviceReference = LanguageModel.Load(referenceDirectory, deviceOptions, shareDeviceWith: device);
        Assert.That(device.IsCuda, Is.True);
        int[] ids = [0, 17, 300, 1999, 45, 45, 1024, 7, 88, 1500, 2047, 3, 640, 99, 12, 150, 151, 152, 5, 42];
        foreach (bool withReference in new[] { false, true })
        {
            using var cpuScorer = new Scorer(cpu, withReference ? cpuReference : null, topK: 4);
            using var deviceScorer = new Scorer(device, withReference ? deviceReference : null, topK: 4);
            var expected = cpuScorer.Score(ids);
            var actual = deviceScorer.Score(ids);
            Assert.That(actual.Positions, Has.Count.EqualTo(expected.Positions.Count));
            for (int i = 0; i < expected.Positions.Count; i++)
            {
                var e = expected.Positions[i];
                var a = actual.Positions[i];
                string at = $"position {e.Position}, reference {withReference}";
                Assert.That(a.LogProbability, Is.EqualTo(e.LogProbability).Within(1e-4), $"{at}: log-prob");
                Assert.That(a.Entropy, Is.EqualTo(e.Entropy).Within(1e-4), $"{at}: entropy");
                Assert.That(a.Margin, Is.EqualTo(e.Margin).Within(1e-4), $"{at}: margin");
                Assert.That(a.Kurtosis, Is.EqualTo(e.Kurtosis).Within(1e-3 * (1 + Math.Abs(e.Kurtosis))), $"{at}: kurtosis");
                Assert.That(a.Top.Select(t => t.Id), Is.EqualTo(e.Top.Select(t => t.Id)), $"{at}: top ids");
                if (withReference)
                {
                    Assert.That(a.KlPq, Is.EqualTo(e.KlPq).Within(1e-4), $"{at}: KL(p||q)");
                    Assert.That(a.KlQp, Is.EqualTo(e.KlQp).Within(1e-4), $"{at}: KL(q||p)");
                    Assert.That(a.LogRatio, Is.EqualTo(e.LogRatio).Within(1e-4), $"{at}: log-ratio");
                }
            }
            if (withReference)
            {
                Assert.That(expected.Positions.Max(p => p.KlPq), Is.GreaterThan(1e-3), "two different models: the KL is not trivially 0");
            }
        }
    }

    /// <summary>
    /// Generation on the device (IDeviceSampler: sampling, the repetition penalty and the signals run there; a step
    /// copies back the id and its numbers): greedy, with and without the penalty, must produce the CPU's tokens,
    /// log-probs and top alternatives on an fp32 model; seeded sampling repeats itself and depends on the seed.
    /// </summary>
    [Test]
    public void Generation_on_the_device_matches_the_cpu_and_repeats_with_a_seed()
    {
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.F32, Seed = 12 });
        using var cpu = LanguageModel.Load(_directory, new ModelLoadOptions { Device = "cpu", Threads = 1, ContextLength = 64, PrefillChunk = 8 });
        using var device = LanguageModel.Load(_directory, new ModelLoadOptions { Device = deviceName, ContextLength = 64, PrefillChunk = 8 });
        const string prompt = "Once upon a time there was";
        foreach (float penalty in new[] { 1f, 1.5f })
        {
            var options = new KernelLM.Runtime.Generation.GenerationOptions
            {
                MaxNewTokens = 10,
                StopOnEos = false,
                Sampling = new KernelLM.Runtime.Sampling.SamplingOptions { Temperature = 0, RepetitionPenalty = penalty },
                Signals = new KernelLM.Runtime.Signals.TokenSignalOptions { TopK = 3 },
            };
            var expected = cpu.Generate(prompt, options).Where(t => t.Id >= 0).ToList();
            var actual = device.Generate(prompt, options).Where(t => t.Id >= 0).ToList();
            Assert.That(actual.Select(t => t.Id), Is.EqualTo(expected.Select(t => t.Id)), $"greedy ids, penalty {penalty}");
            for (int i = 0; i < expected.Count; i++)
            {
                Assert.That(actual[i].LogProbability, Is.EqualTo(expected[i].LogProbability).Within(1e-4), $"log-prob of token {i}, penalty {penalty}");
                Assert.That(actual[i].Signals!.Entropy, Is.EqualTo(expected[i].Signals!.Entropy).Within(1e-4), $"entropy of token {i}");
                Assert.That(actual[i].Signals!.Top.Select(t => t.Id), Is.EqualTo(expected[i].Signals!.Top.Select(t => t.Id)), $"alternatives of token {i}");
            }
        }
        List<int> Sampled(int seed) => device.Generate(prompt, new KernelLM.Runtime.Generation.GenerationOptions
        {
            MaxNewTokens = 12,
            StopOnEos = false,
            Sampling = new KernelLM.Runtime.Sampling.SamplingOptions { Temperature = 1.5f, TopK = 0, TopP = 1, MinP = 0, Seed = seed },
        }).Where(t => t.Id >= 0).Select(t => t.Id).ToList();
        var first = Sampled(7);
        Assert.That(Sampled(7), Is.EqualTo(first), "same seed, same tokens");
        Assert.That(Sampled(8), Is.Not.EqualTo(first), "another seed, other tokens");
    }

    /// <summary>The device decode step (forward, sampling and the signals' reduction on the device) allocates nothing
    /// on the managed heap of the calling thread: views and kernel names are made once.</summary>
    [Test]
    public void A_device_decode_step_allocates_nothing()
    {
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.BF16, Seed = 13 });
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 1, ContextLength = 256 });
        using var uploaded = CudaLlamaModel.Upload(model, _device);
        using var session = uploaded.CreateSession(cudaGraphs: true);
        var options = new KernelLM.Runtime.Sampling.SamplingOptions { Temperature = 0.8f, TopK = 20, TopP = 0.9f, MinP = 0.02f, RepetitionPenalty = 1.2f };
        var stats = new float[KernelLM.Runtime.Signals.VocabStats.FieldCount];
        var ids = new int[4];
        var logProbs = new float[4];
        int[] next = [session.ForwardSample([0, 5, 9], options, 3, 4, stats, ids, logProbs)];
        for (int i = 0; i < 40; i++)
        {
            next[0] = session.ForwardSample(next, options, 3, 4, stats, ids, logProbs);
        }
        Thread.Sleep(200);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 20; i++)
        {
            next[0] = session.ForwardSample(next, options, 3, 4, stats, ids, logProbs);
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.That(allocated, Is.Zero, "bytes allocated by 20 device decode steps");
        Assert.That(session.CapturedGraphs, Is.EqualTo(1), "the steps replayed the decode graph captured by the first one");
    }

    /// <summary>Replaying the captured decode step gives the same logits, bit for bit, as launching its kernels one by
    /// one, across a context bound (a second graph is captured at position 128) and after a Reset (the graphs are
    /// reused: the position, length and token come from device memory).</summary>
    [Test]
    public void Decode_graphs_replay_the_eager_decode_bit_for_bit()
    {
        SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = DType.BF16, Seed = 21, AttentionBias = true });
        using var model = LlamaModel.Load(_directory, new ModelLoadOptions { Threads = 2, ContextLength = 320, PrefillChunk = 64 });
        using var uploaded = CudaLlamaModel.Upload(model, _device);
        using var eager = uploaded.CreateSession(cudaGraphs: false);
        using var graphed = uploaded.CreateSession(cudaGraphs: true);
        Assert.That((eager.UsesCudaGraphs, graphed.UsesCudaGraphs), Is.EqualTo((false, true)));
        int vocabulary = model.Config.VocabularySize;
        int[] prompt = Enumerable.Range(0, 120).Select(i => i * 37 % vocabulary).ToArray();
        var expected = new float[vocabulary];
        var actual = new float[vocabulary];
        List<float[]> firstRun = [];
        for (int run = 0; run < 2; run++)
        {
            eager.Reset();
            graphed.Reset();
            eager.Forward(prompt, expected);
            graphed.Forward(prompt, actual);
            Assert.That(actual, Is.EqualTo(expected), "prefill (never a graph)");
            int token = 1;
            for (int step = 0; step < 16; step++)   // positions 120..135: the bound goes from 128 to 256 at 128
            {
                eager.Forward([token], expected);
                graphed.Forward([token], actual);
                Assert.That(actual, Is.EqualTo(expected).AsCollection, $"run {run}, decode at position {graphed.Length - 1}");
                if (run == 0)
                {
                    firstRun.Add((float[])actual.Clone());
                }
                else
                {
                    Assert.That(actual, Is.EqualTo(firstRun[step]).AsCollection, $"run 1 repeats run 0 at step {step}");
                }
                token = Array.IndexOf(actual, actual.Max());
            }
            Assert.That(graphed.CapturedGraphs, Is.EqualTo(2), "one graph per context bound reached (128, 256)");
        }
        Assert.That(eager.CapturedGraphs, Is.Zero);
    }
}
