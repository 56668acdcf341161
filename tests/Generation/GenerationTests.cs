using KernelLM.Models;
using KernelLM.Models.Llama;
using KernelLM.Runtime;
using KernelLM.Runtime.Cpu;
using KernelLM.Runtime.Generation;
using KernelLM.Runtime.Sampling;
using KernelLM.Tests.Support;

namespace KernelLM.Tests.Generation;

[TestFixture]
public sealed class GenerationTests
{
    private LanguageModel _model = null!;

    [OneTimeSetUp]
    public void SetUp() => _model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 2, ContextLength = 256 });

    [OneTimeTearDown]
    public void TearDown() => _model.Dispose();

    private static GenerationOptions Sampled(int seed, int tokens = 40) => new()
    {
        MaxNewTokens = tokens,
        Sampling = new SamplingOptions { Temperature = 1.0f, TopK = 50, TopP = 0.95f, MinP = 0.02f, Seed = seed },
    };

    [Test]
    public void Same_seed_same_story_other_seed_other_story()
    {
        string Story(int seed) => string.Concat(_model.Generate("Once upon a time", Sampled(seed)).Select(t => t.Text));
        string first = Story(7);
        string again = Story(7);
        string other = Story(8);
        Assert.That(again, Is.EqualTo(first));
        Assert.That(other, Is.Not.EqualTo(first));
    }

    [Test]
    public async Task Async_stream_carries_ids_text_and_log_probs()
    {
        var stats = new GenerationStats();
        var tokens = new List<GeneratedToken>();
        await foreach (var token in _model.GenerateAsync("The little cat", new GenerationOptions { MaxNewTokens = 12, Sampling = SamplingOptions.Greedy }, stats))
        {
            tokens.Add(token);
        }
        Assert.That(tokens, Has.Count.EqualTo(12));
        Assert.That(stats.GeneratedTokens, Is.EqualTo(12));
        Assert.That(stats.FinishReason, Is.EqualTo(FinishReason.MaxTokens));
        Assert.That(stats.PromptTokens, Is.EqualTo(4));
        Assert.That(tokens.All(t => t.LogProbability <= 0 && float.IsFinite(t.LogProbability)), Is.True);
        // Greedy "named" has p = 0.739 in golden.json.
        Assert.That(Math.Exp(tokens[0].LogProbability), Is.EqualTo(0.7392090420472098).Within(1e-3));
        Assert.That(string.Concat(tokens.Select(t => t.Text)), Does.StartWith(" named"));
    }

    [Test]
    public void Cancellation_stops_the_stream_and_releases_the_model()
    {
        using var cancel = new CancellationTokenSource();
        int count = 0;
        Assert.That(() =>
        {
            foreach (var _ in _model.Generate("Once upon a time", Sampled(1, 100), cancellation: cancel.Token))
            {
                if (++count == 5)
                {
                    cancel.Cancel();
                }
            }
        }, Throws.InstanceOf<OperationCanceledException>());
        Assert.That(count, Is.EqualTo(5));
        Assert.That(_model.Generate("Once", Sampled(1, 3)).Count(), Is.EqualTo(3), "the model is usable after a cancelled request");
    }

    [Test]
    public void Stop_string_truncates_the_text_before_it()
    {
        string full = string.Concat(_model.Generate("Once upon a time", new GenerationOptions { MaxNewTokens = 60, Sampling = SamplingOptions.Greedy }).Select(t => t.Text));
        // golden: ", there was a little girl named Zoe. She loved to play outside. ..."
        var stats = new GenerationStats();
        string stopped = string.Concat(_model.Generate("Once upon a time",
            new GenerationOptions { MaxNewTokens = 60, Sampling = SamplingOptions.Greedy, StopStrings = ["Zoe."] }, stats).Select(t => t.Text));
        Assert.That(stopped, Is.EqualTo(full[..full.IndexOf("Zoe.", StringComparison.Ordinal)]));
        Assert.That(stats.FinishReason, Is.EqualTo(FinishReason.StopString));
    }

    [Test]
    public void Stop_matcher_holds_back_partial_matches_across_pieces()
    {
        var matcher = new StopStringMatcher(["<END>", "xyz"]);
        Assert.That(matcher.Push("abc<E"), Is.EqualTo("abc"));
        Assert.That(matcher.Push("N"), Is.EqualTo(""));
        Assert.That(matcher.Push("x"), Is.EqualTo("<EN"), "'x' may start 'xyz': held back; '<EN' may not continue '<END>' any more");
        Assert.That(matcher.Push("yz tail"), Is.EqualTo(""));
        Assert.That(matcher.Stopped, Is.True);
        var open = new StopStringMatcher(["###"]);
        Assert.That(open.Push("a#"), Is.EqualTo("a"));
        Assert.That(open.Flush(), Is.EqualTo("#"));
    }

    private static readonly string[] ExpectedPieces = ["h", "", "é", "!", "", "", "", "😀"];

    [Test]
    public void Detokenizer_never_splits_a_multi_byte_character()
    {
        // tiny-stories: byte b has id b + 2. "é" = C3 A9, "😀" = F0 9F 98 80.
        var detokenizer = new IncrementalDetokenizer(_model.Tokenizer);
        var pieces = new List<string>();
        foreach (int b in new byte[] { (byte)'h', 0xC3, 0xA9, (byte)'!', 0xF0, 0x9F, 0x98, 0x80 })
        {
            pieces.Add(detokenizer.Push(b + 2));
        }
        Assert.That(pieces, Is.EqualTo(ExpectedPieces));
        Assert.That(pieces.All(p => !p.Contains('\uFFFD', StringComparison.Ordinal)), Is.True);
    }

    [Test]
    public void Prompt_longer_than_the_context_is_a_typed_error()
    {
        string prompt = string.Join(' ', Enumerable.Repeat("The little cat sat on the mat.", 60));
        Assert.That(() => _model.Generate(prompt, new GenerationOptions { MaxNewTokens = 5 }).ToList(),
            Throws.TypeOf<ContextLengthException>().With.Message.Contains("256"));
        Assert.That(() => _model.Score(prompt), Throws.TypeOf<ContextLengthException>());
    }

    [Test]
    public void Generation_stops_when_the_context_is_full()
    {
        var stats = new GenerationStats();
        string prompt = string.Join(' ', Enumerable.Repeat("Tom and Lily went to the park.", 25));
        int promptTokens = _model.Encode(prompt).Length;
        Assume.That(promptTokens, Is.LessThan(250), "prompt must leave a little room");
        var tokens = _model.Generate(prompt, new GenerationOptions { MaxNewTokens = 500, Sampling = SamplingOptions.Greedy, StopOnEos = false }, stats).ToList();
        Assert.That(stats.FinishReason, Is.EqualTo(FinishReason.ContextFull));
        Assert.That(promptTokens + tokens.Count(t => t.Id >= 0), Is.EqualTo(256 + 1), "the last token is sampled from the full context");
    }

    [Test]
    public void Invalid_generation_options_are_rejected_before_work()
    {
        Assert.That(() => _model.Generate("x", new GenerationOptions { MaxNewTokens = 0 }), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("max-tokens"));
        Assert.That(() => _model.Generate("x", new GenerationOptions { StopStrings = [""] }), Throws.TypeOf<InvalidParameterException>().With.Message.Contains("stop"));
        Assert.That(() => LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Device = "tpu" }),
            Throws.TypeOf<InvalidParameterException>().With.Message.Contains("device"));
        Assert.That(() => LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { ContextLength = 5000 }),
            Throws.TypeOf<InvalidParameterException>().With.Message.Contains("max_position_embeddings"));
    }

    [Test]
    public void Decode_step_allocates_nothing()
    {
        // One thread: every op runs on this thread, so its allocation counter sees all of the step (the test
        // host's own threads allocate meanwhile and would blur a process-wide count). The worker pool's
        // dispatch is checked separately (Worker_pool_dispatch_allocates_nothing).
        using var model = LlamaModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 1, ContextLength = 1024 });
        using var session = model.CreateSession();
        var logits = new float[model.Config.VocabularySize];
        var sampler = new Sampler(logits.Length);
        var history = new int[1024];
        var random = new Random(3);
        var options = new SamplingOptions { Temperature = 0.9f, TopK = 40, TopP = 0.9f, MinP = 0.05f, RepetitionPenalty = 1.1f };
        int[] token = [0];
        session.Forward(token, logits);
        int length = 1;

        void Step()
        {
            token[0] = Generator.NextToken(sampler, logits, options, history.AsSpan(0, length), random, out _);
            history[length++] = token[0];
            session.Forward(token, logits);
        }

        // Warm up past tiered compilation (methods are re-jitted after 30 calls, in the background after
        // a 100 ms delay): what the JIT and runtime allocate then is not the decode loop's doing.
        for (int round = 0; round < 3; round++)
        {
            for (int i = 0; i < 60; i++)
            {
                Step();
            }
            Thread.Sleep(250);
        }
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 100; i++)
        {
            Step();
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.That(allocated, Is.Zero, "bytes allocated by 100 decode steps (forward + sampling)");
    }

    [Test]
    public void Worker_pool_dispatch_allocates_nothing()
    {
        using var pool = new CpuWorkerPool(3);
        var work = new SpinJob();
        var probe = new AllocationProbe(pool.ThreadCount);
        var before = new long[pool.ThreadCount];
        for (int i = 0; i < 200; i++)
        {
            pool.Run(work, 64, 1);
        }
        Thread.Sleep(250);
        probe.Arm();
        pool.Run(probe, pool.ThreadCount, 1);
        probe.Bytes.CopyTo(before, 0);
        for (int i = 0; i < 500; i++)
        {
            pool.Run(work, 64, 1);
        }
        probe.Arm();
        pool.Run(probe, pool.ThreadCount, 1);
        var after = probe.Bytes;
        Assert.That(work.Executed, Is.EqualTo(700 * 64));
        for (int thread = 0; thread < before.Length; thread++)
        {
            Assert.That(after[thread] - before[thread], Is.Zero, $"bytes allocated on pool thread {thread} by 500 dispatches");
        }
    }

    private sealed class SpinJob : ParallelJob
    {
        private int _executed;

        public int Executed => _executed;

        public override void Execute(int begin, int end, int worker)
        {
            Interlocked.Add(ref _executed, end - begin);
            Thread.SpinWait(50);
        }
    }

    /// <summary>Each pool thread takes exactly one item (all spin until every thread has one) and records its
    /// own allocation counter.</summary>
    private sealed class AllocationProbe(int threads) : ParallelJob
    {
        private int _arrived;

        public long[] Bytes { get; } = new long[threads];

        public void Arm() => Volatile.Write(ref _arrived, 0);

        public override void Execute(int begin, int end, int worker)
        {
            Bytes[worker] = GC.GetAllocatedBytesForCurrentThread();
            Interlocked.Increment(ref _arrived);
            while (Volatile.Read(ref _arrived) < Bytes.Length)
            {
                Thread.SpinWait(20);
            }
        }
    }

    [Test]
    public void Every_native_buffer_is_released_on_dispose()
    {
        int liveBefore = NativeMemoryCounters.LiveCount;
        long bytesBefore = NativeMemoryCounters.LiveBytes;
        using (var model = LanguageModel.Load(TestPaths.TinyStories, new ModelLoadOptions { Threads = 1, ContextLength = 64 }))
        {
            Assert.That(NativeMemoryCounters.LiveCount, Is.GreaterThan(liveBefore));
            _ = model.Generate("Once", new GenerationOptions { MaxNewTokens = 3 }).ToList();
        }
        Assert.That(NativeMemoryCounters.LiveCount, Is.EqualTo(liveBefore));
        Assert.That(NativeMemoryCounters.LiveBytes, Is.EqualTo(bytesBefore));
    }
}
