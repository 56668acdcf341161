using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Models.Tokenization;
using KernelLM.Runtime;
using KernelLM.Runtime.Cuda;
using KernelLM.Runtime.Cuda.Driver;
using KernelLM.Runtime.Cuda.Emulator;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;
using KernelLM.Tests.Cuda;
using KernelLM.Tests.Fixtures;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Generation;

/// <summary>
/// A model on one device for the adaptive-decoding and routing tests: the embedded tiny-stories on the CPU; on the
/// emulated (slow) and real CUDA devices a small synthetic f32 model (fp32 keeps the device's decode and prefill paths
/// within 1e-5 of each other, far inside the oracles' near-tie margin). Sessions come from <see cref="NewSession"/>.
/// </summary>
public sealed class DeviceModel : IDisposable
{
    private readonly LlamaModel _model;
    private readonly CudaDevice? _device;
    private readonly CudaLlamaModel? _uploaded;
    private readonly string? _directory;

    /// <param name="synthetic">A synthetic model on the CPU too (a second model next to tiny-stories).</param>
    /// <param name="dtype">Of the synthetic model (f16: the CUDA session cannot sample on the device, the host path runs).</param>
    public DeviceModel(string deviceName, int seed = 11, CudaDevice? shareDevice = null, bool synthetic = false, DType dtype = DType.F32)
    {
        if (deviceName == "cuda")
        {
            CudaTestSupport.RequireDevice();
        }
        string directory = TestPaths.TinyStories;
        if (deviceName != "cpu" || synthetic)
        {
            _directory = TestPaths.NewTemporaryDirectory("adaptive-model");
            directory = SyntheticModel.Write(_directory, new SyntheticModelSpec { DType = dtype, Seed = seed });
        }
        _model = LlamaModel.Load(directory, new ModelLoadOptions { Threads = 2, ContextLength = 128, PrefillChunk = 16 });
        Tokenizer = HfTokenizer.Load(directory, _model.Config.BosTokenId, _model.Config.EosTokenIds);
        if (deviceName != "cpu")
        {
            _device = shareDevice ?? new CudaDevice(deviceName == "cuda" ? new DriverBackend() : new EmulatorBackend());
            OwnsDevice = shareDevice is null;
            _uploaded = CudaLlamaModel.Upload(_model, _device);
        }
    }

    public HfTokenizer Tokenizer { get; }
    public CudaDevice? Device => _device;
    private bool OwnsDevice { get; }
    public IReadOnlyList<int> Eos => _model.Config.EosTokenIds;
    public int Vocabulary => _model.Config.VocabularySize;

    public IDecoderSession NewSession() => _uploaded is not null ? _uploaded.CreateSession() : _model.CreateSession();

    /// <summary>log_softmax (fp64) of the distribution after <paramref name="sequence"/>, from scratch on <paramref name="oracle"/>.</summary>
    public double[] Distribution(IDecoderSession oracle, IReadOnlyList<int> sequence)
    {
        var row = new float[Vocabulary];
        oracle.Reset();
        oracle.Forward(sequence.ToArray(), row);
        return AdaptiveDecodingOracle.LogSoftmax(row);
    }

    public void Dispose()
    {
        _uploaded?.Dispose();
        if (OwnsDevice)
        {
            _device?.Dispose();
        }
        Tokenizer.Dispose();
        _model.Dispose();
        if (_directory is not null)
        {
            Directory.Delete(_directory, recursive: true);
        }
    }
}

/// <summary>
/// Adaptive decoding on a real model, on the CPU and on the CUDA path (the emulated device in CI): every choice against a
/// full recomputation, and the KV cache after the lookaheads against a plain decode of the chosen tokens.
/// </summary>
[TestFixture("cpu")]
[TestFixture("cuda-emulated")]
[TestFixture("cuda")]
public sealed class AdaptiveDecodingModelTests(string deviceName)
{
    private DeviceModel _model = null!;

    [OneTimeSetUp]
    public void Load() => _model = new DeviceModel(deviceName);

    [OneTimeTearDown]
    public void Unload() => _model?.Dispose();

    /// <summary>The emulated device runs the kernels on the CPU: a few tokens there.</summary>
    private int Tokens => deviceName == "cuda-emulated" ? 5 : 24;

    private static readonly AdaptiveDecodingOptions EveryStep = new() { Threshold = 0, Beams = 3, Lookahead = 3 };

    private List<int> Generate(IDecoderSession session, int[] prompt, GenerationStats stats, List<GeneratedToken>? streamed = null)
    {
        var options = new GenerationOptions
        {
            MaxNewTokens = Tokens,
            Sampling = SamplingOptions.Greedy,
            Adaptive = EveryStep,
            Signals = new TokenSignalOptions { TopK = 5 }, // more than the 3 beams: the device step reduces top-5
        };
        var tokens = Generator.Run(session, _model.Tokenizer, prompt, options, stats).Where(t => t.Id >= 0).ToList();
        streamed?.AddRange(tokens);
        var ids = tokens.Select(t => t.Id).ToList();
        if (stats.FinishReason == FinishReason.EndOfSequence)
        {
            ids.Add(_model.Eos[0]);
        }
        return ids;
    }

    [Test]
    public void Every_choice_matches_a_full_recomputation()
    {
        int[] prompt = _model.Tokenizer.Encode("Once upon a time");
        using var session = _model.NewSession();
        using var oracle = _model.NewSession();
        var stats = new GenerationStats();
        var streamed = new List<GeneratedToken>();
        var ids = Generate(session, prompt, stats, streamed);

        int lookaheads = AdaptiveDecodingOracle.CheckChoices(sequence => _model.Distribution(oracle, sequence), prompt, ids, EveryStep, _model.Eos, session.Capacity,
            [.. streamed.Select(t => t.LogProbability)]);
        foreach (var token in streamed)
        {
            Assert.That(token.Signals!.LogProbability, Is.EqualTo(token.LogProbability), "the signals describe the chosen token");
            Assert.That(token.Signals.Top, Has.Count.EqualTo(5));
            Assert.That(token.Signals.Top.Select(t => t.Id), Does.Contain(token.Id), "the chosen token is among the top 3");
        }
        Assert.That(lookaheads, Is.EqualTo(ids.Count));
        Assert.That(stats.Adaptive!.LookaheadSteps, Is.EqualTo(ids.Count));
        TestContext.Out.WriteLine($"{deviceName}: {ids.Count} steps, {stats.Adaptive.ChangedTokens} changed by the lookahead, {stats.Adaptive.RolloutForwards} rollout passes");
    }

    [Test]
    public void After_the_lookaheads_the_cache_is_a_plain_decode_of_the_chosen_tokens()
    {
        int[] prompt = _model.Tokenizer.Encode("The little cat");
        using var session = _model.NewSession();
        var ids = Generate(session, prompt, new GenerationStats());
        using var plain = _model.NewSession();
        var row = new float[_model.Vocabulary];
        plain.Forward(prompt, row);
        foreach (int id in ids.Take(ids.Count - 1))
        {
            plain.Forward([id], row);
        }
        Assert.That(session.Length, Is.EqualTo(plain.Length));
        if (session is LlamaSession cpu)
        {
            AssertSameCache(cpu.Cache, ((LlamaSession)plain).Cache, plain.Length);
        }
        // The next step on both: the same op sequence over the same cache gives the same bits.
        var expected = new float[_model.Vocabulary];
        var actual = new float[_model.Vocabulary];
        plain.Forward([ids[^1]], expected);
        session.Forward([ids[^1]], actual);
        Assert.That(actual, Is.EqualTo(expected), "logits of the next step after the rolled-back lookaheads");
    }

    private static unsafe void AssertSameCache(KvCache actual, KvCache expected, int length)
    {
        for (int layer = 0; layer < actual.Layers; layer++)
        {
            for (int head = 0; head < actual.KvHeads; head++)
            {
                var keys = new ReadOnlySpan<float>(actual.Keys(layer, head), length * actual.HeadDim);
                var values = new ReadOnlySpan<float>(actual.Values(layer, head), length * actual.HeadDim);
                Assert.That(keys.SequenceEqual(new ReadOnlySpan<float>(expected.Keys(layer, head), length * actual.HeadDim)), Is.True, $"keys of layer {layer}, kv head {head}");
                Assert.That(values.SequenceEqual(new ReadOnlySpan<float>(expected.Values(layer, head), length * actual.HeadDim)), Is.True, $"values of layer {layer}, kv head {head}");
            }
        }
    }
}

/// <summary>
/// The CUDA session's rollback on the device path: after Truncate, sampling continues with the draw counter and the
/// repetition-penalty history of a run that never went ahead.
/// </summary>
[TestFixture("cuda-emulated")]
[TestFixture("cuda")]
public sealed class CudaRollbackTests(string deviceName)
{
    private DeviceModel _model = null!;

    [OneTimeSetUp]
    public void Load() => _model = new DeviceModel(deviceName);

    [OneTimeTearDown]
    public void Unload() => _model?.Dispose();

    [Test]
    public void Truncate_rolls_back_the_draw_counter_and_the_penalty_history()
    {
        // A flat, penalised distribution: a draw from another counter, or a penalty on a dropped token, changes the token.
        var options = new SamplingOptions { Temperature = 3f, TopK = 0, TopP = 1, MinP = 0, RepetitionPenalty = 1.5f };
        int[] prompt = _model.Tokenizer.Encode("Once upon a time");
        using var plain = _model.NewSession();
        using var rolled = _model.NewSession();
        plain.Reset(); // draws are counted since Reset
        rolled.Reset();
        var plainSampler = (IDeviceSampler)plain;
        var rolledSampler = (IDeviceSampler)rolled;
        int fields = VocabStats.FieldCount;
        float[] plainStats = new float[fields], rolledStats = new float[fields];
        const ulong seed = 5;
        int expected = plainSampler.ForwardSample(prompt, options, seed, 0, plainStats, default, default);
        int actual = rolledSampler.ForwardSample(prompt, options, seed, 0, rolledStats, default, default);
        Assert.That(actual, Is.EqualTo(expected));
        int differentDraws = 0;
        for (int step = 0; step < 4; step++)
        {
            // The rolled session runs two tokens ahead (two random draws, two history entries), then comes back.
            int length = rolled.Length;
            int ahead = rolledSampler.ForwardSample([(expected + 1) % _model.Vocabulary], options, seed, 0, rolledStats, default, default);
            int further = rolledSampler.ForwardSample([ahead], options, seed, 0, rolledStats, default, default);
            ((ISessionRollback)rolled).Truncate(length);
            int next = plainSampler.ForwardSample([expected], options, seed, 0, plainStats, default, default);
            actual = rolledSampler.ForwardSample([expected], options, seed, 0, rolledStats, default, default);
            Assert.That(actual, Is.EqualTo(next), $"step {step}: the draw after the rollback");
            Assert.That(rolledStats, Is.EqualTo(plainStats), $"step {step}: the raw distribution's numbers");
            differentDraws += further != next ? 1 : 0;
            expected = next;
        }
        Assert.That(rolled.Length, Is.EqualTo(plain.Length));
        Assert.That(differentDraws, Is.GreaterThan(0), "the draws ahead differ from the kept ones (else a counter left ahead could not be seen)");
        Assert.That(() => ((ISessionRollback)rolled).Truncate(rolled.Length + 1), Throws.TypeOf<ArgumentOutOfRangeException>());
    }

    [Test]
    public void Adaptive_decoding_on_the_host_path_leaves_the_cache_of_a_plain_decode()
    {
        // f16 logits: the session cannot sample on the device, so the generator takes the logits to the host.
        using var f16 = new DeviceModel(deviceName, seed: 13, shareDevice: _model.Device, dtype: DType.F16);
        int[] prompt = f16.Tokenizer.Encode("Once upon a time");
        using var session = f16.NewSession();
        Assert.That(((IDeviceSampler)session).CanSample, Is.False);
        var stats = new GenerationStats();
        var options = new GenerationOptions
        {
            MaxNewTokens = 4,
            Sampling = SamplingOptions.Greedy,
            Adaptive = new AdaptiveDecodingOptions { Threshold = 0, Beams = 2, Lookahead = 2 },
        };
        var ids = Generator.Run(session, f16.Tokenizer, prompt, options, stats).Where(t => t.Id >= 0).Select(t => t.Id).ToList();
        Assert.That(stats.Adaptive!.RolloutForwards, Is.GreaterThan(0));
        using var plain = f16.NewSession();
        var row = new float[f16.Vocabulary];
        plain.Forward(prompt, row);
        foreach (int id in ids.Take(ids.Count - 1))
        {
            plain.Forward([id], row);
        }
        Assert.That(session.Length, Is.EqualTo(plain.Length));
        var expected = new float[f16.Vocabulary];
        var actual = new float[f16.Vocabulary];
        plain.Forward([ids[^1]], expected);
        session.Forward([ids[^1]], actual);
        Assert.That(actual, Is.EqualTo(expected), "logits of the next step after the rolled-back lookaheads");
    }
}

/// <summary>The CPU decode loop with adaptive decoding and with routing allocates nothing (as GenerationTests checks plain decode).</summary>
[TestFixture]
public sealed class AdaptiveDecodingAllocationTests
{
    [Test]
    public void An_adaptive_step_with_lookahead_allocates_nothing()
    {
        using var model = LlamaModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 1, ContextLength = 1024 });
        using var session = model.CreateSession();
        var decoder = new AdaptiveDecoder(session, new AdaptiveDecodingOptions { Threshold = 0, Beams = 3, Lookahead = 2 }, model.Config.EosTokenIds, onDevice: false);
        var logits = new float[model.Config.VocabularySize];
        int[] token = [0];
        void Step() => token[0] = decoder.Step(token, logits, out _);
        Assert.That(AllocatedBySteps(Step, session), Is.Zero, "bytes allocated by 100 adaptive steps (each a 3-candidate lookahead)");
        Assert.That(decoder.Stats.RolloutForwards, Is.GreaterThan(0));
    }

    [Test]
    public void A_routed_step_allocates_nothing()
    {
        using var model = LlamaModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 1, ContextLength = 1024 });
        using var small = model.CreateSession();
        using var large = model.CreateSession();
        var stats = new RoutingStats();
        using var routed = new RoutedSession(small, large, new RoutingOptions { EntropyThreshold = 0.5f }, stats);
        var logits = new float[model.Config.VocabularySize];
        int[] token = [0];
        void Step()
        {
            routed.Forward(token, logits);
            token[0] = ArgMax(logits);
        }
        Assert.That(AllocatedBySteps(Step, routed), Is.Zero, "bytes allocated by 100 routed steps");
        Assert.That(stats.LargeTokens, Is.GreaterThan(0));
        Assert.That(stats.SmallTokens, Is.GreaterThan(0));
    }

    private static int ArgMax(float[] values)
    {
        int best = 0;
        for (int i = 1; i < values.Length; i++)
        {
            if (values[i] > values[best])
            {
                best = i;
            }
        }
        return best;
    }

    /// <summary>Warm-up past tiered compilation (as GenerationTests does), then the bytes this thread allocates in 100 steps.</summary>
    private static long AllocatedBySteps(Action step, IDecoderSession session)
    {
        for (int round = 0; round < 3; round++)
        {
            for (int i = 0; i < 60; i++)
            {
                step();
            }
            Thread.Sleep(250);
        }
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 100; i++)
        {
            step();
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.That(session.Length, Is.LessThan(session.Capacity));
        return allocated;
    }
}
