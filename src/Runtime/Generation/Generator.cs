using System.Diagnostics;
using System.Runtime.CompilerServices;
using KernelLM.Runtime.Sampling;
using KernelLM.Runtime.Signals;

namespace KernelLM.Runtime.Generation;

public sealed record GenerationOptions
{
    public int MaxNewTokens { get; init; } = 256;
    public SamplingOptions Sampling { get; init; } = new();
    public IReadOnlyList<string> StopStrings { get; init; } = [];

    /// <summary>Stop when the model emits one of its EOS ids (the EOS itself is not streamed).</summary>
    public bool StopOnEos { get; init; } = true;

    /// <summary>Per-token signals (entropy, kurtosis, log-prob, top alternatives) attached to each streamed token;
    /// null (the default) computes none and costs nothing.</summary>
    public TokenSignalOptions? Signals { get; init; }

    /// <summary>Adaptive decoding (greedy, or a lookahead rerank where the entropy is high); null = off. It chooses every
    /// token itself, so it needs greedy sampling options without a repetition penalty.</summary>
    public AdaptiveDecodingOptions? Adaptive { get; init; }

    public void Validate()
    {
        Signals?.Validate();
        Adaptive?.Validate();
        if (Adaptive is not null && (!Sampling.IsGreedy || Sampling.RepetitionPenalty != 1f))
        {
            throw new InvalidParameterException("adaptive-decoding",
                $"chooses tokens greedily or by lookahead; it takes temperature 0 and repetition penalty 1 (not {Sampling.Temperature} and {Sampling.RepetitionPenalty})");
        }
        if (MaxNewTokens < 1)
        {
            throw new InvalidParameterException("max-tokens", $"{MaxNewTokens} (must be >= 1)");
        }
        Sampling.Validate();
        foreach (string stop in StopStrings)
        {
            if (string.IsNullOrEmpty(stop))
            {
                throw new InvalidParameterException("stop", "stop strings must not be empty");
            }
        }
    }
}

/// <summary>One streamed token: its id, the text it completes (may be empty while a multi-byte character
/// is incomplete), log p(token | prefix) under the model's unmodified distribution, and its signals when
/// <see cref="GenerationOptions.Signals"/> asked for them. A final piece of held-back text has id -1.</summary>
public readonly record struct GeneratedToken(int Id, string Text, float LogProbability, TokenSignals? Signals = null);

public enum FinishReason
{
    None,
    EndOfSequence,
    StopString,
    MaxTokens,
    ContextFull,
}

/// <summary>Filled in while a generation runs; complete once its stream has ended.</summary>
public sealed class GenerationStats
{
    public int PromptTokens { get; internal set; }
    public int GeneratedTokens { get; internal set; }
    public TimeSpan PrefillTime { get; internal set; }
    public TimeSpan DecodeTime { get; internal set; }
    public FinishReason FinishReason { get; internal set; }

    /// <summary>What adaptive decoding did; null unless it was on.</summary>
    public AdaptiveDecodingStats? Adaptive { get; internal set; }

    /// <summary>Sequence-level uncertainty of the streamed tokens; null unless signals were asked for.</summary>
    public UncertaintySummary? Uncertainty => _uncertainty?.Summary;

    private UncertaintyAccumulator? _uncertainty;

    internal void TrackUncertainty() => _uncertainty = new UncertaintyAccumulator();

    internal void Add(TokenSignals signals) => _uncertainty?.Add(signals);

    public double PrefillTokensPerSecond => PrefillTime > TimeSpan.Zero ? PromptTokens / PrefillTime.TotalSeconds : 0;

    /// <summary>Tokens after the first (which comes out of the prefill) per second of decode steps.</summary>
    public double DecodeTokensPerSecond => DecodeTime > TimeSpan.Zero ? (GeneratedTokens - 1) / DecodeTime.TotalSeconds : 0;
}

/// <summary>
/// The generation loop: prefill the prompt, then one forward pass and one sampling step per token, until
/// EOS, a stop string, the token budget or the context is exhausted. The forward and sampling steps
/// allocate nothing; the text pieces streamed out are the only per-token allocations.
/// </summary>
public static class Generator
{
    public static IEnumerable<GeneratedToken> Run(IDecoderSession session, ITextTokenizer tokenizer, int[] prompt,
        GenerationOptions options, GenerationStats stats, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        options.Validate();
        if (prompt.Length == 0)
        {
            throw new InvalidParameterException("prompt", "the prompt encodes to no tokens (and the tokenizer adds no BOS)");
        }
        if (prompt.Length >= session.Capacity)
        {
            throw new ContextLengthException(
                $"the prompt is {prompt.Length} tokens; the context holds {session.Capacity} (prompt plus at least one generated token must fit)");
        }
        return RunChecked(session, tokenizer, prompt, options, stats, cancellation);
    }

    private static IEnumerable<GeneratedToken> RunChecked(IDecoderSession session, ITextTokenizer tokenizer, int[] prompt,
        GenerationOptions options, GenerationStats stats, CancellationToken cancellation)
    {
        // On a device that samples, a step copies back the token and its numbers only (IDeviceSampler); the host
        // sampler and logits exist only for sessions that hand their logits back.
        var device = session as IDeviceSampler;
        bool onDevice = device is { CanSample: true };
        var sampler = onDevice ? null : new Sampler(session.VocabularySize);
        var logits = onDevice ? [] : new float[session.VocabularySize];
        var history = new int[Math.Min(session.Capacity + 1, prompt.Length + options.MaxNewTokens)];
        prompt.CopyTo(history, 0);
        int length = prompt.Length;
        var random = options.Sampling.Seed is int seed ? new Random(seed) : new Random();
        var detokenizer = new IncrementalDetokenizer(tokenizer);
        var stops = new StopStringMatcher(options.StopStrings);
        var eos = tokenizer.EosTokenIds;
        stats.PromptTokens = prompt.Length;
        int topK = options.Signals?.TopK ?? 0;
        float[]? rowStats = null;
        int[] topIds = [];
        float[] topLogProbs = [];
        if (options.Signals is not null)
        {
            rowStats = new float[VocabStats.FieldCount];
            topIds = new int[topK];
            topLogProbs = new float[topK];
            stats.TrackUncertainty();
        }

        ulong deviceSeed = options.Sampling.Seed is int fixedSeed ? (ulong)(uint)fixedSeed : (ulong)Random.Shared.NextInt64();
        var deviceStats = onDevice ? new float[VocabStats.FieldCount] : [];
        var deviceTopIds = onDevice ? new int[topK] : [];
        var deviceTopLogProbs = onDevice ? new float[topK] : [];
        var single = new int[1];
        int token = 0;
        float logProbability = 0;
        var adaptive = options.Adaptive is null ? null : new AdaptiveDecoder(session, options.Adaptive, tokenizer.EosTokenIds, onDevice);
        stats.Adaptive = adaptive?.Stats;

        // Runs the fed tokens and decides the next one (its log-prob under the raw distribution).
        void Advance(int[] feed)
        {
            if (adaptive is not null)
            {
                token = onDevice ? adaptive.StepOnDevice(feed, deviceSeed, deviceStats, deviceTopIds, deviceTopLogProbs) : adaptive.Step(feed, logits, out logProbability);
                logProbability = onDevice ? deviceStats[(int)VocabStatsField.TokenLogProb] : logProbability;
                return;
            }
            if (onDevice)
            {
                token = device!.ForwardSample(feed, options.Sampling, deviceSeed, topK, deviceStats, deviceTopIds, deviceTopLogProbs);
                logProbability = deviceStats[(int)VocabStatsField.TokenLogProb];
                return;
            }
            session.Forward(feed, logits);
            token = NextToken(sampler!, logits, options.Sampling, history.AsSpan(0, length), random, out logProbability);
        }

        session.Reset();
        var clock = Stopwatch.StartNew();
        Advance(prompt);
        stats.PrefillTime = clock.Elapsed;
        clock.Restart();

        while (true)
        {
            cancellation.ThrowIfCancellationRequested();
            stats.GeneratedTokens++;
            if (options.StopOnEos && Contains(eos, token))
            {
                stats.FinishReason = FinishReason.EndOfSequence;
                break;
            }
            history[length++] = token;
            string text = stops.Push(detokenizer.Push(token));
            TokenSignals? signals = null;
            if (rowStats is not null)
            {
                if (onDevice)
                {
                    signals = TokenSignals.FromStats(token, deviceStats, deviceTopIds, deviceTopLogProbs);
                }
                else
                {
                    // The same raw distribution the log-prob above describes, in one fused pass.
                    VocabStats.ReduceRow(logits, token, [], topK, rowStats, topIds, topLogProbs);
                    signals = TokenSignals.FromStats(token, rowStats, topIds, topLogProbs);
                }
                stats.Add(signals);
            }
            yield return new GeneratedToken(token, text, logProbability, signals);
            if (stops.Stopped)
            {
                stats.FinishReason = FinishReason.StopString;
                break;
            }
            if (stats.GeneratedTokens >= options.MaxNewTokens)
            {
                stats.FinishReason = FinishReason.MaxTokens;
                break;
            }
            if (session.Length >= session.Capacity)
            {
                stats.FinishReason = FinishReason.ContextFull;
                break;
            }
            single[0] = token;
            Advance(single);
            stats.DecodeTime = clock.Elapsed;
        }
        stats.DecodeTime = clock.Elapsed;
        if (stats.FinishReason != FinishReason.StopString)
        {
            string rest = stops.Push(detokenizer.Flush()) + stops.Flush();
            if (rest.Length > 0)
            {
                yield return new GeneratedToken(-1, rest, float.NaN);
            }
        }
    }

    /// <summary>One sampling step: the choice, and its log-prob under the raw (unpenalised, untempered) logits.</summary>
    public static int NextToken(Sampler sampler, ReadOnlySpan<float> logits, SamplingOptions options, ReadOnlySpan<int> history, Random random, out float logProbability)
    {
        double uniform = options.IsGreedy ? 0 : random.NextDouble();
        int token = sampler.Sample(logits, options, history, uniform);
        logProbability = (float)(logits[token] - Sampler.LogSumExp(logits));
        return token;
    }

    private static bool Contains(IReadOnlyList<int> ids, int token)
    {
        for (int i = 0; i < ids.Count; i++)
        {
            if (ids[i] == token)
            {
                return true;
            }
        }
        return false;
    }

    /// <summary>The same loop as an async stream for services (cancellation between tokens).</summary>
    public static async IAsyncEnumerable<GeneratedToken> RunAsync(IDecoderSession session, ITextTokenizer tokenizer, int[] prompt,
        GenerationOptions options, GenerationStats stats, [EnumeratorCancellation] CancellationToken cancellation = default)
    {
        foreach (var token in Run(session, tokenizer, prompt, options, stats, cancellation))
        {
            yield return token;
            await Task.Yield();
        }
    }
}
